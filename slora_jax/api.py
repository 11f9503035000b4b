"""The Python API: `LLM`, `SamplingParams`, `RequestOutput` (DESIGN.md section 6)."""
from __future__ import annotations

import logging
import os
import queue
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from . import parallel
from .adapters.lora import AdapterError, from_pytree
from .adapters.peft import load_peft_adapter
from .config import EngineConfig, load_model_config, resolve_preset
from .engine.engine import Engine
from .engine.request import RequestError, RequestOutput, SamplingParams
from .model.weights import dtype_of, load_hf_checkpoint, random_model, restore_params
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int]]


class LLM:
    """A base Llama plus any number of LoRA adapters, served from one unified device pool.

    `model` is a preset name or file from configs/ (random weights of that shape,
    unless `params` names an orbax checkpoint) or an HF Llama checkpoint dir. `tp` > 1 splits the
    model and the pool over that many devices (tensor parallelism; `devices` picks them).
    """

    def __init__(self, model: str = "tiny", tp: int = 1, max_rank: Optional[int] = None,
                 dtype: Optional[str] = None, kernels: Optional[str] = None, seed: int = 0,
                 params: Optional[str] = None, devices: Optional[Sequence] = None, **engine_overrides):
        path = resolve_preset(model)
        self.model_cfg, preset_engine = load_model_config(path)
        # precedence: explicit arguments > the preset's "engine" section > EngineConfig defaults
        explicit = {"max_rank": max_rank, "dtype": dtype, "kernels": kernels, "seed": seed, "tp": tp,
                    **engine_overrides}
        explicit = {k: v for k, v in explicit.items() if v is not None}
        self.engine_cfg = EngineConfig().replace(**{**preset_engine, **explicit})
        parallel.check_tp(self.model_cfg, self.engine_cfg.tp)  # before loading any weights
        tp = self.engine_cfg.tp
        mesh = parallel.make_mesh(self.model_cfg, tp, devices) if tp > 1 else None
        jdtype = dtype_of(self.engine_cfg.dtype)
        if params is not None:
            net = restore_params(params, self.model_cfg, jdtype, mesh)
        elif os.path.isdir(path):
            net = load_hf_checkpoint(path, self.model_cfg, jdtype, mesh)
        else:
            net = random_model(self.model_cfg, jdtype, seed, mesh)
        self.tokenizer = load_tokenizer(path, self.model_cfg.bos_token_id, self.model_cfg.eos_token_ids)
        self.engine = Engine(self.model_cfg, self.engine_cfg, net, self.tokenizer, mesh)

    # -- adapters --------------------------------------------------------------------
    def load_adapter(self, name: str, path: str, replace: bool = False) -> None:
        """Register a PEFT LoRA dir (adapter_config.json + adapter_model.safetensors)."""
        lw = load_peft_adapter(name, path, self.model_cfg, self.engine_cfg.max_rank)
        self.engine.add_adapter(lw, replace=replace)

    def add_adapter(self, name: str, lora_params: dict, alpha: Optional[float] = None, replace: bool = False) -> None:
        """Register `{"<layer>.<module>": (A [in, r], B [r, out])}`; scaling = alpha / r (alpha defaults to r)."""
        self.engine.add_adapter(from_pytree(name, lora_params, self.model_cfg, alpha), replace=replace)

    def add_synthetic_adapters(self, names, rank: int, modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                               seed: int = 0, shared: bool = False) -> None:
        """Random adapters without disk, for benchmarks (`shared`: all alias one host buffer)."""
        self.engine.add_synthetic_adapters(names, rank, modules, seed, shared=shared)

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def adapters(self) -> list:
        eng = self.engine
        with eng._lock:
            return [{"name": e.name, "ranks": dict(e.ranks), "max_rank": e.max_rank, "source": e.source,
                     "resident": eng.cache.is_resident(e.name)} for e in (eng.store.get(n) for n in eng.store.names())]

    # -- generation ------------------------------------------------------------------
    def _ids(self, prompt: Prompt) -> list:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompts: Union[Prompt, list], adapter: Union[None, str, list] = None,
                 sampling: Optional[SamplingParams] = None) -> list:
        """Outputs in input order. A request that cannot run (unknown adapter, prompt too long)
        gets finish_reason "error" and a message; the others run."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        plist = [prompts] if single else list(prompts)
        adapters = adapter if isinstance(adapter, (list, tuple)) else [adapter] * len(plist)
        if len(adapters) != len(plist):
            raise ValueError(f"{len(plist)} prompts but {len(adapters)} adapters")
        sampling = sampling or SamplingParams()
        outs: list = [None] * len(plist)
        reqs = []
        for i, (p, a) in enumerate(zip(plist, adapters)):
            ids = self._ids(p)
            try:
                reqs.append((i, self.engine.add_request(ids, a, sampling)))
            except (AdapterError, RequestError) as e:
                outs[i] = RequestOutput(f"rejected-{i}", ids, [], "", "error", a, str(e))
        self.engine.run_until_done([r for _, r in reqs])
        for i, r in reqs:
            outs[i] = r.output()
        return outs

    def stream(self, prompt: Prompt, adapter: Optional[str] = None,
               sampling: Optional[SamplingParams] = None) -> Iterator[str]:
        """Text deltas as they are generated (drives the engine itself unless it runs in the background)."""
        q: queue.Queue = queue.Queue()
        req = self.engine.add_request(self._ids(prompt), adapter, sampling or SamplingParams(),
                                      listener=lambda r, delta: q.put((delta, r.finished)))
        background = self.engine._thread is not None
        done = False
        while not done:
            if not background and q.empty():
                self.engine.step()
                continue
            delta, done = q.get()
            if delta:
                yield delta
        if req.error:
            raise RequestError(req.error)

    def logits(self, token_ids: Prompt, adapter: Optional[str] = None) -> np.ndarray:
        """[len, vocab] float32 logits through the serving path (pool, pages, kernels)."""
        return self.engine.logits(self._ids(token_ids), adapter)

    def stats(self) -> dict:
        return self.engine.stats()
