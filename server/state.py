"""What every route shares: the served `LLM` and its limits, the metrics, and the checks on request fields.

`ServerState` turns the fields of a request into engine inputs (the adapter a
`model` names, prompt token ids, sampling parameters, an adapter directory
inside --adapter-dir), raising `ApiError` for anything the engine would refuse,
and describes the base model and adapters as OpenAI model cards.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Optional

from slora_jax.engine.request import RequestError, SamplingParams

from .errors import ApiError
from .metrics import Metrics
from .protocol import ModelCard
from .streaming import Dispatcher, Generation

BASE_ALIAS = "base"  # a `model` that names the base model whatever it is called


class ServerState:
    def __init__(self, llm, adapter_dir: Optional[str]):
        self.llm, self.engine = llm, llm.engine
        self.base_name = llm.model_cfg.name
        self.adapter_dir = os.path.realpath(adapter_dir) if adapter_dir else None
        self.max_model_len = llm.engine_cfg.max_model_len
        self.vocab_size = llm.model_cfg.vocab_size
        self.metrics = Metrics()
        self.created = int(time.time())
        self._dispatcher: Optional[Dispatcher] = None

    def generation(self, endpoint: str, prefix: str) -> Generation:
        """A new HTTP request's engine requests; on the event loop that serves it."""
        loop = asyncio.get_running_loop()
        if self._dispatcher is None or self._dispatcher.loop is not loop:  # one dispatcher per loop
            self._dispatcher = Dispatcher(loop)
        return Generation(self.engine, self.metrics, self._dispatcher, endpoint, prefix)

    # -- models ----------------------------------------------------------------------------------
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

    def model_cards(self, adapters: list) -> list:
        """The base model's card, then one per adapter (as `LLM.adapters()` describes them)."""
        cards = [ModelCard(id=self.base_name, created=self.created, root=self.base_name,
                           max_model_len=self.max_model_len)]
        for a in adapters:
            cards.append(ModelCard(id=a["name"], created=self.created, root=self.base_name, parent=self.base_name,
                                   max_model_len=self.max_model_len, rank=a["max_rank"],
                                   ranks={k: int(v) for k, v in a["ranks"].items()}, resident=bool(a["resident"]),
                                   source=a.get("source")))
        return cards

    # -- prompts and sampling --------------------------------------------------------------------
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

    def samplings(self, body, n_prompts: int, max_tokens: Optional[int], default_max: Optional[int]) -> list:
        """One `SamplingParams` per choice (`body.n` per prompt); choice j of a seeded request gets seed + j."""
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
        for name in ("adapter_config.json", "adapter_model.safetensors"):  # a symlinked file could point anywhere
            f = os.path.join(real, name)
            if os.path.lexists(f) and not inside(os.path.realpath(f)):
                raise outside
        return real
