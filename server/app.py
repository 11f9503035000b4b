"""OpenAI-compatible HTTP server over one `LLM`: completions, chat, models, adapters, health, metrics.

The engine runs in its own thread (`Engine.start()`); each HTTP request turns
into one engine request per choice, whose listener (called on the engine
thread after every token) hands text deltas to the event loop, one wake-up
per burst of tokens (`_Dispatcher`). Everything that takes the engine lock
(adding and aborting requests, stats, adapter changes) runs in the thread
pool, so a long engine step (or a first-time compile) never blocks the loop.

A client that goes away is noticed by a per-request task that waits for the
ASGI `http.disconnect` message; it aborts the request's unfinished engine
requests, which frees their KV pages. Errors leave the server only here, each
in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

Chat prompts are rendered with the tokenizer's chat template (jinja2, in a
sandbox, as transformers does) when the model has one. Otherwise with the
plain template below, encoded with BOS:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n ... <|assistant|>\\n
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hmac
import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from slora_jax.adapters.lora import AdapterError
from slora_jax.engine.request import RequestError, SamplingParams

from .metrics import Metrics
from .protocol import (AdapterDeleted, AdapterLoadRequest, ChatChoice, ChatCompletionRequest,
                       ChatCompletionResponse, ChatMessageOut, CompletionChoice, CompletionRequest, CompletionResponse,
                       ErrorResponse, Health, ModelCard, ModelList, Usage)

log = logging.getLogger("slora_jax.server")

MAX_BODY_BYTES = 1 << 20
BASE_ALIAS = "base"
_DISCONNECT = object()

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 500: "server_error", 503: "service_unavailable"}
_ERROR_DOCS: dict = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 413, 500, 503)}
_SSE_EVENT = {"type": "object", "required": ["data"], "description": "One server-sent event",
              "properties": {"data": {"type": "string", "description": "A JSON chunk, or [DONE] at the end."}}}
_SSE_DOC = {"content": {"text/event-stream": {"schema": _SSE_EVENT}}, "description": "JSON, or SSE when stream"}


# -- errors --------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    etype = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[dict] = None, metrics: Optional[Metrics] = None) -> JSONResponse:
    if metrics is not None:
        metrics.errors.inc({"status": str(status)})
    return JSONResponse(_error_body(status, message, param, code), status_code=status, headers=headers)


class _Guard:
    """Pure ASGI middleware: Bearer auth on every route but /health, and the request-body size limit."""

    def __init__(self, app, api_key: Optional[str], max_body: int, metrics: Metrics):
        self.app, self.max_body, self.metrics = app, max_body, metrics
        self.key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.key is not None and scope["path"] != "/health":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "replace"), self.key):
                resp = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                                      metrics=self.metrics)
                return await resp(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_body):
            bad = not length.strip().isdigit()
            resp = error_response(400 if bad else 413, "Invalid Content-Length header." if bad else
                                  f"The request body exceeds the limit of {self.max_body} bytes.",
                                  code=None if bad else "request_too_large", metrics=self.metrics)
            return await resp(scope, receive, send)

        seen, rejected = 0, False

        async def limited_receive():
            nonlocal seen, rejected
            msg = await receive()
            if msg["type"] == "http.request" and not rejected:
                seen += len(msg.get("body", b""))
                if seen > self.max_body:  # a chunked body without Content-Length
                    rejected = True
                    await error_response(413, f"The request body exceeds the limit of {self.max_body} bytes.",
                                         code="request_too_large", metrics=self.metrics)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if not rejected:
                await send(msg)

        await self.app(scope, limited_receive, guarded_send)


# -- chat templates --------------------------------------------------------------------------
def _special_token(tokenizer, token_id: Optional[int]) -> str:
    if token_id is None:
        return ""
    tok = getattr(tokenizer, "tok", None)
    if tok is not None and hasattr(tok, "id_to_token"):
        return tok.id_to_token(token_id) or ""
    return ""


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    """The template in a sandbox with transformers' globals (raise_exception, strftime_now, loop controls)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ApiError(400, f"chat template: {message}", param="messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(source)


def _template_source(tokenizer) -> Optional[str]:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, list):  # [{"name", "template"}, ...] as in some tokenizer_config.json files
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) and tpl.strip() else None


def render_chat(tokenizer, messages: list) -> list:
    """Chat messages (dicts with role and content) -> prompt token ids, ending where the assistant speaks."""
    source = _template_source(tokenizer)
    try:
        import jinja2
    except ImportError:  # documented: without jinja2 every model gets the plain template
        jinja2 = None
    if source is None or jinja2 is None:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
        return tokenizer.encode(text)
    try:
        template = _compile_template(source)
    except jinja2.TemplateError as e:
        raise ApiError(500, f"the model's chat template is invalid: {e}") from None
    eos = getattr(tokenizer, "eos_ids", ()) or ()
    try:
        text = template.render(messages=messages, add_generation_prompt=True,
                               bos_token=_special_token(tokenizer, tokenizer.bos_id),
                               eos_token=_special_token(tokenizer, eos[0] if eos else None))
    except jinja2.TemplateError as e:
        raise ApiError(400, f"the chat template failed on these messages: {e}", param="messages") from None
    ids = tokenizer.encode(text, add_bos=False)
    if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id] + ids  # Llama expects BOS even where a template leaves it out
    return ids


def _message_text(content) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


# -- one HTTP request's engine requests ---------------------------------------------------------
class _Dispatcher:
    """Hands events from the engine thread to asyncio queues with one loop wake-up per burst.

    Listeners run inside the engine step, under its lock; a `call_soon_threadsafe`
    per token would cost a syscall per token per request there. Instead events
    go into a deque, and only the first event after a flush schedules the next flush.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def push(self, queue: asyncio.Queue, event) -> None:  # any thread
        self._items.append((queue, event))
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:  # event loop
        with self._lock:
            self._scheduled = False
        items = self._items
        while items:
            queue, event = items.popleft()
            queue.put_nowait(event)


class _Generation:
    """The engine requests behind one HTTP request (one per choice), delivered as one asyncio event queue.

    Events are `(choice index, text delta, finished)`, or `_DISCONNECT` when the client went away.
    """

    def __init__(self, srv: "_Server", endpoint: str, prefix: str):
        self.srv, self.endpoint = srv, endpoint
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.loop = asyncio.get_running_loop()
        self.dispatcher = srv.dispatcher(self.loop)
        self.events: asyncio.Queue = asyncio.Queue()
        self.reqs: list = []
        self._progress: dict = {}  # choice -> (tokens seen, time of the last); engine thread only
        self._watcher: Optional[asyncio.Task] = None

    def _listener(self, idx: int) -> Callable:
        metrics = self.srv.metrics

        def on_token(req, delta: str) -> None:  # engine thread: must never raise
            try:
                now = time.monotonic()
                count, last = self._progress.get(idx, (0, None))
                metrics.on_tokens(req, count, last, now)
                self._progress[idx] = (len(req.output_ids), now)
                if req.finished:
                    metrics.on_finish(req, self.endpoint)
                self.dispatcher.push(self.events, (idx, delta, req.finished))
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass
            except Exception:
                log.exception("request listener failed")

        return on_token

    def submit(self, prompts: list, adapter: Optional[str], samplings: list) -> None:
        """Add every choice to the engine (thread pool); all or none."""
        engine = self.srv.engine
        try:
            for i, (ids, sp) in enumerate(zip(prompts, samplings)):
                self.reqs.append(engine.add_request(ids, adapter, sp, request_id=f"{self.id}-{i}",
                                                    listener=self._listener(i)))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for r in self.reqs:
            if not r.finished:
                self.srv.engine.abort(r.id)

    def abort_soon(self) -> None:
        """Abort unfinished choices from the event loop without waiting for the engine lock."""
        if any(not r.finished for r in self.reqs):
            self.loop.run_in_executor(None, self.abort)

    def watch(self, request: Request) -> None:
        self._watcher = asyncio.ensure_future(self._watch(request))

    async def _watch(self, request: Request) -> None:
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server without disconnect messages: nothing to watch
            return
        self.abort_soon()
        self.events.put_nowait(_DISCONNECT)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self.abort_soon()

    async def wait_all(self) -> bool:
        """Until every choice finished (True) or the client went away (False)."""
        pending = len(self.reqs)
        while pending:
            ev = await self.events.get()
            if ev is _DISCONNECT:
                return False
            pending -= bool(ev[2])
        return True

    def failure(self) -> Optional[ApiError]:
        for r in self.reqs:
            if r.finish_reason == "error":
                return ApiError(500, f"the engine failed on this request: {r.error or 'internal error'}")
            if r.finish_reason == "abort":
                return ApiError(503, "the request was dropped before it could finish (the server is overloaded)")
        return None

    def usage(self, prompts: list, n: int) -> dict:
        prompt_tokens = sum(len(p) for p in prompts[::n])  # each prompt once, however many choices
        completion = sum(len(r.output_ids) for r in self.reqs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}


def _param_of(error: dict) -> Optional[str]:
    """'messages.0.role' from a pydantic error location, without 'body' and union member tags like 'list[int]'."""
    parts = [str(x) for x in error.get("loc", ()) if x != "body"]
    parts = [p for p in parts if not ("[" in p or p in ("str", "int", "float", "bool", "list", "dict", "none"))]
    return ".".join(parts) or None


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"  # ASCII-escaped: no raw line breaks in an event


# -- the server ------------------------------------------------------------------------------
class _Server:
    def __init__(self, llm, api_key: Optional[str], adapter_dir: Optional[str]):
        self.llm, self.engine, self.api_key = llm, llm.engine, api_key
        self.base_name = llm.model_cfg.name
        self.adapter_dir = os.path.realpath(adapter_dir) if adapter_dir else None
        self.max_model_len = llm.engine_cfg.max_model_len
        self.vocab_size = llm.model_cfg.vocab_size
        self.metrics = Metrics()
        self.created = int(time.time())
        self._dispatcher: Optional[_Dispatcher] = None

    def dispatcher(self, loop: asyncio.AbstractEventLoop) -> _Dispatcher:
        if self._dispatcher is None or self._dispatcher.loop is not loop:
            self._dispatcher = _Dispatcher(loop)
        return self._dispatcher

    # -- request pieces ------------------------------------------------------------------------
    def is_base(self, name: Optional[str]) -> bool:
        return name is None or name in (self.base_name, BASE_ALIAS)

    def resolve_model(self, name: Optional[str]) -> Optional[str]:
        """The adapter a request's `model` names; None for the base model."""
        if self.is_base(name):
            return None
        if name in self.engine.store:
            return name
        raise ApiError(404, f"The model {name!r} does not exist: use {self.base_name!r} (or 'base') or a "
                            "registered adapter (GET /v1/models).", param="model", code="model_not_found")

    def check_prompt(self, ids: list, param: str) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        if len(ids) >= self.max_model_len:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's maximum context length is "
                                f"{self.max_model_len} tokens (prompt plus at least one generated token)",
                           param=param, code="context_length_exceeded")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (size {self.vocab_size})", param=param)

    def samplings(self, body, n_prompts: int, max_tokens: Optional[int], default_max: Optional[int]) -> list:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stop = [s for s in stop if s]
        out = []
        for _ in range(n_prompts):
            for j in range(body.n):
                try:
                    out.append(SamplingParams(
                        max_tokens=max_tokens or default_max or 16,
                        temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p,
                        top_k=min(body.top_k or 0, self.vocab_size),
                        seed=None if body.seed is None else body.seed + j,
                        stop=tuple(stop), stop_token_ids=tuple(body.stop_token_ids or ()),
                        ignore_eos=body.ignore_eos))
                except RequestError as e:
                    raise ApiError(400, str(e)) from None
        return out

    def tokenize_prompts(self, prompt) -> tuple[list, list]:
        """-> (token id lists, prompt texts) from any of the four OpenAI prompt forms."""
        if isinstance(prompt, str):
            items = [prompt]
        elif not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        elif isinstance(prompt[0], int):
            items = [list(prompt)]
        else:
            items = list(prompt)
        ids, texts = [], []
        for item in items:
            if isinstance(item, str):
                ids.append(self.llm.tokenizer.encode(item))
                texts.append(item)
            else:
                ids.append([int(t) for t in item])
                texts.append(None)
        for p in ids:
            self.check_prompt(p, "prompt")
        return ids, texts

    def adapter_path(self, path: str) -> str:
        """`path` (relative to --adapter-dir, or absolute) resolved, if it and its files stay inside --adapter-dir."""
        base = self.adapter_dir
        if base is None:
            raise ApiError(403, "loading adapters over HTTP is disabled: start the server with --adapter-dir",
                           param="path")
        if "\x00" in path:
            raise ApiError(400, "the path contains a NUL byte", param="path")
        real = os.path.realpath(os.path.join(base, path))

        def inside(p: str) -> bool:
            return p == base or p.startswith(base.rstrip(os.sep) + os.sep)

        outside = ApiError(403, f"the path {path!r} resolves outside the adapter directory", param="path")
        if not inside(real):
            raise outside
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            f = os.path.join(real, name)
            if os.path.lexists(f) and not inside(os.path.realpath(f)):
                raise outside
        return real

    # -- generation ----------------------------------------------------------------------------
    async def run(self, request: Request, gen: _Generation, prompts: list, adapter: Optional[str],
                  samplings: list) -> None:
        await run_in_threadpool(gen.submit, prompts, adapter, samplings)
        gen.watch(request)

    async def finish_or_fail(self, gen: _Generation) -> bool:
        """Wait for all choices; False if the client went away. Raises the failure of a failed choice."""
        try:
            ok = await gen.wait_all()
        finally:
            gen.close()
        if ok and (err := gen.failure()) is not None:
            raise err
        return ok

    def stream(self, gen: _Generation, chunk: Callable, head: Optional[Callable], usage: Optional[Callable]):
        """SSE body: `head(i)` once per choice first, then `chunk(i, delta, finish_reason)`, then usage, [DONE]."""

        async def body():
            try:
                if head is not None:
                    for i in range(len(gen.reqs)):
                        yield _sse(head(i))
                pending = len(gen.reqs)
                while pending:
                    ev = await gen.events.get()
                    if ev is _DISCONNECT:
                        return
                    idx, delta, finished = ev
                    if not finished:  # one chunk per token, even one whose text is held back (partial UTF-8)
                        yield _sse(chunk(idx, delta, None))
                        continue
                    pending -= 1
                    req = gen.reqs[idx]
                    if req.finish_reason in ("error", "abort"):
                        err = gen.failure()
                        yield _sse(_error_body(err.status, err.message))
                        yield b"data: [DONE]\n\n"
                        return
                    yield _sse(chunk(idx, delta, req.finish_reason))
                if usage is not None:
                    yield _sse(usage())
                yield b"data: [DONE]\n\n"
            finally:
                gen.close()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def model_cards(self, adapters: list) -> list:
        cards = [ModelCard(id=self.base_name, created=self.created, root=self.base_name,
                           max_model_len=self.max_model_len)]
        for a in adapters:
            cards.append(ModelCard(id=a["name"], created=self.created, root=self.base_name, parent=self.base_name,
                                   max_model_len=self.max_model_len, rank=a["max_rank"],
                                   ranks={k: int(v) for k, v in a["ranks"].items()}, resident=bool(a["resident"]),
                                   source=a.get("source")))
        return cards


def _stop_engine(llm) -> None:
    eng = llm.engine
    with eng._lock:
        for rid in list(eng.requests):
            eng.abort(rid)
    eng.stop()


def create_app(llm, api_key: Optional[str] = None, adapter_dir: Optional[str] = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app over `llm`: starts its engine thread on startup and stops it on shutdown."""
    srv = _Server(llm, api_key, adapter_dir)

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
    app.add_middleware(_Guard, api_key=api_key, max_body=max_body_bytes, metrics=srv.metrics)

    # -- errors ------------------------------------------------------------------------------------
    def err(status, message, param=None, code=None, headers=None):
        return error_response(status, message, param, code, headers, srv.metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return err(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        errors = list(e.errors())
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return err(400, f"The request body is not valid JSON ({detail}).")
        param = _param_of(first)
        same = [e for e in errors if _param_of(e) == param]  # a union field reports one error per member type
        msg = "; ".join(dict.fromkeys(str(e.get("msg", "invalid value")) for e in same))
        msg = f"{param}: {msg}" if param else msg
        if len(errors) > len(same):
            msg += f" (and {len(errors) - len(same)} more error(s))"
        return err(400, msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return err(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(RequestError)
    async def _request_error(_, e: RequestError):
        return err(400, str(e))

    @app.exception_handler(AdapterError)
    async def _adapter_error(_, e: AdapterError):
        return err(404 if "not registered" in str(e) else 400, str(e), "model")

    @app.exception_handler(Exception)
    async def _internal_error(_, e: Exception):
        log.exception("unhandled error", exc_info=e)
        return err(500, "internal server error")

    # -- generation routes ---------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=CompletionResponse, responses={200: _SSE_DOC, **_ERROR_DOCS})
    async def completions(body: CompletionRequest, request: Request):
        adapter = srv.resolve_model(body.model)  # unsupported options are refused by the request model
        ids, texts = await run_in_threadpool(srv.tokenize_prompts, body.prompt)
        n = body.n
        samplings = srv.samplings(body, len(ids), body.max_tokens, 16)
        prompts = [p for p in ids for _ in range(n)]
        model = body.model or srv.base_name
        echo = [(t if t is not None else srv.llm.tokenizer.decode(p)) if body.echo else "" for p, t in zip(ids, texts)]
        gen = _Generation(srv, "completions", "cmpl")
        await srv.run(request, gen, prompts, adapter, samplings)

        def chunk(i, text, finish_reason):
            return {"id": gen.id, "object": "text_completion", "created": gen.created, "model": model,
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            head = (lambda i: chunk(i, echo[i // n], None)) if body.echo else None
            usage = (lambda: {"id": gen.id, "object": "text_completion", "created": gen.created, "model": model,
                              "choices": [], "usage": gen.usage(prompts, n)}) if include_usage else None
            return srv.stream(gen, chunk, head, usage)
        if not await srv.finish_or_fail(gen):
            return Response(status_code=499)  # nobody is listening
        choices = [CompletionChoice(index=i, text=echo[i // n] + r.text, finish_reason=r.finish_reason)
                   for i, r in enumerate(gen.reqs)]
        return JSONResponse(CompletionResponse(id=gen.id, created=gen.created, model=model, choices=choices,
                                               usage=Usage(**gen.usage(prompts, n))).model_dump())

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={200: _SSE_DOC, **_ERROR_DOCS})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = srv.resolve_model(body.model)  # unsupported options are refused by the request model
        messages = []
        for m in body.messages:
            msg = {"role": m.role, "content": _message_text(m.content)}
            if m.name is not None:
                msg["name"] = m.name
            messages.append(msg)
        ids = await run_in_threadpool(render_chat, srv.llm.tokenizer, messages)
        srv.check_prompt(ids, "messages")
        n = body.n
        samplings = srv.samplings(body, 1, body.max_completion_tokens or body.max_tokens,
                                  max(1, srv.max_model_len - len(ids)))
        prompts = [ids] * n
        model = body.model or srv.base_name
        gen = _Generation(srv, "chat", "chatcmpl")
        await srv.run(request, gen, prompts, adapter, samplings)

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
            return srv.stream(gen, chunk, head, usage)
        if not await srv.finish_or_fail(gen):
            return Response(status_code=499)
        choices = [ChatChoice(index=i, message=ChatMessageOut(content=r.text), finish_reason=r.finish_reason)
                   for i, r in enumerate(gen.reqs)]
        return JSONResponse(ChatCompletionResponse(id=gen.id, created=gen.created, model=model, choices=choices,
                                                   usage=Usage(**gen.usage(prompts, n))).model_dump())

    # -- models and adapters ---------------------------------------------------------------------------
    @app.get("/v1/models", response_model=ModelList, responses=_ERROR_DOCS)
    async def list_models():
        adapters = await run_in_threadpool(llm.adapters)
        return ModelList(data=srv.model_cards(adapters))

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=_ERROR_DOCS)
    async def get_model(model_id: str):
        if srv.is_base(model_id):
            return srv.model_cards([])[0]
        adapters = [a for a in await run_in_threadpool(llm.adapters) if a["name"] == model_id]
        if not adapters:
            srv.resolve_model(model_id)  # raises the 404
        return srv.model_cards(adapters)[1]

    @app.post("/v1/adapters", response_model=ModelCard, responses=_ERROR_DOCS)
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

    @app.delete("/v1/adapters/{name}", response_model=AdapterDeleted, responses=_ERROR_DOCS)
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

    @app.get("/metrics", response_class=PlainTextResponse, responses=_ERROR_DOCS)
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
