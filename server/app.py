"""OpenAI-compatible HTTP server over one `LLM`: completions, chat, models, adapters, health, metrics.

This module holds the app and its routes; the pieces they are built from:

    state.py      the served model's limits and the checks that turn request fields into engine inputs
    streaming.py  engine thread -> event loop, one HTTP request's engine requests, SSE bodies, disconnects
    chat.py       chat messages -> prompt token ids (the tokenizer's template, or a plain one)
    errors.py     OpenAI's error shape, and which exception answers with which status
    guard.py      the API key and the request-body size limit, before any route runs
    protocol.py   request and response models;  metrics.py  Prometheus metrics

Everything that takes the engine lock (adding and aborting requests, stats,
adapter changes) runs in the thread pool, so a long engine step (or a
first-time compile) never blocks the event loop.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from slora_jax.adapters.lora import AdapterError

from .chat import render_chat, request_messages
from .errors import ERROR_DOCS, ApiError, install_error_handlers
from .guard import MAX_BODY_BYTES, RequestGuard
from .protocol import (AdapterDeleted, AdapterLoadRequest, ChatChoice, ChatCompletionRequest,
                       ChatCompletionResponse, ChatMessageOut, CompletionChoice, CompletionRequest, CompletionResponse,
                       ErrorResponse, Health, ModelCard, ModelList, Usage)
from .state import ServerState
from .streaming import sse_response

log = logging.getLogger("slora_jax.server")

_SSE_EVENT = {"type": "object", "required": ["data"], "description": "One server-sent event",
              "properties": {"data": {"type": "string", "description": "A JSON chunk, or [DONE] at the end."}}}
_SSE_DOC = {"content": {"text/event-stream": {"schema": _SSE_EVENT}}, "description": "JSON, or SSE when stream"}


def _stop_engine(llm) -> None:
    eng = llm.engine
    with eng._lock:
        for rid in list(eng.requests):
            eng.abort(rid)
    eng.stop()


def create_app(llm, api_key: Optional[str] = None, adapter_dir: Optional[str] = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app over `llm`: starts its engine thread on startup and stops it on shutdown."""
    srv = ServerState(llm, adapter_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        llm.engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(_stop_engine, llm)

    app = FastAPI(title="slora-jax", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible multi-LoRA serving over one base Llama. `model` names an adapter "
                              f"or the base model ({srv.base_name!r}, or 'base').")
    app.state.server = srv
    app.add_middleware(RequestGuard, api_key=api_key, max_body=max_body_bytes, metrics=srv.metrics)
    install_error_handlers(app, srv.metrics)

    # -- generation routes ---------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=CompletionResponse, responses={200: _SSE_DOC, **ERROR_DOCS})
    async def completions(body: CompletionRequest, request: Request):
        adapter = srv.resolve_model(body.model)  # unsupported options are refused by the request model
        ids, texts = await run_in_threadpool(srv.tokenize_prompts, body.prompt)
        n = body.n
        samplings = srv.samplings(body, len(ids), body.max_tokens, 16)
        prompts = [p for p in ids for _ in range(n)]
        model = body.model or srv.base_name
        echo = [(t if t is not None else srv.llm.tokenizer.decode(p)) if body.echo else "" for p, t in zip(ids, texts)]
        gen = srv.generation("completions", "cmpl")
        await gen.start(request, prompts, adapter, samplings)

        def chunk(i, text, finish_reason):
            return {"id": gen.id, "object": "text_completion", "created": gen.created, "model": model,
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            head = (lambda i: chunk(i, echo[i // n], None)) if body.echo else None
            usage = (lambda: {"id": gen.id, "object": "text_completion", "created": gen.created, "model": model,
                              "choices": [], "usage": gen.usage(prompts, n)}) if include_usage else None
            return sse_response(gen, chunk, head, usage)
        if not await gen.finish():
            return Response(status_code=499)  # nobody is listening
        choices = [CompletionChoice(index=i, text=echo[i // n] + r.text, finish_reason=r.finish_reason)
                   for i, r in enumerate(gen.reqs)]
        return JSONResponse(CompletionResponse(id=gen.id, created=gen.created, model=model, choices=choices,
                                               usage=Usage(**gen.usage(prompts, n))).model_dump())

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={200: _SSE_DOC, **ERROR_DOCS})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = srv.resolve_model(body.model)  # unsupported options are refused by the request model
        ids = await run_in_threadpool(render_chat, srv.llm.tokenizer, request_messages(body.messages))
        srv.check_prompt(ids, "messages")
        n = body.n
        samplings = srv.samplings(body, 1, body.max_completion_tokens or body.max_tokens,
                                  max(1, srv.max_model_len - len(ids)))
        prompts = [ids] * n
        model = body.model or srv.base_name
        gen = srv.generation("chat", "chatcmpl")
        await gen.start(request, prompts, adapter, samplings)

        def chunk(i, text, finish_reason):
            return {"id": gen.id, "object": "chat.completion.chunk", "created": gen.created, "model": model,
                    "choices": [{"index": i, "delta": {"content": text} if text or finish_reason is None else {},
                                 "logprobs": None, "finish_reason": finish_reason}]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def head(i):
                return {"id": gen.id, "object": "chat.completion.chunk", "created": gen.created, "model": model,
                        "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]}

            usage = (lambda: {"id": gen.id, "object": "chat.completion.chunk", "created": gen.created,
                              "model": model, "choices": [], "usage": gen.usage(prompts, n)}) if include_usage else None
            return sse_response(gen, chunk, head, usage)
        if not await gen.finish():
            return Response(status_code=499)
        choices = [ChatChoice(index=i, message=ChatMessageOut(content=r.text), finish_reason=r.finish_reason)
                   for i, r in enumerate(gen.reqs)]
        return JSONResponse(ChatCompletionResponse(id=gen.id, created=gen.created, model=model, choices=choices,
                                                   usage=Usage(**gen.usage(prompts, n))).model_dump())

    # -- models and adapters ---------------------------------------------------------------------------
    @app.get("/v1/models", response_model=ModelList, responses=ERROR_DOCS)
    async def list_models():
        adapters = await run_in_threadpool(llm.adapters)
        return ModelList(data=srv.model_cards(adapters))

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERROR_DOCS)
    async def get_model(model_id: str):
        if srv.is_base(model_id):
            return srv.model_cards([])[0]
        adapters = [a for a in await run_in_threadpool(llm.adapters) if a["name"] == model_id]
        if not adapters:
            srv.resolve_model(model_id)  # raises the 404
        return srv.model_cards(adapters)[1]

    @app.post("/v1/adapters", response_model=ModelCard, responses=ERROR_DOCS)
    async def load_adapter(body: AdapterLoadRequest):
        real = srv.adapter_path(body.path)
        if not os.path.isdir(real):
            raise ApiError(404, f"no adapter directory at {body.path!r} under the adapter directory", param="path",
                           code="adapter_not_found")
        if srv.is_base(body.name):
            raise ApiError(409, f"{body.name!r} names the base model", param="name")
        if body.name in srv.engine.store and not body.replace:
            raise ApiError(409, f"adapter {body.name!r} is already registered (send replace: true to replace it)",
                           param="name", code="adapter_exists")
        try:
            await run_in_threadpool(functools.partial(llm.load_adapter, body.name, real, replace=body.replace))
        except AdapterError as e:
            msg = str(e).replace(real, body.path)  # do not reveal where a path resolved to
            conflict = "in use" in msg or "already registered" in msg
            raise ApiError(409 if conflict else 400, msg, param="name" if conflict else "path") from None
        adapters = [a for a in await run_in_threadpool(llm.adapters) if a["name"] == body.name]
        return srv.model_cards(adapters)[-1]

    @app.delete("/v1/adapters/{name}", response_model=AdapterDeleted, responses=ERROR_DOCS)
    async def delete_adapter(name: str):
        if srv.is_base(name):
            raise ApiError(400, "the base model cannot be removed", param="name")
        if name not in srv.engine.store:
            raise ApiError(404, f"adapter {name!r} is not registered", param="name", code="model_not_found")
        try:
            await run_in_threadpool(llm.remove_adapter, name)
        except AdapterError as e:
            in_use = "in use" in str(e)
            raise ApiError(409 if in_use else 404, str(e), param="name",
                           code=None if in_use else "model_not_found") from None
        return AdapterDeleted(id=name)

    # -- operations --------------------------------------------------------------------------------------
    @app.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def health():
        t = llm.engine._thread
        if t is None or not t.is_alive():
            raise ApiError(503, "the engine thread is not running")
        return Health(status="ok")

    @app.get("/metrics", response_class=PlainTextResponse, responses=ERROR_DOCS)
    async def metrics():
        stats = await run_in_threadpool(llm.stats)
        t = llm.engine._thread
        return PlainTextResponse(srv.metrics.render(stats, t is not None and t.is_alive()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def serve(llm, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          adapter_dir: Optional[str] = None, log_level: str = "info", warmup: bool = True) -> None:
    """Run the server with uvicorn until interrupted."""
    import uvicorn

    app = create_app(llm, api_key=api_key, adapter_dir=adapter_dir)
    if warmup:  # compile every step shape now, so that no client waits for a compile
        t0 = time.perf_counter()
        n = llm.engine.warmup()
        log.info("warm-up: compiled %d step programs in %.1fs", n, time.perf_counter() - t0)
    shown = f"[{host}]" if ":" in host else host
    names = [a["name"] for a in llm.adapters()]
    print(f"slora-jax: serving {llm.model_cfg.name!r} with {len(names)} adapter(s) "
          f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) at http://{shown}:{port}/v1 "
          f"({'API key required' if api_key else 'no API key'}; adapter dir: {adapter_dir or 'none'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
