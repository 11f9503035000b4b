"""The Python API: `LLM`, `SamplingParams`, `RequestOutput`, `RequestHandle` (docs/ARCHITECTURE.md, "Public interfaces").

`LLM` is the one face of the engine. Everything a front end needs is a public method here:
submitting a request and following its tokens (`submit`), aborting it, running the engine loop in
a background thread (`start`/`stop`), adapters, stats, the tokenizer and chat template, and the
checks a request must pass (raised as the typed errors of `slora_jax.errors`). The HTTP server uses
nothing else.
"""
from __future__ import annotations

import logging
import os
import queue
from typing import Callable, Iterator, Optional, Sequence, Union

import jax
import numpy as np

from . import parallel
from .adapters.lora import from_pytree
from .adapters.peft import load_peft_adapter
from .config import EngineConfig, load_model_config, resolve_preset
from .engine.multihost import Follower, Leader, engine_class
from .engine.request import RequestOutput, SamplingParams, check_request
from .errors import (AdapterError, AdapterExists, AdapterNotFound, ConfigError, InvalidRequest, RequestError,
                     RequestTooLong)
from .memory.pool import choose_num_pages
from .model.weights import dtype_of, load_hf_checkpoint, random_model, restore_params
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int]]
UpdateCallback = Callable[["RequestHandle", str], None]


class RequestHandle:
    """A submitted request as its submitter sees it: progress, result, abort.

    `LLM.submit(..., on_update=cb)` calls `cb(handle, text_delta)` on the engine thread after each
    generated token and once more when the request finishes (`handle.finished`); the callback must
    return quickly and never raise (hand the delta to another thread or event loop and return).
    """

    __slots__ = ("_req", "_engine")

    def __init__(self, engine):
        self._engine = engine
        self._req = None

    @property
    def id(self) -> str:
        return self._req.id

    @property
    def finished(self) -> bool:
        return self._req.finished

    @property
    def finish_reason(self) -> Optional[str]:
        """"stop" | "length" | "abort" | "error"; None while it runs."""
        return self._req.finish_reason

    @property
    def error(self) -> Optional[str]:
        return self._req.error

    @property
    def num_prompt_tokens(self) -> int:
        return len(self._req.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens the host has read so far."""
        return len(self._req.output_ids)

    @property
    def ttft_s(self) -> Optional[float]:
        """Seconds from arrival to the first generated token (None before it)."""
        r = self._req
        return None if r.first_token_time is None else r.first_token_time - r.arrival

    @property
    def latency_s(self) -> Optional[float]:
        """Seconds from arrival to the end (None while it runs)."""
        r = self._req
        return None if r.finish_time is None else r.finish_time - r.arrival

    def output(self) -> RequestOutput:
        """A snapshot: token ids and text so far, finish reason once finished."""
        return self._req.output()

    def logprobs_from(self, start: int) -> Optional[list]:
        """The TokenLogprob of each output token from `start` on (None if the request asked for none): what
        an `on_update` callback reads of the tokens since its last call."""
        lps = self._req.logprobs
        return None if lps is None else lps[start:]

    def abort(self) -> None:
        """Stop it and free its pages (waits for the engine step in progress)."""
        self._engine.abort(self._req.id)


class LLM:
    """A base Llama plus any number of LoRA adapters, served from one unified device pool.

    `model` is a preset name or file from configs/ (random weights of that shape, unless `params`
    names an orbax checkpoint) or an HF Llama checkpoint dir. `tp` > 1 splits the model and the pool
    over that many devices (tensor parallelism; `devices` picks them). `dtype` defaults to float32 on
    CPU and bfloat16 on accelerators; `max_model_len` to the model's max_position_embeddings, capped by
    what the pool can hold. `chat_template`: a jinja template's text, replacing the model dir's.
    """

    def __init__(self, model: str = "tiny", tp: int = 1, max_rank: Optional[int] = None,
                 dtype: Optional[str] = None, kernels: Optional[str] = None, seed: int = 0,
                 params: Optional[str] = None, devices: Optional[Sequence] = None,
                 chat_template: Optional[str] = None, **engine_overrides):
        path = resolve_preset(model)
        self.model_cfg, preset_engine = load_model_config(path)
        # precedence: explicit arguments > the preset's "engine" section > EngineConfig defaults
        explicit = {"max_rank": max_rank, "dtype": dtype, "kernels": kernels, "seed": seed, "tp": tp,
                    **engine_overrides}
        explicit = {k: v for k, v in explicit.items() if v is not None}
        ecfg = EngineConfig().replace(**{**preset_engine, **explicit})
        if ecfg.dtype == "auto":
            platform = devices[0].platform if devices else jax.default_backend()
            ecfg = ecfg.replace(dtype="float32" if platform == "cpu" else "bfloat16")
        parallel.check_tp(self.model_cfg, ecfg.tp)  # before loading any weights
        mesh = parallel.make_mesh(self.model_cfg, ecfg.tp, devices) if ecfg.tp > 1 else None
        jdtype = dtype_of(ecfg.dtype)
        if params is not None:
            net = restore_params(params, self.model_cfg, jdtype, mesh)
        elif os.path.isdir(path):
            net = load_hf_checkpoint(path, self.model_cfg, jdtype, mesh)
        else:
            net = random_model(self.model_cfg, jdtype, seed, mesh)
        self.engine_cfg = self._context_length(ecfg, jdtype)  # after the weights: the pool takes what is left
        self.tokenizer = load_tokenizer(path, self.model_cfg.bos_token_id, self.model_cfg.eos_token_ids, chat_template)
        # under jax.distributed: process 0's engine can lead the others, theirs can follow (lead() / follow())
        self.engine = engine_class()(self.model_cfg, self.engine_cfg, net, self.tokenizer, mesh)
        self.engine_cfg = self.engine.ecfg  # resolved: num_pages, and max_running when it was None

    def _context_length(self, ecfg: EngineConfig, jdtype) -> EngineConfig:
        """`max_model_len` unset: the model's max_position_embeddings, or less if the pool cannot hold one
        such sequence (the engine keeps one page spare)."""
        if ecfg.max_model_len is not None:
            return ecfg
        want = self.model_cfg.max_position_embeddings
        fits = (choose_num_pages(self.model_cfg, ecfg.replace(max_model_len=want), jdtype) - 1) * ecfg.page_rows
        if fits < want:
            log.warning("max_model_len %d: the pool holds no longer sequence (max_position_embeddings is %d)",
                        fits, want)
        return ecfg.replace(max_model_len=max(1, min(want, fits)))

    # -- the model ------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.model_cfg.name

    @property
    def max_model_len(self) -> int:
        """Prompt plus generated tokens of one request, at most."""
        return self.engine_cfg.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.model_cfg.vocab_size

    # -- the tokenizer ----------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in token_ids])

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> list:
        """Prompt token ids of a chat (dicts with role and content), as transformers' apply_chat_template.
        Raises InvalidRequest if the model has no template or the template refuses the messages."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)

    # -- adapters --------------------------------------------------------------------
    def load_adapter(self, name: str, path: str, replace: bool = False) -> None:
        """Register a PEFT LoRA dir (adapter_config.json + adapter_model.safetensors).
        Raises InvalidAdapter (the files), AdapterExists, AdapterInUse (replacing), CapacityError."""
        if not replace and self.has_adapter(name):  # before reading any file
            raise AdapterExists(f"adapter {name!r} is already registered (replace=True replaces it)", "name")
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
        """Raises AdapterNotFound, or AdapterInUse while unfinished requests use it."""
        self.engine.remove_adapter(name)

    def has_adapter(self, name: str) -> bool:
        return name in self.engine.store

    def adapters(self) -> list:
        """One dict per adapter: name, ranks (per module), max_rank, source, resident (in the device pool)."""
        eng = self.engine
        with eng._lock:
            return [{"name": e.name, "ranks": dict(e.ranks), "max_rank": e.max_rank, "source": e.source,
                     "resident": eng.cache.is_resident(e.name)} for e in (eng.store.get(n) for n in eng.store.names())]

    def adapter(self, name: str) -> dict:
        """`adapters()`'s dict of one adapter; AdapterNotFound if it is not registered."""
        eng = self.engine
        with eng._lock:
            if name not in eng.store:
                raise AdapterNotFound(f"adapter {name!r} is not registered", "name")
            e = eng.store.get(name)
            return {"name": e.name, "ranks": dict(e.ranks), "max_rank": e.max_rank, "source": e.source,
                    "resident": eng.cache.is_resident(e.name)}

    # -- requests ---------------------------------------------------------------------
    def _ids(self, prompt: Prompt) -> list:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def check_request(self, prompt: Prompt, sampling: Optional[SamplingParams] = None,
                      adapter: Optional[str] = None) -> list:
        """The prompt's token ids if a request could run as asked; else InvalidRequest, RequestTooLong
        (prompt plus max_tokens beyond max_model_len) or AdapterNotFound. `submit` runs the same checks."""
        ids = self._ids(prompt)
        check_request(ids, sampling or SamplingParams(), self.engine.limits)
        if adapter is not None and not self.has_adapter(adapter):
            raise AdapterNotFound(f"adapter {adapter!r} is not registered", "model")
        return ids

    def submit(self, prompt: Prompt, adapter: Optional[str] = None, sampling: Optional[SamplingParams] = None,
               request_id: Optional[str] = None, on_update: Optional[UpdateCallback] = None) -> RequestHandle:
        """Queue one request without waiting (thread-safe, never blocks on a running step) and return its
        handle; `on_update(handle, delta)` follows its tokens (see RequestHandle). The background loop
        (`start()`) or `generate`/`run_until_done` run it. Raises the checks' errors before queueing."""
        handle = RequestHandle(self.engine)
        listener = None
        if on_update is not None:
            def listener(req, delta: str) -> None:
                handle._req = req  # the first call may come before submit returns
                on_update(handle, delta)
        handle._req = self.engine.add_request(self._ids(prompt), adapter, sampling or SamplingParams(),
                                              request_id=request_id, listener=listener, clamp_length=False)
        return handle

    def abort(self, request_id: str) -> None:
        """Stop a request and free its pages; no-op if it already finished."""
        self.engine.abort(request_id)

    def generate(self, prompts: Union[Prompt, list], adapter: Union[None, str, list] = None,
                 sampling: Optional[SamplingParams] = None) -> list:
        """Outputs in input order. A request that cannot run (unknown adapter, prompt plus max_tokens
        beyond max_model_len, ...) gets finish_reason "error" and the message; the others run."""
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
                reqs.append((i, self.engine.add_request(ids, a, sampling, clamp_length=False)))
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
        handle = self.submit(prompt, adapter, sampling, on_update=lambda h, delta: q.put((delta, h.finished)))
        done = False
        while not done:
            if not self.engine.running and q.empty():
                self.engine.step()
                continue
            delta, done = q.get()
            if delta:
                yield delta
        if handle.error:
            raise RequestError(handle.error)

    def prompt_logprobs(self, prompt: Prompt, adapter: Optional[str] = None, top: int = 0) -> list:
        """Each prompt token's log-probability given the tokens before it (the first has none: None), with
        the `top` (0..20) most likely tokens' there, as `TokenLogprob`s: how evaluation harnesses score a
        text's likelihood (the OpenAI completions `echo` + `logprobs`). Computed on the device through the
        serving path, like `logits`."""
        ids = self._ids(prompt)
        if not ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        SamplingParams(logprobs=top)  # the same range check as a request's
        if len(ids) > self.max_model_len:
            raise RequestTooLong(f"{len(ids)} tokens exceed max_model_len={self.max_model_len}", "prompt")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidRequest(f"a token id is outside the vocabulary (size {self.vocab_size})", "prompt")
        if adapter is not None and not self.has_adapter(adapter):
            raise AdapterNotFound(f"adapter {adapter!r} is not registered", "model")
        return self.engine.prompt_logprobs(ids, adapter, top)

    def logits(self, token_ids: Prompt, adapter: Optional[str] = None) -> np.ndarray:
        """[len, vocab] float32 logits through the serving path (pool, pages, kernels)."""
        ids = self._ids(token_ids)
        if len(ids) > self.max_model_len:
            raise RequestTooLong(f"{len(ids)} tokens exceed max_model_len={self.max_model_len}", "token_ids")
        if adapter is not None and not self.has_adapter(adapter):
            raise AdapterNotFound(f"adapter {adapter!r} is not registered", "adapter")
        return self.engine.logits(ids, adapter)

    # -- the background loop -------------------------------------------------------------
    def start(self) -> None:
        """Run the engine loop in a background thread (a server's mode); `submit` then just queues."""
        self.engine.start()

    def stop(self, abort: bool = True) -> None:
        """Stop the background loop, first aborting every unfinished request (`abort`). On process 0 of a
        multi-process engine (`lead()`), also release the followers: their `follow()` returns."""
        if abort:
            self.engine.abort_all()
        self.engine.stop()

    @property
    def is_running(self) -> bool:
        """Whether the background loop is serving (False once the engine failed for good: `failure`)."""
        return self.engine.running

    # -- many processes (jax.distributed) ----------------------------------------------------------
    @property
    def process_index(self) -> int:
        """This process's index under jax.distributed (0 in a single process)."""
        return jax.process_index()

    @property
    def process_count(self) -> int:
        return jax.process_count()

    def lead(self, timeout_s: float = 10.0) -> None:
        """On process 0 of several (jax.distributed, tp spanning every process's devices): from now on
        every engine call made here (requests, aborts, adapters, logits) is applied on every process, whose
        `follow()` runs the same steps. Make the same start-up calls everywhere first (the same LLM
        arguments and adapters, as in SPMD use); this waits until every other process follows. A follower
        silent for `timeout_s` stops the engine for good (`failure`). In a single process: nothing to do."""
        if isinstance(self.engine, Leader):
            self.engine.lead(timeout_s)
        elif jax.process_count() > 1:
            raise ConfigError(f"process {jax.process_index()} cannot lead: process 0 leads, the others follow()")

    def follow(self, timeout_s: float = 10.0) -> None:
        """On every process but 0: run the steps process 0 publishes (see `lead()`) until its `stop()`
        (returns). Raises ProcessLost if process 0 is lost or this process diverged from it."""
        if not isinstance(self.engine, Follower):
            raise ConfigError("process 0 leads (lead()) and the others follow()" if jax.process_count() > 1
                              else "a single process has no process 0 to follow")
        self.engine.follow(timeout_s)

    @property
    def failure(self) -> Optional[str]:
        """Why the engine stopped serving for good (a process of a multi-process engine lost); None while it serves."""
        return self.engine.failure

    def wait_for_failure(self, timeout: Optional[float] = None) -> Optional[str]:
        """Block until the engine fails for good (`failure`, returned), or `timeout` seconds (None)."""
        self.engine.failed.wait(timeout)
        return self.engine.failure

    def warmup(self, progress: bool = False) -> int:
        """Compile every step program now, so that no request waits for a compile; `progress` shows a
        progress bar. Returns the number of programs compiled."""
        if not progress:
            return self.engine.warmup()
        from tqdm import tqdm

        with tqdm(desc="compiling step programs", unit="program", dynamic_ncols=True) as bar:
            def report(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            return self.engine.warmup(progress=report)

    def set_prefix_cache(self, enabled: bool) -> None:
        """Turn prefix caching on or off (only while no request is queued or running)."""
        self.engine.set_prefix_cache(enabled)
        self.engine_cfg = self.engine.ecfg

    def clear_cache(self) -> None:
        """Swap every adapter out and drop every cached prefix, as after start-up (only while idle): runs
        compared on one engine each start from it."""
        self.engine.clear_cache()

    def stats(self) -> dict:
        """Pool pages (total, free, kv, adapter), adapters registered and resident, swaps, requests running
        and waiting, and counters (requests finished/aborted, prompt and generated tokens, steps, preemptions)."""
        return self.engine.stats()
