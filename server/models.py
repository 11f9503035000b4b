"""Models and adapters: OpenAI's /v1/models, our /v1/adapters, and vLLM's load/unload_lora_adapter.

Adapters load only from inside --adapter-dir (paths relative to it, or absolute inside it; links
that lead out are refused), and no response or error shows where a path resolved to.
"""
from __future__ import annotations

import os

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from .errors import ERROR_DOCS, ApiError
from .protocol import AdapterDeleted, AdapterLoadRequest, LoraLoadRequest, LoraUnloadRequest, ModelCard, ModelList
from .state import ServerState, state

router = APIRouter()

# vLLM answers these routes in plain text (errors stay JSON)
_TEXT_DOC = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Success"}, **ERROR_DOCS}


@router.get("/v1/models", response_model=ModelList, responses=ERROR_DOCS)
async def list_models(srv: ServerState = Depends(state)):
    return ModelList(data=srv.model_cards(await run_in_threadpool(srv.llm.adapters)))


@router.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERROR_DOCS)
async def get_model(model_id: str, srv: ServerState = Depends(state)):
    if srv.is_base(model_id):
        return srv.model_cards([])[0]
    name = await srv.resolve_model(model_id)
    return srv.model_cards([await run_in_threadpool(srv.llm.adapter, name)])[1]


async def _load(srv: ServerState, name: str, path: str, replace: bool) -> None:
    real = srv.adapter_path(path)
    if not os.path.isdir(real):
        raise ApiError(404, f"no adapter directory at {path!r} under the adapter directory", param="path",
                       code="adapter_not_found")
    if srv.is_base(name):
        raise ApiError(409, f"{name!r} names the base model", param="name")
    await srv.load_adapter(name, real, path, replace)


async def _unload(srv: ServerState, name: str) -> None:
    if srv.is_base(name):
        raise ApiError(400, "the base model cannot be removed", param="name")
    await srv.remove_adapter(name)


@router.post("/v1/adapters", response_model=ModelCard, responses=ERROR_DOCS)
async def load_adapter(body: AdapterLoadRequest, srv: ServerState = Depends(state)):
    await _load(srv, body.name, body.path, body.replace)
    return srv.model_cards([await run_in_threadpool(srv.llm.adapter, body.name)])[1]


@router.delete("/v1/adapters/{name}", response_model=AdapterDeleted, responses=ERROR_DOCS)
async def delete_adapter(name: str, srv: ServerState = Depends(state)):
    await _unload(srv, name)
    return AdapterDeleted(id=name)


@router.post("/v1/load_lora_adapter", response_model=None, responses=_TEXT_DOC)
async def load_lora_adapter(body: LoraLoadRequest, srv: ServerState = Depends(state)):
    """vLLM's route: as POST /v1/adapters {name: lora_name, path: lora_path}."""
    await _load(srv, body.lora_name, body.lora_path, replace=False)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_model=None, responses=_TEXT_DOC)
async def unload_lora_adapter(body: LoraUnloadRequest, srv: ServerState = Depends(state)):
    """vLLM's route: as DELETE /v1/adapters/{lora_name}."""
    await _unload(srv, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
