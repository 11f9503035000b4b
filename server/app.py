"""The FastAPI app over one `LLM`: OpenAI-compatible routes, adapter routes, vLLM's aliases, health, metrics.

`create_app` only assembles the pieces, each in its own module:

    generation.py completions and chat: one request path, two response shapes
    models.py     /v1/models, /v1/adapters, /v1/load_lora_adapter, /v1/unload_lora_adapter
    ops.py        /health, /metrics, /version, /tokenize, /detokenize
    state.py      the served LLM and its names, request fields -> engine inputs, --adapter-dir
    streaming.py  engine thread -> event loop, one HTTP request's engine requests, SSE bodies, disconnects
    errors.py     OpenAI's error shape; slora_jax's error types -> HTTP status, in one table
    guard.py      the API key, the request-body size limit, JSON bodies, before any route runs
    protocol.py   request and response models;  metrics.py  Prometheus metrics;  chat.py  chat messages

The server uses only slora_jax's public API (`LLM`, `SamplingParams`, the errors of `slora_jax.errors`).
Calls that may wait for an engine step (aborts, stats, adapter changes, tokenizing long prompts) run
in the thread pool, so a long step (or a first-time compile) never blocks the event loop.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from slora_jax import LLM

from . import generation, models, ops
from .errors import install_error_handlers
from .guard import MAX_BODY_BYTES, RequestGuard
from .state import ServerState


def _lifespan(llm: LLM):
    """Start the engine loop with the app; on shutdown abort what still runs and stop it."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        llm.start()
        try:
            yield
        finally:
            await run_in_threadpool(llm.stop)

    return lifespan


def create_app(llm: LLM, api_key: Optional[str] = None, adapter_dir: Optional[str] = None,
               served_model_name: Union[None, str, Sequence[str]] = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app over `llm`. `adapter_dir`: adapters may be loaded from there (by route, or by name on first
    use); `served_model_name`: the base model's name(s) in requests and /v1/models (default: the model's)."""
    srv = ServerState(llm, adapter_dir, served_model_name)
    app = FastAPI(title="slora-jax", version="0.1.0", lifespan=_lifespan(llm),
                  description="OpenAI-compatible multi-LoRA serving over one base Llama. `model` names an adapter "
                              f"or the base model ({srv.base_name!r}, or 'base').")
    app.state.server = srv
    app.add_middleware(RequestGuard, api_key=api_key, max_body=max_body_bytes, metrics=srv.metrics)
    install_error_handlers(app, srv.metrics)
    for module in (generation, models, ops):
        app.include_router(module.router)
    return app
