"""POST /v1/completions and /v1/chat/completions: one request path, two response shapes.

Each route only turns its body into a `Job` (the adapter, one prompt and one `SamplingParams` per
choice); `respond` runs any job, streamed as SSE or answered whole. What differs between the two
endpoints' responses (object names, choice shapes, the first chunk) is an `Endpoint`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .chat import request_messages
from .errors import ERROR_DOCS, ApiError
from .protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut, CompletionChoice,
                       CompletionRequest, CompletionResponse, Usage)
from .state import ServerState, state
from .streaming import sse_response

router = APIRouter()

_SSE_EVENT = {"type": "object", "required": ["data"], "description": "One server-sent event",
              "properties": {"data": {"type": "string", "description": "A JSON chunk, or [DONE] at the end."}}}
_SSE_DOC = {"content": {"text/event-stream": {"schema": _SSE_EVENT}}, "description": "JSON, or SSE when stream"}


@dataclasses.dataclass
class Job:
    """One HTTP generation request as the engine runs it."""

    endpoint: "Endpoint"
    model: str  # echoed in the response
    adapter: Optional[str]
    prompts: list  # token ids, one list per choice (n per prompt)
    samplings: list  # SamplingParams, one per choice
    n: int
    stream: bool
    include_usage: bool
    echo: Optional[list] = None  # completions with echo: the text of each prompt


class Endpoint:
    """The response shapes of one endpoint."""

    name = prefix = object = chunk_object = ""

    def head(self, i: int, job: Job) -> Optional[dict]:
        """The first streamed choice of choice i, if the endpoint sends one."""
        return None

    def delta(self, i: int, text: str, finish_reason: Optional[str]) -> dict:
        raise NotImplementedError

    def choice(self, i: int, job: Job, text: str, finish_reason: Optional[str]):
        raise NotImplementedError

    def response(self, **fields):
        raise NotImplementedError


class Completions(Endpoint):
    name, prefix, object, chunk_object = "completions", "cmpl", "text_completion", "text_completion"

    def head(self, i, job):
        return self.delta(i, job.echo[i // job.n], None) if job.echo else None

    def delta(self, i, text, finish_reason):
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def choice(self, i, job, text, finish_reason):
        return CompletionChoice(index=i, text=(job.echo[i // job.n] if job.echo else "") + text,
                                finish_reason=finish_reason)

    def response(self, **fields):
        return CompletionResponse(**fields)


class Chat(Endpoint):
    name, prefix, object, chunk_object = "chat", "chatcmpl", "chat.completion", "chat.completion.chunk"

    def head(self, i, job):
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, i, text, finish_reason):
        return {"index": i, "delta": {"content": text} if text or finish_reason is None else {}, "logprobs": None,
                "finish_reason": finish_reason}

    def choice(self, i, job, text, finish_reason):
        return ChatChoice(index=i, message=ChatMessageOut(content=text), finish_reason=finish_reason)

    def response(self, **fields):
        return ChatCompletionResponse(**fields)


COMPLETIONS, CHAT = Completions(), Chat()


def refuse_unsupported(body) -> None:
    bad = body.unsupported()
    if bad is not None:
        field, accepted = bad
        raise ApiError(400, f"`{field}` is not supported (accepted: {accepted})", param=field)


async def respond(srv: ServerState, request: Request, job: Job) -> Response:
    """Run a job: SSE chunks as tokens come when streaming, else one JSON response at the end."""
    ep = job.endpoint
    gen = srv.generation(ep.name, ep.prefix)
    await gen.start(request, job.prompts, job.adapter, job.samplings)

    def chunk(choices: list, **extra) -> dict:
        return {"id": gen.id, "object": ep.chunk_object, "created": gen.created, "model": job.model,
                "choices": choices, **extra}

    if job.stream:
        def head(i: int) -> Optional[dict]:
            first = ep.head(i, job)
            return None if first is None else chunk([first])

        usage = (lambda: chunk([], usage=gen.usage(job.n))) if job.include_usage else None
        return sse_response(gen, lambda i, text, reason: chunk([ep.delta(i, text, reason)]), head, usage)
    if not await gen.finish():
        return Response(status_code=499)  # nobody is listening
    outs = [h.output() for h in gen.handles]
    choices = [ep.choice(i, job, o.text, o.finish_reason) for i, o in enumerate(outs)]
    return JSONResponse(ep.response(id=gen.id, created=gen.created, model=job.model, choices=choices,
                                    usage=Usage(**gen.usage(job.n))).model_dump())


@router.post("/v1/completions", response_model=CompletionResponse, responses={200: _SSE_DOC, **ERROR_DOCS})
async def completions(body: CompletionRequest, request: Request, srv: ServerState = Depends(state)):
    refuse_unsupported(body)
    adapter = await srv.resolve_model(body.model)
    ids, texts = await run_in_threadpool(srv.tokenize_prompts, body.prompt)
    echo = [t if t is not None else srv.llm.decode(p) for p, t in zip(ids, texts)] if body.echo else None
    job = Job(COMPLETIONS, body.model or srv.base_name, adapter, [p for p in ids for _ in range(body.n)],
              srv.samplings(body, len(ids), 16 if body.max_tokens is None else body.max_tokens), body.n, body.stream,
              bool(body.stream_options and body.stream_options.include_usage), echo)
    return await respond(srv, request, job)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={200: _SSE_DOC, **ERROR_DOCS})
async def chat_completions(body: ChatCompletionRequest, request: Request, srv: ServerState = Depends(state)):
    refuse_unsupported(body)
    adapter = await srv.resolve_model(body.model)
    ids = await run_in_threadpool(srv.llm.apply_chat_template, request_messages(body.messages))
    max_tokens = next((m for m in (body.max_completion_tokens, body.max_tokens) if m is not None),
                      max(1, srv.max_model_len - len(ids)))  # default: up to the end of the context, as vLLM
    job = Job(CHAT, body.model or srv.base_name, adapter, [ids] * body.n, srv.samplings(body, 1, max_tokens),
              body.n, body.stream, bool(body.stream_options and body.stream_options.include_usage))
    return await respond(srv, request, job)
