"""Operations and utilities: /health, /metrics (Prometheus), and vLLM's /version, /tokenize, /detokenize."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

import slora_jax
from slora_jax import InvalidRequest

from .chat import request_messages
from .errors import ERROR_DOCS, ApiError
from .metrics import CONTENT_TYPE
from .protocol import (DetokenizeRequest, DetokenizeResponse, ErrorResponse, Health, TokenizeRequest,
                       TokenizeResponse, Version)
from .state import ServerState, state

router = APIRouter()


@router.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
async def health(srv: ServerState = Depends(state)):
    if not srv.llm.is_running:
        raise ApiError(503, srv.llm.failure or "the engine loop is not running")
    return Health(status="ok")


@router.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                         "description": "Prometheus text format"}, **ERROR_DOCS})
async def metrics(srv: ServerState = Depends(state)):
    return Response(await run_in_threadpool(srv.metrics.render), media_type=CONTENT_TYPE)


@router.get("/version", response_model=Version, responses=ERROR_DOCS)
async def version():
    return Version(version=slora_jax.__version__)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_DOCS)
async def tokenize(body: TokenizeRequest, srv: ServerState = Depends(state)):
    """A prompt (BOS first unless add_special_tokens is false) or chat messages (the chat template's ids)."""
    await srv.resolve_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "send exactly one of `prompt` and `messages`", param="prompt")
    if body.prompt is not None:
        ids = await run_in_threadpool(srv.llm.encode, body.prompt, body.add_special_tokens is not False)
    else:
        ids = await run_in_threadpool(srv.llm.apply_chat_template, request_messages(body.messages),
                                      body.add_generation_prompt)
    return TokenizeResponse(count=len(ids), max_model_len=srv.max_model_len, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_DOCS)
async def detokenize(body: DetokenizeRequest, srv: ServerState = Depends(state)):
    await srv.resolve_model(body.model)
    bad = next((t for t in body.tokens if not 0 <= t < srv.llm.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary (size {srv.llm.vocab_size})", "tokens")
    return DetokenizeResponse(prompt=await run_in_threadpool(srv.llm.decode, body.tokens))
