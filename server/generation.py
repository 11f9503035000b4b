"""POST /v1/completions and /v1/chat/completions: one request path, two response shapes.

Each route only turns its body into a `Job` (the adapter, one prompt and one `SamplingParams` per
choice); `respond` runs any job, streamed as SSE or answered whole. What differs between the two
endpoints' responses (object names, choice shapes and their logprobs, the first chunk) is an `Endpoint`.

Log-probabilities come from the engine per token (`TokenLogprob`, computed on the device); only their
shape is made here: OpenAI's legacy one for completions (tokens, token_logprobs, top_logprobs as
{token: logprob}, text_offset), the `content` list for chat. A token's text is the token decoded alone;
-inf (a token a grammar forbids) is sent as -9999.0, as vLLM does, since JSON has no infinity.
Completions with `echo` and `logprobs` also carry the prompt's own log-probabilities (the first null):
`LLM.prompt_logprobs`, one forward through the serving path, before the generation; with `max_tokens`
0 nothing is generated (how evaluation harnesses score a text's likelihood).
"""
from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Callable, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from slora_jax import SamplingParams

from .chat import request_messages
from .errors import ERROR_DOCS, ApiError
from .protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut, CompletionChoice,
                       CompletionRequest, CompletionResponse, Usage)
from .state import ServerState, state
from .streaming import sse_events, sse_response

LOGPROB_FLOOR = -9999.0  # what JSON carries for -inf

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
    logprobs: Optional[int] = None  # the response carries log-probabilities, with this many top ones per token
    prompt_logprobs: Optional[list] = None  # echo + logprobs: per prompt, [(token id, TokenLogprob or None)]
    generate: bool = True  # False: echo with max_tokens 0, the prompt alone
    text_of: Callable = str  # token id -> its text (ServerState.token_text)
    offsets: dict = dataclasses.field(default_factory=dict)  # completions streaming: choice -> next text_offset


def _finite(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


def completion_logprobs(job: Job, pairs: list, offset: int) -> tuple[dict, int]:
    """OpenAI's legacy logprobs of (token id, TokenLogprob or None) pairs, text offsets from `offset`; the
    offset after them. The sampled token is among its position's top_logprobs, as vLLM shows it."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, e in pairs:
        text = job.text_of(tok)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        lp = _finite(e.logprob)
        top: dict = {}
        for i, v in e.top:  # most likely first: tokens of one text keep the likeliest's
            top.setdefault(job.text_of(i), _finite(v))
        top.setdefault(text, lp)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(top)
    return out, offset


def chat_logprobs(job: Job, entries: list) -> dict:
    def one(tok: int, lp: float) -> dict:
        text = job.text_of(tok)
        return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(i, v) for i, v in e.top]}
                        for e in entries]}


class Endpoint:
    """The response shapes of one endpoint. `lps`: the TokenLogprobs of the tokens a delta or choice holds
    (None unless the job asked for logprobs)."""

    name = prefix = object = chunk_object = ""

    def head(self, i: int, job: Job) -> Optional[dict]:
        """The first streamed choice of choice i, if the endpoint sends one."""
        return None

    def delta(self, i: int, job: Job, text: str, finish_reason: Optional[str], lps: Optional[list]) -> dict:
        raise NotImplementedError

    def choice(self, i: int, job: Job, text: str, finish_reason: Optional[str], lps: Optional[list]):
        raise NotImplementedError

    def response(self, **fields):
        raise NotImplementedError


class Completions(Endpoint):
    name, prefix, object, chunk_object = "completions", "cmpl", "text_completion", "text_completion"

    def _prompt_part(self, i: int, job: Job) -> tuple[str, Optional[dict], int]:
        """(echoed text, the prompt's logprobs, the text offset after them) of choice i."""
        if not job.echo:
            return "", None, 0
        text = job.echo[i // job.n]
        if job.prompt_logprobs is None:
            return text, None, 0
        lp, offset = completion_logprobs(job, job.prompt_logprobs[i // job.n], 0)
        return text, lp, offset

    def head(self, i, job):
        if not job.echo:
            return None
        text, lp, job.offsets[i] = self._prompt_part(i, job)
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": None}

    def delta(self, i, job, text, finish_reason, lps):
        lp = None
        if job.logprobs is not None:
            lp, job.offsets[i] = completion_logprobs(job, [(e.token_id, e) for e in lps or ()], job.offsets.get(i, 0))
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish_reason}

    def choice(self, i, job, text, finish_reason, lps):
        echoed, lp, offset = self._prompt_part(i, job)
        if job.logprobs is not None:
            more, _ = completion_logprobs(job, [(e.token_id, e) for e in lps or ()], offset)
            lp = more if lp is None else {k: lp[k] + more[k] for k in lp}
        return CompletionChoice(index=i, text=echoed + text, logprobs=lp, finish_reason=finish_reason)

    def response(self, **fields):
        return CompletionResponse(**fields)


class Chat(Endpoint):
    name, prefix, object, chunk_object = "chat", "chatcmpl", "chat.completion", "chat.completion.chunk"

    def head(self, i, job):
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, i, job, text, finish_reason, lps):
        return {"index": i, "delta": {"content": text} if text or finish_reason is None else {},
                "logprobs": None if job.logprobs is None else chat_logprobs(job, lps or []),
                "finish_reason": finish_reason}

    def choice(self, i, job, text, finish_reason, lps):
        return ChatChoice(index=i, message=ChatMessageOut(content=text), finish_reason=finish_reason,
                          logprobs=None if job.logprobs is None else chat_logprobs(job, lps or []))

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
    if not job.generate:
        return echo_only(job)
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
        return sse_response(gen, lambda i, text, reason, lps: chunk([ep.delta(i, job, text, reason, lps)]), head,
                            usage)
    if not await gen.finish():
        return Response(status_code=499)  # nobody is listening
    outs = [h.output() for h in gen.handles]
    choices = [ep.choice(i, job, o.text, o.finish_reason, o.logprobs) for i, o in enumerate(outs)]
    return JSONResponse(ep.response(id=gen.id, created=gen.created, model=job.model, choices=choices,
                                    usage=Usage(**gen.usage(job.n))).model_dump())


def echo_only(job: Job) -> Response:
    """Completions with echo and max_tokens 0: each choice is its prompt (and its logprobs), nothing generated."""
    ep, rid, created = job.endpoint, f"{job.endpoint.prefix}-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = sum(len(p) for p in job.prompts[::job.n])
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
    if not job.stream:
        choices = [ep.choice(i, job, "", "length", []) for i in range(len(job.prompts))]
        return JSONResponse(ep.response(id=rid, created=created, model=job.model, choices=choices,
                                        usage=Usage(**usage)).model_dump())

    def chunk(choices: list, **extra) -> dict:
        return {"id": rid, "object": ep.chunk_object, "created": created, "model": job.model, "choices": choices,
                **extra}

    events = [chunk([ep.head(i, job)]) for i in range(len(job.prompts))]
    events += [chunk([ep.delta(i, job, "", "length", [])]) for i in range(len(job.prompts))]
    return sse_events(events + ([chunk([], usage=usage)] if job.include_usage else []))


@router.post("/v1/completions", response_model=CompletionResponse, responses={200: _SSE_DOC, **ERROR_DOCS})
async def completions(body: CompletionRequest, request: Request, srv: ServerState = Depends(state)):
    refuse_unsupported(body)
    adapter = await srv.resolve_model(body.model)
    ids, texts = await run_in_threadpool(srv.tokenize_prompts, body.prompt)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens must be >= 1 (0 only with echo: the prompt alone)", param="max_tokens")
    samplings = srv.samplings(body, len(ids), max_tokens or 1, body.logprobs)  # 0: checked, not run
    echo = [t if t is not None else srv.llm.decode(p) for p, t in zip(ids, texts)] if body.echo else None
    prompt_logprobs = None
    if body.echo:
        # the same checks as a submitted request's, before a forward is spent on the prompt's logprobs
        check = samplings[0] if max_tokens else SamplingParams(max_tokens=1)
        for p in ids:
            srv.llm.check_request(p, check, adapter)
        if body.logprobs is not None:
            prompt_logprobs = await run_in_threadpool(
                lambda: [list(zip(p, srv.llm.prompt_logprobs(p, adapter, body.logprobs))) for p in ids])
    job = Job(COMPLETIONS, body.model or srv.base_name, adapter, [p for p in ids for _ in range(body.n)], samplings,
              body.n, body.stream, bool(body.stream_options and body.stream_options.include_usage), echo,
              body.logprobs, prompt_logprobs, generate=max_tokens > 0, text_of=srv.token_text)
    return await respond(srv, request, job)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={200: _SSE_DOC, **ERROR_DOCS})
async def chat_completions(body: ChatCompletionRequest, request: Request, srv: ServerState = Depends(state)):
    refuse_unsupported(body)
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    adapter = await srv.resolve_model(body.model)
    ids = await run_in_threadpool(srv.llm.apply_chat_template, request_messages(body.messages))
    max_tokens = next((m for m in (body.max_completion_tokens, body.max_tokens) if m is not None),
                      max(1, srv.max_model_len - len(ids)))  # default: up to the end of the context, as vLLM
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    job = Job(CHAT, body.model or srv.base_name, adapter, [ids] * body.n, srv.samplings(body, 1, max_tokens, logprobs),
              body.n, body.stream, bool(body.stream_options and body.stream_options.include_usage),
              logprobs=logprobs, text_of=srv.token_text)
    return await respond(srv, request, job)
