"""The jitted model step (pool donated) and on-device sampling (sampling.py).

A step takes the previous step's sampled tokens (`prev`, on the device) and
returns its own, padded to the same fixed length: token rows the host could
not fill (their token is still on the device) are gathered from `prev` inside
the step, so the host never waits for a step before dispatching the next.
The step program ends with each row's greedy token; a batch with a row that
samples at random, a row constrained by a grammar, or a row that asks for
log-probabilities also runs a small sampling program over the step's logits
(sampling.finish; no sort over the vocabulary unless some row asks for top-k /
top-p, and then only its K most likely tokens). `step` dispatches both at once;
`forward` and `sample` apart let the engine compute a constrained batch's token
masks on the host while its forward runs on the device.
"""
from __future__ import annotations

import dataclasses
import json
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import KernelSet

from .. import parallel
from ..config import COMMAND_BUFFERS
from ..model.inputs import StepInput
from ..model.tp_kernels import shard_kernels
from . import sampling
from .batch import SamplingArrays


# The sampling programs `precompile` compiles for every batch shape, as (k, masked, logprobs): random draws
# (temperature only; top-k / top-p with the default candidates), structured output (greedy; temperature), and
# log-probabilities of greedy tokens. Other combinations compile on first use.
SAMPLERS = ((0, False, False), (sampling.TOP_P_CANDIDATES, False, False), (None, True, False), (0, True, False),
            (None, False, True))


@dataclasses.dataclass
class Forward:
    """A dispatched step program whose logits may still be sampled (`ModelRunner.sample`)."""

    tokens: object  # [max_seqs] int32 on the device: each row's greedy token
    logits: object  # [B, V] on the device
    samp: SamplingArrays  # the batch's sampling arrays, on the device
    k: Optional[int]  # sampling.plan of the batch: None when no row samples at random


def step_compiler_options() -> dict:
    """XLA options of the step programs beyond the above, as JSON in $SLORA_XLA_OPTIONS (e.g.
    '{"xla_gpu_enable_triton_gemm": false}'): benchmarks compare settings with it, one process each."""
    text = os.environ.get("SLORA_XLA_OPTIONS", "").strip()
    if not text:
        return {}
    opts = json.loads(text)
    if not isinstance(opts, dict):
        raise ValueError(f"SLORA_XLA_OPTIONS must be a JSON object, got {text!r}")
    return opts


class ModelRunner:
    """Owns the device side: params, the compiled steps. The pool array is passed in and donated."""

    def __init__(self, model, kernels: KernelSet, max_seqs: int, mesh=None, lora_tp: str = "replicated",
                 command_buffers: str = "default"):
        """mesh: tensor parallelism over its `tp` axis (kernels per shard; the model's params must already be
        placed on it: Engine does that before sizing the pool), adapters laid out as `lora_tp` (parallel.py).
        max_seqs: the rows of a step's sampled-token output (the largest batch bucket). command_buffers: a
        key of COMMAND_BUFFERS."""
        self.graphdef, self.state = nnx.split(model)
        # the programs take the params as a flat tuple: jit flattens a tuple in C++, while an nnx State
        # calls back into Python for each of its ~300 Variables at every dispatch (`state` holds the same
        # arrays by name, for readers; the weights never change after start-up)
        self.params = tuple(jax.tree.leaves(self.state))
        model_def = (self.graphdef, jax.tree.structure(self.state))
        self.mesh = mesh
        if mesh is not None:
            kernels = shard_kernels(kernels, mesh, lora_tp)
            self._replicated = parallel.replicated(mesh)
        self.kernels = kernels
        self._compiled: dict = {}  # input signature -> ahead-of-time compiled step (precompile)
        self._samplers: dict = {}  # (k, masked, logprobs, logits and sampling signature) -> compiled SAMPLERS
        self._compiled_lock = threading.Lock()
        # `prev` of a step that follows no step in flight. Committed like a step's output: jit keys its
        # cache on committedness, so an uncommitted array here would give each program a second entry.
        target = self._replicated if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.no_tokens = parallel.put(np.zeros(max_seqs, np.int32), target)
        # XLA's rematerialization pass sees the donated pool as input, output and scatter result (three
        # pools: "can't reduce memory use below ...") and, failing to fit that, recomputes small values
        # (the LoRA tables, RoPE) next to each use: on the H200, ~190 extra launches per Llama-7B decode
        # step, for nothing, as buffer assignment updates the pool in place anyway (tests/test_pool.py).
        self.compiler_options = opts = {"xla_disable_hlo_passes": "rematerialization",
                                        **COMMAND_BUFFERS[command_buffers], **step_compiler_options()}
        self._step = jax.jit(functools.partial(ModelRunner._step_fn, model_def, kernels), donate_argnums=(1,),
                             compiler_options=opts)
        self._logits = jax.jit(functools.partial(ModelRunner._logits_fn, model_def, kernels),
                               donate_argnums=(1,), compiler_options=opts)
        self._sample = jax.jit(sampling.finish, static_argnames=("k", "want_logprobs"))
        self._logprobs = jax.jit(sampling.logprobs)

    @staticmethod
    def _forward(model_def, kernels, params, pool, inp: StepInput):
        # a float32 model means "exact": keep XLA from using TF32 for its float32 GEMMs on GPU
        exact = params[0].dtype == jnp.float32
        graphdef, state_def = model_def
        with jax.default_matmul_precision("highest" if exact else "default"):
            return nnx.merge(graphdef, jax.tree.unflatten(state_def, params))(inp, pool, kernels)

    @classmethod
    def _step_fn(cls, model_def, kernels, params, pool, inp: StepInput, samp: SamplingArrays, prev):
        """-> (greedy tokens padded like `prev`, logits, pool). `samp` only keys the program by the batch's
        shapes: its values are read by the sampling program (`step`), which rows at random need."""
        del samp
        tokens = jnp.where(inp.feed >= 0, prev[jnp.maximum(inp.feed, 0)], inp.tokens)
        logits, pool = cls._forward(model_def, kernels, params, pool, dataclasses.replace(inp, tokens=tokens))
        best = sampling.greedy(logits)
        return jnp.zeros_like(prev).at[: best.shape[0]].set(best), logits, pool

    @classmethod
    def _logits_fn(cls, model_def, kernels, params, pool, inp: StepInput):
        return cls._forward(model_def, kernels, params, pool, inp)

    def _place(self, tree):
        # on a mesh every device needs the whole step input: one explicit replicated transfer, so jit
        # never picks another layout for these host arrays
        return tree if self.mesh is None else parallel.put(tree, self._replicated)

    def forward(self, pool, inp: StepInput, samp: SamplingArrays, prev=None) -> tuple[Forward, object]:
        """Dispatch the step program -> (its greedy tokens and logits, new pool). Asynchronous.

        `prev`: the tokens returned by the step dispatched before this one, if `inp.feed` reads any."""
        prev = self.no_tokens if prev is None else prev
        k = sampling.plan(samp)  # read on the host, from the batch's own arrays, before they move
        inp, samp = self._place(inp), self._place(samp)
        exe = self._compiled.get(_signature(inp, samp))
        tokens, logits, pool = (exe or self._step)(self.params, pool, inp, samp, prev)
        return Forward(tokens, logits, samp, k), pool

    def sample(self, fwd: Forward, mask: Optional[np.ndarray] = None, logprobs: bool = False) -> tuple:
        """-> (the step's tokens [max_seqs], (token logprobs [B], top [B, K], ids [B, K]) or None), on the device.

        Runs the sampling program behind `fwd`'s step when a row samples at random, `mask` constrains rows
        (sampling.sample), or `logprobs` are wanted; else the greedy tokens are final and nothing runs."""
        if fwd.k is None and mask is None and not logprobs:
            return fwd.tokens, None
        if mask is not None:
            mask = self._place(mask)
        exe = self._samplers.get((fwd.k, mask is not None, logprobs, _sampler_signature(fwd.logits, fwd.samp)))
        if exe is not None:
            return exe(fwd.logits, fwd.samp, fwd.tokens, mask)
        return self._sample(fwd.logits, fwd.samp, fwd.tokens, mask, k=fwd.k, want_logprobs=logprobs)

    def step(self, pool, inp: StepInput, samp: SamplingArrays, prev=None):
        """-> (sampled tokens [max_seqs] on device, row i = sequence i; new pool). Asynchronous: `forward`
        then `sample`, for a batch without masks or log-probabilities.

        `prev`: the tokens returned by the step dispatched before this one, if `inp.feed` reads any."""
        fwd, pool = self.forward(pool, inp, samp, prev)
        return self.sample(fwd)[0], pool

    def precompile(self, pool, examples: list, workers: int | None = None) -> int:
        """Compile the step for every (StepInput, SamplingArrays) example shape, in parallel threads.

        A Llama-7B step program takes ~8 s to compile on the H200 host and an engine has ~30 bucket
        shapes; XLA compiles outside the GIL, so threads turn minutes of warm-up into tens of seconds.
        Tracing and lowering hold the GIL, so they run one at a time in this thread, each program's
        compile starting as soon as it is lowered. The usual sampling programs of each shape (`SAMPLERS`)
        are compiled too, so that such a request never waits for a compile; they are small and not
        counted. Returns how many step programs were new.
        """
        workers = workers or os.cpu_count() or 1
        futures: dict = {}
        samplers: dict = {}
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="slora-compile") as compile_pool:
            for inp, samp in examples:  # each compile starts as soon as its program is lowered
                inp, samp = self._place(inp), self._place(samp)
                sig = _signature(inp, samp)
                if sig in self._compiled or sig in futures:
                    continue
                lowered = self.lower(pool, inp, samp)
                futures[sig] = compile_pool.submit(lowered.compile)
                if self.mesh is None:  # on a mesh the sampling programs compile on first use (their shardings)
                    tokens, logits, _ = lowered.out_info
                    mask = jax.ShapeDtypeStruct((logits.shape[0], -(-logits.shape[1] // 32)), jnp.int32)
                    for k, masked, logprobs in SAMPLERS:
                        key = (k, masked, logprobs, _sampler_signature(logits, samp))
                        if key not in self._samplers and key not in samplers:
                            samplers[key] = compile_pool.submit(self._sample.lower(
                                logits, samp, tokens, mask if masked else None, k=k, want_logprobs=logprobs).compile)
            done = {sig: f.result() for sig, f in futures.items()}
            done_samplers = {key: f.result() for key, f in samplers.items()}
        with self._compiled_lock:
            self._compiled.update(done)
            self._samplers.update(done_samplers)
        return len(done)

    def lower(self, pool, inp: StepInput, samp: SamplingArrays):
        """The step program for these input shapes, lowered (not compiled): `.compile()` it, or read it."""
        inp, samp = self._place(inp), self._place(samp)
        return self._step.lower(self.params, pool, inp, samp, self.no_tokens)

    def logits(self, pool, inp: StepInput):
        return self._logits(self.params, pool, self._place(inp))

    def logprobs(self, logits, tokens: np.ndarray) -> tuple:
        """sampling.logprobs of `tokens` [B] (row i's) under `logits` [B, V], on the device."""
        return self._logprobs(logits, self._place(tokens))

    def cache_size(self) -> int:
        """Compiled programs so far (the no-recompilation test reads it)."""
        return (len(self._compiled) + len(self._samplers) + self._step._cache_size() + self._logits._cache_size()
                + self._sample._cache_size() + self._logprobs._cache_size())


def _signature(inp: StepInput, samp: SamplingArrays) -> tuple:
    """What selects a compiled step: the pytree structure (incl. static metadata) and leaf shapes/dtypes."""
    leaves, tree = jax.tree.flatten((inp, samp))
    return tree, tuple((x.shape, x.dtype) for x in leaves)


def _sampler_signature(logits, samp: SamplingArrays) -> tuple:
    """What selects a compiled sampling program besides its k: the logits' and the sampling arrays' shapes."""
    return tuple(logits.shape), str(logits.dtype), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(samp))
