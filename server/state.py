"""What every route shares: the served `LLM` and its names, the metrics, and request fields -> engine inputs.

`ServerState` resolves the adapter a request's `model` names (loading it from --adapter-dir on first
use), turns OpenAI prompts and sampling fields into token ids and `SamplingParams`, confines adapter
paths to --adapter-dir, and describes the base model and adapters as OpenAI model cards (which never
show a server path). Whether a request can run (lengths, ranges, vocabulary) is slora_jax's check,
raised as its typed errors when the request is submitted.
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import time
from typing import Optional, Sequence, Union

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from slora_jax import LLM, AdapterExists, AdapterNotFound, SamplingParams, SloraError

from .errors import ApiError
from .metrics import Metrics
from .protocol import ADAPTER_NAME_PATTERN, ModelCard
from .streaming import Dispatcher, Generation

BASE_ALIAS = "base"  # a `model` that names the base model whatever it is called
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ServerState:
    def __init__(self, llm: LLM, adapter_dir: Optional[str] = None,
                 served_model_name: Union[None, str, Sequence[str]] = None):
        self.llm = llm
        names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
        self.base_name = names[0] if names else llm.model_name
        self.base_names = {self.base_name, *names, BASE_ALIAS}
        self.adapter_dir = os.path.realpath(adapter_dir) if adapter_dir else None
        self.metrics = Metrics(llm.stats, lambda: llm.is_running)
        self.created = int(time.time())
        self._dispatcher: Optional[Dispatcher] = None
        self._removed: set = set()  # names unloaded by a route: not loaded on first use again (until a route loads them)

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    def generation(self, endpoint: str, prefix: str) -> Generation:
        """A new HTTP request's engine requests; on the event loop that serves it."""
        loop = asyncio.get_running_loop()
        if self._dispatcher is None or self._dispatcher.loop is not loop:  # one dispatcher per loop
            self._dispatcher = Dispatcher(loop)
        return Generation(self.llm, self.metrics, self._dispatcher, endpoint, prefix)

    # -- models ----------------------------------------------------------------------------------
    def is_base(self, name: Optional[str]) -> bool:
        return name is None or name in self.base_names

    async def resolve_model(self, name: Optional[str]) -> Optional[str]:
        """The adapter a request's `model` names (None: the base model); an adapter dir of that name
        under --adapter-dir is loaded on first use."""
        if self.is_base(name):
            return None
        if self.llm.has_adapter(name):
            return name
        path = self._lazy_adapter_path(name)
        if path is None:
            raise AdapterNotFound(f"The model {name!r} does not exist: use {self.base_name!r} (or 'base') or a "
                                  "registered adapter (GET /v1/models).", "model")
        try:
            await self.load_adapter(name, path, name)
        except AdapterExists:  # another request loaded it meanwhile
            pass
        return name

    def _lazy_adapter_path(self, name: str) -> Optional[str]:
        """--adapter-dir/<name> if it is an adapter dir there (a plain name: no path, no way out)."""
        if self.adapter_dir is None or name in self._removed or not re.match(ADAPTER_NAME_PATTERN, name):
            return None
        try:
            real = self.adapter_path(name)
        except ApiError:  # a link that leads outside: not servable
            return None
        return real if all(os.path.isfile(os.path.join(real, f)) for f in ADAPTER_FILES) else None

    async def load_adapter(self, name: str, real: str, shown: str, replace: bool = False) -> None:
        """Register the PEFT dir at `real`; errors name it as `shown` (the client's path), never the real one."""
        try:
            await run_in_threadpool(self.llm.load_adapter, name, real, replace)
        except SloraError as e:
            e.args = (e.message.replace(real, shown),)
            raise
        self._removed.discard(name)

    async def remove_adapter(self, name: str) -> None:
        """Unregister it; its name is no longer loaded from --adapter-dir on first use."""
        await run_in_threadpool(self.llm.remove_adapter, name)
        self._removed.add(name)

    def model_cards(self, adapters: list) -> list:
        """The base model's card, then one per adapter (as `LLM.adapters()` describes them)."""
        cards = [ModelCard(id=self.base_name, created=self.created, root=self.base_name,
                           max_model_len=self.max_model_len)]
        for a in adapters:
            cards.append(ModelCard(id=a["name"], created=self.created, root=self.base_name, parent=self.base_name,
                                   max_model_len=self.max_model_len, rank=a["max_rank"],
                                   ranks={k: int(v) for k, v in a["ranks"].items()}, resident=bool(a["resident"])))
        return cards

    # -- prompts and sampling --------------------------------------------------------------------
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
                ids.append(self.llm.encode(item))
                texts.append(item)
            else:
                ids.append([int(t) for t in item])
                texts.append(None)
        return ids, texts

    def samplings(self, body, n_prompts: int, max_tokens: int, logprobs: Optional[int] = None) -> list:
        """One `SamplingParams` per choice (`body.n` per prompt); choice j of a seeded request gets seed + j.
        InvalidRequest (from SamplingParams) for a value out of range."""
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stop = tuple(s for s in stop if s)
        structure = self.structure(body.response_format)
        return [SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                               top_p=1.0 if body.top_p is None else body.top_p, top_k=min(body.top_k or 0, self.llm.vocab_size),
                               seed=None if body.seed is None else body.seed + j, stop=stop,
                               stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                               logprobs=logprobs, **structure)
                for _ in range(n_prompts) for j in range(body.n)]

    @staticmethod
    def structure(fmt) -> dict:
        """`SamplingParams` fields of an OpenAI `response_format`."""
        if fmt is None or fmt.type == "text":
            return {}
        if fmt.type == "json_object":
            return {"json_object": True}
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ApiError(400, "response_format of type json_schema needs json_schema.schema", param="response_format")
        return {"json_schema": json.dumps(fmt.json_schema.schema_)}

    @functools.lru_cache(maxsize=1 << 16)
    def token_text(self, token_id: int) -> str:
        """A token's text as logprobs show it: the token decoded alone."""
        return self.llm.decode([token_id])

    # -- adapters --------------------------------------------------------------------------------
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
        for name in ADAPTER_FILES:  # a symlinked file could point anywhere
            f = os.path.join(real, name)
            if os.path.lexists(f) and not inside(os.path.realpath(f)):
                raise outside
        return real


def state(request: Request) -> ServerState:
    """The app's `ServerState` (a route dependency)."""
    return request.app.state.server
