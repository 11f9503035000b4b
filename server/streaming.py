"""From the engine thread to the client: one HTTP request's engine requests, their events, and the SSE body.

The engine runs in its own thread (`LLM.start()`); each HTTP request turns
into one engine request per choice (`LLM.submit`), whose callback (called on
the engine thread after every token) hands text deltas to the event loop, one
wake-up per burst of tokens (`Dispatcher`). Aborting takes the engine lock, so
it runs in the thread pool: a long engine step (or a first-time compile) never
blocks the loop.

A client that goes away is noticed by a per-request task that waits for the
ASGI `http.disconnect` message; it aborts the request's unfinished engine
requests, which frees their KV pages.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
import uuid
from typing import Any, Callable, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .errors import ApiError, error_body
from .metrics import Metrics

log = logging.getLogger("slora_jax.server")

DISCONNECT = object()  # the event that says the client went away


class Dispatcher:
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


class Generation:
    """The engine requests behind one HTTP request (one per choice), delivered as one asyncio event queue.

    Events are `(choice index, text delta, finished, logprobs)`, or `DISCONNECT` when the client went
    away; `logprobs` are the TokenLogprobs of the tokens since the choice's last event (None if it asked
    for none). Create it on the event loop that serves the request (`dispatcher.loop`).
    """

    def __init__(self, llm, metrics: Metrics, dispatcher: Dispatcher, endpoint: str, prefix: str):
        self.llm, self.metrics, self.dispatcher, self.endpoint = llm, metrics, dispatcher, endpoint
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.loop = dispatcher.loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.handles: list = []  # slora_jax RequestHandle per choice
        self._progress: dict = {}  # choice -> (tokens seen, time of the last); engine thread only
        self._watcher: Optional[asyncio.Task] = None

    def _listener(self, idx: int) -> Callable:
        metrics = self.metrics

        def on_token(handle, delta: str) -> None:  # engine thread: must never raise
            try:
                now = time.monotonic()
                count, last = self._progress.get(idx, (0, None))
                metrics.on_tokens(handle, count, last, now)
                self._progress[idx] = (handle.num_output_tokens, now)
                if handle.finished:
                    metrics.on_finish(handle, self.endpoint)
                self.dispatcher.push(self.events, (idx, delta, handle.finished, handle.logprobs_from(count)))
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass
            except Exception:
                log.exception("request listener failed")

        return on_token

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self, request: Request, prompts: list, adapter: Optional[str], samplings: list) -> None:
        """Submit every choice, then watch for the client going away. All or none: if one is refused
        (its error propagates), those submitted before it are aborted. Submitting queues without waiting
        for the engine, but a grammar (structured output) compiles first: then it runs in the thread pool."""
        def submit_all() -> None:
            for i, (ids, sp) in enumerate(zip(prompts, samplings)):
                self.handles.append(self.llm.submit(ids, adapter, sp, request_id=f"{self.id}-{i}",
                                                    on_update=self._listener(i)))

        try:
            if any(sp.json_schema is not None or sp.json_object for sp in samplings):
                await run_in_threadpool(submit_all)
            else:
                submit_all()
        except BaseException:
            self.abort_soon()
            raise
        self.watch(request)

    def abort(self) -> None:
        for h in self.handles:
            if not h.finished:
                self.llm.abort(h.id)

    def abort_soon(self) -> None:
        """Abort unfinished choices from the event loop without waiting for the engine lock."""
        if any(not h.finished for h in self.handles):
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
        self.events.put_nowait(DISCONNECT)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self.abort_soon()

    # -- results ---------------------------------------------------------------------------------
    async def wait_all(self) -> bool:
        """Until every choice finished (True) or the client went away (False)."""
        pending = len(self.handles)
        while pending:
            ev = await self.events.get()
            if ev is DISCONNECT:
                return False
            pending -= bool(ev[2])
        return True

    async def finish(self) -> bool:
        """Wait for all choices; False if the client went away. Raises the failure of a failed choice."""
        try:
            ok = await self.wait_all()
        finally:
            self.close()
        if ok and (err := self.failure()) is not None:
            raise err
        return ok

    def failure(self) -> Optional[ApiError]:
        for h in self.handles:
            if h.finish_reason == "error":
                return ApiError(500, f"the engine failed on this request: {h.error or 'internal error'}")
            if h.finish_reason == "abort":
                return ApiError(503, "the request was dropped before it could finish (the server is overloaded)")
        return None

    def usage(self, n: int) -> dict:
        """Token counts; `n` choices per prompt, each prompt counted once."""
        prompt_tokens = sum(h.num_prompt_tokens for h in self.handles[::n])
        completion = sum(h.num_output_tokens for h in self.handles)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"  # ASCII-escaped: no raw line breaks in an event


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_events(events: list) -> StreamingResponse:
    """An SSE body of events known in advance, then [DONE]."""
    async def body():
        for ev in events:
            yield _sse(ev)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)


def sse_response(gen: Generation, chunk: Callable, head: Optional[Callable],
                 usage: Optional[Callable]) -> StreamingResponse:
    """SSE body: `head(i)` once per choice first, then `chunk(i, delta, finish_reason, logprobs)`, then usage,
    [DONE]."""

    async def body():
        try:
            if head is not None:
                for i in range(len(gen.handles)):
                    if (first := head(i)) is not None:
                        yield _sse(first)
            pending = len(gen.handles)
            while pending:
                ev = await gen.events.get()
                if ev is DISCONNECT:
                    return
                idx, delta, finished, lps = ev
                if not finished:  # one chunk per token, even one whose text is held back (partial UTF-8)
                    yield _sse(chunk(idx, delta, None, lps))
                    continue
                pending -= 1
                handle = gen.handles[idx]
                if handle.finish_reason in ("error", "abort"):
                    # the status line is long gone: the error travels as an event, as OpenAI's API does
                    err = gen.failure()
                    yield _sse(error_body(err.status, err.message))
                    yield b"data: [DONE]\n\n"
                    return
                yield _sse(chunk(idx, delta, handle.finish_reason, lps))
            if usage is not None:
                yield _sse(usage())
            yield b"data: [DONE]\n\n"
        finally:
            gen.close()

    return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)
