"""The OpenAI-compatible HTTP server (FastAPI) over slora_jax's public API: `create_app(llm, ...)`, `serve(llm, ...)`,
and the `serve` command (`python -m server`, `slora-jax serve`)."""
from .app import create_app
from .launch import serve

__all__ = ["create_app", "serve"]
