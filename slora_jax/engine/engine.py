"""The host loop: schedule -> swap adapters in -> build the batch -> run the step -> post-process.

Driven synchronously by `LLM.generate`, or from a background thread for the
server (`start()`); one lock serialises steps against aborts and adapter
changes from other threads, while new requests come through a lock-free inbox
that the next step admits. The host reads back only the sampled
tokens of each step: that read is the loop's one wait on the device.

Async mode (`EngineConfig.async_steps`, DESIGN.md section 2) runs one step
behind: step N+1 is scheduled, built and dispatched before step N's tokens are
read, so the device never idles while Python works. Step N's tokens stay on the
device and feed step N+1 (`StepInput.feed`); `Request.pending` counts them
until the read. When step N's tokens are read, a request that stops at one of
them may already be in step N+1: that step's token for it is dropped unread.
Its pages are freed then, after N+1 was dispatched, which is safe: the pool is
donated through every step and swap-in, so each later pool update (a step
writing K/V into a reused page, an adapter scattered over it) takes N+1's
output pool as input and runs after N+1. Requests that stop by length are
known in advance and never scheduled past their last token.
The same order makes prefix blocks safe to share: a page becomes a cached block
only once the steps writing it are dispatched, so a step of another sequence
reading it takes their output pool, and no step writes into a block.

Structured output (engine/structured.py): the token mask of a constrained row
depends on the token its previous step sampled, which the host reads only after
dispatching the next step. So a batch with constrained rows is dispatched in two
parts: its forward first (`runner.forward`); then, once the previous step's
tokens are read and fed to the matchers (first thing after the read, before
the per-token detokenizing and listeners), the masks are computed on a worker
thread (llguidance releases the GIL) while that forward runs on the device and
the host goes on with its own work (callbacks, the next schedule and batch);
the sampling program that applies them is dispatched when the next step needs
its tokens, or when they are read (`_sample_masked`). The host's critical path
thus pays max(masks, its other work), not their sum.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import random
import threading
import time
from typing import Callable, Optional

import jax
import numpy as np
from flax import nnx

from pallas_kernels import kernel_set

from .. import parallel
from ..adapters.lora import LoraWeights
from ..adapters.store import AdapterStore
from ..config import EngineConfig, ModelConfig
from ..errors import AdapterExists, AdapterInUse, AdapterNotFound, CapacityError, RequestTooLong
from ..memory import layout
from ..memory.cache import PoolCache, default_capacity
from ..memory.pages import PageTable
from ..memory.pool import DevicePool, choose_num_pages
from ..model.weights import dtype_of
from ..tokenizer import IncrementalDecoder
from .batch import BatchBuilder, max_batch_rows
from .request import Request, RequestLimits, SamplingParams, TokenLogprob, check_request
from .runner import Forward, ModelRunner
from .scheduler import LOOKAHEAD, ScheduledStep, Scheduler
from .structured import Grammars, advance

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InFlight:
    """A dispatched step whose sampled tokens the host has not read yet."""

    tokens: object  # [max_b] int32 device array, row i = sequence i of the step (None until sampled)
    rows: list  # (request, row) for each request that samples a token in this step
    logprobs: object = None  # sampling.logprobs of the tokens, on the device, if a row asked for them
    forward: Optional[Forward] = None  # until its sampling program is dispatched (a masked batch)
    want_logprobs: bool = False
    masks: Optional[concurrent.futures.Future] = None  # the constrained rows' masks, being computed


def _split_at_stop(text: str, stops) -> tuple[str, bool]:
    """(text before the first stop string, whether one occurred)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _stop_prefix_len(text: str, stops) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string (held back)."""
    best = 0
    for s in stops:
        for j in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:j]):
                best = j
                break
    return best


def _token_logprob(token: int, logprob, top_ids: np.ndarray, top_logprobs: np.ndarray, k: int) -> TokenLogprob:
    """One position's TokenLogprob from sampling.logprobs' rows: its k most likely tokens, less those a grammar
    forbids there (-inf)."""
    top = tuple((i, v) for i, v in zip(top_ids[:k].tolist(), top_logprobs[:k].tolist()) if v > -np.inf)
    return TokenLogprob(int(token), float(logprob), top)


class Engine:
    def __init__(self, cfg: ModelConfig, ecfg: EngineConfig, model, tokenizer, mesh=None):
        """mesh: the devices of tensor parallelism (default for ecfg.tp > 1: the first tp devices)."""
        self.cfg, self.ecfg, self.tokenizer = cfg, ecfg, tokenizer
        dtype = dtype_of(ecfg.dtype)
        if mesh is None and ecfg.tp > 1:
            mesh = parallel.make_mesh(cfg, ecfg.tp)
        if mesh is not None and mesh.shape[parallel.TP] != ecfg.tp:
            raise ValueError(f"the mesh's tp axis has {mesh.shape[parallel.TP]} devices but tp={ecfg.tp}")
        self.mesh = mesh
        # first: the weights go to their devices (sharded on a mesh) before the pool takes what is left;
        # then max_running (None: what the pages hold) is known, and with it every batch shape
        if mesh is not None:
            nnx.update(model, parallel.place_params(nnx.state(model), mesh))
        self.ecfg = ecfg = ecfg.with_pages(choose_num_pages(cfg, ecfg, dtype))
        self.runner = ModelRunner(model, kernel_set(ecfg.kernels), max_batch_rows(ecfg.max_running), self.mesh,
                                  ecfg.lora_tp, ecfg.command_buffers)
        self.layout = lay = layout.PoolLayout.create(cfg, ecfg, ecfg.num_pages)
        if lay.num_pages < lay.pages_per_seq + 1:
            raise ValueError(f"num_pages={lay.num_pages} cannot hold one max_model_len={ecfg.max_model_len} "
                             f"sequence ({lay.pages_per_seq} pages of {lay.page_rows} tokens)")
        self.pool = DevicePool(lay, dtype, parallel.pool_sharding(self.mesh) if self.mesh else None)
        self.pages = PageTable(lay)
        self.store = AdapterStore(cfg, ecfg.max_rank, dtype, tp=ecfg.tp, lora_tp=ecfg.lora_tp,
                                  pool_sharding=self.pool.array.sharding if self.mesh else None)
        self.cache = PoolCache(lay, self.store, self.pages, self.pool, ecfg.max_rank,
                               ecfg.max_resident_adapters or default_capacity(lay, ecfg.max_running))
        self.scheduler = Scheduler(self.pages, self.cache, ecfg.max_running, ecfg.max_batch_tokens,
                                   ecfg.early_abort_s, ecfg.prefix_cache)
        self.builder = BatchBuilder(self.pages, self.cache, ecfg.max_running, ecfg.max_batch_tokens)
        self.grammars = Grammars(tokenizer, cfg.vocab_size)
        # one worker: a step's masks, computed while the host goes on (its thread starts on first use)
        self._mask_worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="slora-masks")
        self._inflight: Optional[InFlight] = None
        self.requests: dict = {}
        # seeds of unseeded requests; across hosts (jax.distributed) every process runs the same steps,
        # so each must draw the same seeds: an RNG seeded alike in all of them
        self._seeds = random.Random(ecfg.seed) if jax.process_count() > 1 else random
        self._ids = itertools.count()
        self._lock = threading.RLock()
        # New requests wait here, not on the engine lock (held through each step, device wait included): the
        # next step admits them. Lock-free hand-over keeps a busy loop from starving the server's threads.
        self._inbox: collections.deque = collections.deque()
        self._new_work = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self.counters = {"requests_finished": 0, "requests_aborted": 0, "tokens_generated": 0, "prompt_tokens": 0,
                         "steps": 0, "preemptions": 0, "steps_overlapped": 0}
        # where a step's wall time goes: the host's own work, and its waits on the device (the token read)
        # and on the mask worker; a loop whose waits are ~0 is host-bound (benchmarks report them per run)
        self.timings = {"host_s": 0.0, "device_wait_s": 0.0, "mask_wait_s": 0.0}
        self.on_step: list = []  # callables(finished requests) for metrics
        # why the engine stopped serving for good (a process of a multi-process engine lost), and its signal
        self.failure: Optional[str] = None
        self.failed = threading.Event()

    # -- requests ----------------------------------------------------------------------
    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.ecfg.max_model_len, self.cfg.vocab_size)

    def add_request(self, prompt_ids: list, adapter: Optional[str], sampling: SamplingParams,
                    request_id: Optional[str] = None, listener: Optional[Callable] = None,
                    clamp_length: bool = True) -> Request:
        """Queue a request; raises InvalidRequest (a bad field, a JSON schema llguidance refuses),
        RequestTooLong (request.check_request) or AdapterNotFound before anything changes. `clamp_length`: a
        request whose prompt plus max_tokens runs past max_model_len stops there (True) or is refused
        (False, as the public API does)."""
        check_request(prompt_ids, sampling, self.limits, clamp_length)
        if adapter is not None and adapter not in self.store:
            raise AdapterNotFound(f"adapter {adapter!r} is not registered", "model")
        req = self._request(prompt_ids, adapter, sampling, request_id, listener)
        self._accept(req)
        return req

    def _request(self, prompt_ids: list, adapter: Optional[str], sampling: SamplingParams,
                 request_id: Optional[str] = None, listener: Optional[Callable] = None,
                 id_int: Optional[int] = None, seed: Optional[int] = None) -> Request:
        """A new request's state; its sequence id and seed are drawn here unless given (engine/multihost.py)."""
        grammar = self.grammars.matcher(sampling)
        n = next(self._ids) if id_int is None else id_int
        if seed is None:
            seed = sampling.seed if sampling.seed is not None else self._seeds.getrandbits(32)
        req = Request(request_id or f"req-{n}", n, prompt_ids, adapter, sampling, seed)
        req.grammar = grammar
        req.token_limit = min(req.token_limit, self.ecfg.max_model_len)
        req.decoder = IncrementalDecoder(self.tokenizer, req.prompt_ids)
        if listener is not None:
            req.listeners.append(listener)
        return req

    def _accept(self, req: Request) -> None:
        self.requests[req.id] = req  # visible to abort() and remove_adapter() at once
        self._inbox.append(req)
        self._new_work.set()

    def _admit_new(self) -> None:
        """Move new requests from the inbox into the scheduler (under the engine lock)."""
        while self._inbox:
            req = self._inbox.popleft()
            if not req.finished:  # aborted before it was admitted
                self.scheduler.add(req)
                self.counters["prompt_tokens"] += len(req.prompt_ids)

    def abort(self, request_id: str) -> None:
        with self._lock:
            req = self.requests.get(request_id)
            if req is not None and not req.finished:
                self._finish(req, "abort")

    def abort_all(self) -> None:
        """Abort every unfinished request (waiting or running); their pages are freed."""
        with self._lock:
            for rid in list(self.requests):
                self.abort(rid)

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work() or self._inflight is not None

    # -- the pool cache (benchmarks compare runs on one engine, its step programs compiled once) ------------
    def set_prefix_cache(self, enabled: bool) -> None:
        """Turn prefix caching on or off; blocks cached before stay until evicted (or `clear_cache`)."""
        with self._lock:
            self._check_idle("set_prefix_cache")
            self.scheduler.prefix_cache = enabled
            self.ecfg = self.ecfg.replace(prefix_cache=enabled)

    def clear_cache(self) -> None:
        """Swap out every adapter and drop every cached prefix block: the pool as after start-up, every adapter
        still registered."""
        with self._lock:
            self._check_idle("clear_cache")
            self.cache.drop_idle()

    def _check_idle(self, what: str) -> None:
        """Both only while nothing is queued or running (RuntimeError, nothing changed); neither is mirrored to
        other processes (jax.distributed)."""
        if self.has_work():
            raise RuntimeError(f"{what}: requests are queued or running")

    # -- adapters ----------------------------------------------------------------------
    def add_adapter(self, lw: LoraWeights, replace: bool = False):
        need = self.layout.adapter_pages(self.layout.adapter_rows(lw.ranks))
        seq_pages = self.layout.pages_per_seq
        if need + seq_pages > self.layout.num_pages:
            raise CapacityError(
                f"adapter {lw.name!r} needs {need} pool pages but the pool has {self.layout.num_pages}, of which "
                f"{seq_pages} must stay available for one max_model_len sequence: use a larger pool "
                "(num_pages / mem_fraction) or a smaller rank")
        with self._lock:
            if lw.name in self.store:
                if not replace:
                    raise AdapterExists(f"adapter {lw.name!r} is already registered (replace=True replaces it)",
                                        "name")
                self.remove_adapter(lw.name)
            return self.store.add(lw)

    def add_synthetic_adapters(self, names, rank: int, modules, seed: int = 0, shared: bool = False) -> None:
        with self._lock:
            self.store.add_synthetic(names, rank, modules, seed, shared=shared)

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self.store:
                raise AdapterNotFound(f"adapter {name!r} is not registered", "name")
            users = [r.id for r in list(self.requests.values()) if r.adapter == name and not r.finished]
            if users:
                raise AdapterInUse(f"adapter {name!r} is in use by {len(users)} request(s); retry when they finish",
                                   "name")
            self.store.get(name)
            self.cache.forget(name)
            self.store.remove(name)

    # -- the step ----------------------------------------------------------------------
    def step(self) -> list:
        """Run one engine step; returns the requests that finished in it.

        Async mode: dispatch this step, then read the previous one's tokens."""
        t0 = time.perf_counter()
        waited = self.timings["device_wait_s"] + self.timings["mask_wait_s"]
        with self._lock:
            self._admit_new()
            sched = self.scheduler.schedule()
            if sched is None and self._inflight is None:
                return []
            finished, launched = [], None
            if sched is not None:
                finished = [self._finish(r, "abort") for r in sched.aborted]
                self.counters["preemptions"] += len(sched.preempted)
                if sched.requests:
                    self.cache.prefetch([r.adapter for r in itertools.islice(self.scheduler.waiting, LOOKAHEAD)])
                    launched = self._dispatch(sched)
                # a schedule with nothing to run (only requests whose last token is in flight) is no step
                self.counters["steps"] += bool(sched.requests or sched.aborted or sched.preempted)
            older, self._inflight = self._inflight, launched
            if older is not None:
                finished += self._read(older, launched)
            elif launched is not None and launched.forward is not None:
                self._start_masks(launched)
            if not self.ecfg.async_steps:
                finished += self.drain()
        for cb in self.on_step:
            cb(finished)
        self.timings["host_s"] += time.perf_counter() - t0 - (
            self.timings["device_wait_s"] + self.timings["mask_wait_s"] - waited)
        return finished

    def _dispatch(self, sched: ScheduledStep) -> InFlight:
        inp, samp, reqs = self.builder.build(sched)
        if self._inflight is not None and self._inflight.forward is not None:
            self._sample_masked(self._inflight)  # this step's forward takes its tokens
        prev = None if self._inflight is None else self._inflight.tokens
        ntok = dict(zip((r.id for r in sched.requests), sched.num_tokens))
        # the requests that sample a token in this step: not a prefill chunk short of the prompt's end
        rows = [(r, i) for i, r in enumerate(reqs) if r.num_computed + ntok[r.id] == r.num_tokens]
        want_logprobs = any(r.logprobs is not None for r, _ in rows)
        masked = any(r.grammar is not None for r, _ in rows)
        if masked or want_logprobs:
            fwd, self.pool.array = self.runner.forward(self.pool.array, inp, samp, prev)
            launched = InFlight(None, rows, forward=fwd, want_logprobs=want_logprobs)
            if not masked:  # nothing to wait for: sample now (a masked batch samples in step(), `_sample_masked`)
                launched.tokens, launched.logprobs = self.runner.sample(fwd, None, want_logprobs)
                launched.forward = None
        else:
            tokens, self.pool.array = self.runner.step(self.pool.array, inp, samp, prev)
            launched = InFlight(tokens, rows)
        self.counters["steps_overlapped"] += prev is not None
        for r in reqs:
            r.num_computed += ntok[r.id]
        for r, i in rows:
            r.pending += 1
            r.pending_row = i
        return launched

    def _start_masks(self, step: InFlight, ending: frozenset = frozenset()) -> None:
        """Start computing the masks of a step with constrained rows on the worker: the step before it has
        been read (its tokens fed to the matchers), and no matcher is touched again before `_sample_masked`.
        `ending`: requests whose grammar just stopped or refused a token (they finish; no mask)."""
        rows = [(r.grammar, i) for r, i in step.rows
                if r.grammar is not None and not r.finished and r not in ending]
        step.masks = self._mask_worker.submit(self.grammars.masks, rows, step.forward.logits.shape[0])

    def _sample_masked(self, step: InFlight) -> None:
        """Dispatch the sampling program of a step with constrained rows, once its masks are computed."""
        fwd, step.forward = step.forward, None
        masks, step.masks = step.masks, None
        t0 = time.perf_counter()
        computed = masks.result()
        self.timings["mask_wait_s"] += time.perf_counter() - t0
        step.tokens, step.logprobs = self.runner.sample(fwd, computed, step.want_logprobs)

    def _read(self, step: InFlight, following: Optional[InFlight] = None) -> list:
        """Read a step's tokens and hand them to their requests. `following`: the step dispatched after it;
        if it has constrained rows, their masks start as soon as the matchers have taken these tokens,
        before the rest of the per-token work (detokenizing, stop strings, listeners)."""
        if step.forward is not None:
            self._sample_masked(step)
        t0 = time.perf_counter()
        tokens = parallel.to_host(step.tokens)  # the one device->host read of a step
        lps = None if step.logprobs is None else [parallel.to_host(x) for x in step.logprobs]
        self.timings["device_wait_s"] += time.perf_counter() - t0
        now = time.monotonic()
        # the grammars first: the next step's masks need only them
        grammar = {r: advance(r.grammar, int(tokens[row])) for r, row in step.rows
                   if r.grammar is not None and not r.finished}
        if following is not None and following.forward is not None:
            self._start_masks(following, frozenset(r for r, outcome in grammar.items() if outcome))
        finished = []
        for r, row in step.rows:
            r.pending -= 1
            if r.finished:  # stopped at an earlier token, or aborted, while this step ran: the token is dropped
                continue
            tok = int(tokens[row])
            if r.logprobs is not None:
                r.logprobs.append(_token_logprob(tok, lps[0][row], lps[2][row], lps[1][row], r.sampling.logprobs))
            if self._append(r, tok, now, grammar.get(r)):
                finished.append(r)
        return finished

    def drain(self) -> list:
        """Read the step in flight, if any; returns the requests that finished."""
        older, self._inflight = self._inflight, None
        return [] if older is None else self._read(older)

    def _append(self, r: Request, tok: int, now: float, grammar: Optional[str] = None) -> bool:
        """Hand one read token to its request; `grammar`: what its matcher said of it (`advance`, done by
        `_read`). True if the request finished."""
        sp = r.sampling
        r.output_ids.append(tok)
        if r.first_token_time is None:
            r.first_token_time = now
        self.counters["tokens_generated"] += 1
        delta = r.decoder.push([tok]) if tok not in self.tokenizer.eos_ids else ""
        reason = grammar
        if reason == "error":
            log.error("request %s: its grammar refused token %d: %s", r.id, tok, r.grammar.get_error())
            r.text += delta
            self._finish(r, "error", error="structured output: the grammar refused a generated token")
            return True
        if (tok in self.tokenizer.eos_ids and not sp.ignore_eos) or tok in sp.stop_token_ids:
            reason = "stop"
        elif reason is None and (len(r.output_ids) >= sp.max_tokens or
                                 len(r.prompt_ids) + len(r.output_ids) >= self.ecfg.max_model_len):
            reason = "length"
        if reason:
            delta += r.decoder.flush()  # a character left incomplete at the end: as U+FFFD, as decode() shows it
        if sp.stop:
            delta, hit = _split_at_stop(r.held + delta, sp.stop)
            r.held = "" if hit or reason else delta[len(delta) - _stop_prefix_len(delta, sp.stop):]
            delta = delta[: len(delta) - len(r.held)]
            reason = "stop" if hit else reason
        r.text += delta
        if reason:
            self._finish(r, reason, delta)
            return True
        for cb in r.listeners:
            cb(r, delta)
        return False

    def _finish(self, r: Request, reason: str, delta: str = "", error: Optional[str] = None) -> Request:
        self.scheduler.finish(r, cache=reason != "error")  # a failed step's pages are not cached
        r.finish_reason, r.error = reason, error
        r.grammar = None  # its matcher's memory goes now, not with the last handle
        r.finish_time = time.monotonic()
        self.counters["requests_aborted" if reason == "abort" else "requests_finished"] += 1
        self.requests.pop(r.id, None)
        for cb in r.listeners:
            cb(r, delta)
        return r

    def warmup(self, lora: bool = True, workers: Optional[int] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> int:
        """Compile every bucket shape now (in parallel threads), so serving never stops to compile.

        `progress(done, total)` is called as each program is lowered and handed to a compile thread,
        and once more when all have compiled. Returns the number of programs compiled."""
        with self._lock:
            shapes = [(True, b) for b in self.builder.decode_sizes()] + \
                     [(False, t) for t in self.builder.prefill_sizes()]
            examples = [self.builder.dummy(decode, size, with_lora) for decode, size in shapes
                        for with_lora in ((False, True) if lora else (False,))]

            def reported():
                for i, example in enumerate(examples):
                    progress(i, len(examples))
                    yield example

            n = self.runner.precompile(self.pool.array, examples if progress is None else reported(), workers)
            if progress is not None:
                progress(len(examples), len(examples))
            return n

    # -- loops ---------------------------------------------------------------------------
    def run_until_done(self, reqs: list) -> None:
        while not all(r.finished for r in reqs):
            if not self.step() and not self.has_work():
                break
        if not self.scheduler.has_work():  # nothing left to overlap with: read the last step, leave the engine idle
            self.step()

    @property
    def running(self) -> bool:
        """Whether the background loop (`start()`) is serving."""
        t = self._thread
        return t is not None and t.is_alive()

    def start(self) -> None:
        """Serve from a background thread (the HTTP server's mode)."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="slora-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._new_work.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop:
            if not self.has_work():
                self._new_work.wait(timeout=0.1)  # add_request sets it; a set before clear() is seen by has_work
                self._new_work.clear()
                continue
            try:
                self.step()
            except Exception as e:
                log.exception("engine step failed")
                self._step_failed(e)

    def _step_failed(self, error: Exception) -> None:
        """One bad step must not kill the server: fail the running requests, go on."""
        with self._lock:
            lost, self._inflight = self._inflight, None  # its tokens are lost: fail every request waiting for one
            if lost is not None and lost.masks is not None:
                concurrent.futures.wait([lost.masks])  # the worker is done with the matchers before they go
            stuck = [r for r in self.scheduler.waiting if r.pending]
            for r in list(self.scheduler.running) + stuck:
                self._finish(r, "error", error="internal error in the engine step")

    # -- direct forward ------------------------------------------------------------------
    def logits(self, token_ids: list, adapter: Optional[str]) -> np.ndarray:
        """[len, vocab] float32 logits of every position, through the serving path (pool, pages, kernels)."""
        with self._lock:
            logits = self._all_logits(token_ids, adapter)
            return parallel.to_host(logits).astype(np.float32)[: len(token_ids)]

    def prompt_logprobs(self, token_ids: list, adapter: Optional[str], top: int = 0) -> list:
        """Each prompt token's log-probability given the tokens before it, and the `top` most likely tokens'
        there, computed on the device (sampling.logprobs) through the serving path: [None, TokenLogprob...]."""
        with self._lock:
            logits = self._all_logits(token_ids, adapter)
            following = np.zeros(logits.shape[0], np.int32)
            following[: len(token_ids) - 1] = token_ids[1:]
            chosen, vals, ids = (parallel.to_host(x) for x in self.runner.logprobs(logits, following))
        return [None] + [_token_logprob(token_ids[i + 1], chosen[i], ids[i], vals[i], top)
                         for i in range(len(token_ids) - 1)]

    def _all_logits(self, token_ids: list, adapter: Optional[str]):
        """Under the lock: the logits of every position of `token_ids` (padded rows after them), on the device."""
        if len(token_ids) > self.ecfg.max_model_len:
            raise RequestTooLong(f"{len(token_ids)} tokens exceed max_model_len={self.ecfg.max_model_len}",
                                 "token_ids")
        req = Request("logits", next(self._ids), token_ids, adapter, SamplingParams(), 0)
        if adapter is not None:
            self.store.get(adapter)
        if not self.scheduler.admit_now(req):
            raise CapacityError("the pool cannot hold this sequence now: retry when running requests finish")
        try:
            inp, _, _ = self.builder.build(ScheduledStep([req], [len(token_ids)], [], []))
            inp.logit_rows = np.arange(len(inp.tokens), dtype=np.int32)
            logits, self.pool.array = self.runner.logits(self.pool.array, inp)
            return logits
        finally:
            self.scheduler.release(req)

    def stats(self) -> dict:
        with self._lock:
            p, c = self.pages.stats(), self.cache.stats()
            return {
                "pages_total": p["pages_total"], "pages_free": p["pages_free"], "pages_kv": p["pages_kv"],
                "pages_adapter": p["pages_adapter"], "pages_cached": p["pages_cached"], "page_rows": p["page_rows"],
                "prefix_blocks": c["prefix_blocks"], **self.scheduler.counters,
                "adapters_registered": len(self.store), "adapters_resident": c["adapters_resident"],
                "adapter_entries": c["adapter_entries"], "swaps_in": c["swaps_in"], "swaps_out": c["swaps_out"],
                "requests_running": len(self.scheduler.running),
                "requests_waiting": len(self.scheduler.waiting) + len(self._inbox),
                "pool_bytes": self.pool.nbytes, "kernels": self.runner.kernels.name, **self.counters, **self.timings,
            }
