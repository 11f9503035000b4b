"""The OpenAI-compatible HTTP server (FastAPI): `create_app(llm, ...)` and `serve(llm, ...)`."""
from .app import create_app, serve

__all__ = ["create_app", "serve"]
