"""The jitted model step (pool donated) and on-device sampling.

A step takes the previous step's sampled tokens (`prev`, on the device) and
returns its own, padded to the same fixed length: token rows the host could
not fill (their token is still on the device) are gathered from `prev` inside
the step, so the host never waits for a step before dispatching the next.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import KernelSet

from .. import parallel
from ..model.inputs import StepInput
from ..model.tp_kernels import shard_kernels
from .batch import SamplingArrays


def sample(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    """Greedy where temperature == 0; else temperature, top-k, top-p with a per-request seeded key.

    The key of a request's n-th token is fold_in(PRNGKey(seed), n), so a seeded
    request gives the same tokens whatever batch it runs in.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
    order = jnp.argsort(-x, axis=-1)
    xs = jnp.take_along_axis(x, order, axis=-1)
    rank = jnp.arange(x.shape[-1])[None, :]
    keep = (s.top_k[:, None] <= 0) | (rank < s.top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, xs, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before this token
    keep &= before < s.top_p[:, None]
    keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.PRNGKey(seed), n))(s.seeds, s.counters)
    choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, xs, -jnp.inf))
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(s.temperature > 0, sampled, greedy)


class ModelRunner:
    """Owns the device side: params, the compiled steps. The pool array is passed in and donated."""

    def __init__(self, model, kernels: KernelSet, max_seqs: int, mesh=None, lora_tp: str = "replicated"):
        """mesh: tensor parallelism over its `tp` axis (params placed sharded, kernels per shard), with
        adapters laid out in the pool as `lora_tp` (parallel.py).
        max_seqs: the rows of a step's sampled-token output (the largest batch bucket)."""
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh
        if mesh is not None:
            self.state = parallel.place_params(self.state, mesh)
            kernels = shard_kernels(kernels, mesh, lora_tp)
            self._replicated = parallel.replicated(mesh)
        self.kernels = kernels
        self._compiled: dict = {}  # input signature -> ahead-of-time compiled step (precompile)
        self._compiled_lock = threading.Lock()
        # `prev` of a step that follows no step in flight. Committed like a step's output: jit keys its
        # cache on committedness, so an uncommitted array here would give each program a second entry.
        target = self._replicated if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.no_tokens = parallel.put(np.zeros(max_seqs, np.int32), target)
        # XLA's rematerialization pass sees the donated pool as input, output and scatter result (three
        # pools: "can't reduce memory use below ...") and, failing to fit that, recomputes small values
        # (the LoRA tables, RoPE) next to each use: on the H200, ~190 extra launches per Llama-7B decode
        # step, for nothing, as buffer assignment updates the pool in place anyway (tests/test_pool.py).
        opts = {"xla_disable_hlo_passes": "rematerialization"}
        self._step = jax.jit(functools.partial(ModelRunner._step_fn, self.graphdef, kernels), donate_argnums=(1,),
                             compiler_options=opts)
        self._logits = jax.jit(functools.partial(ModelRunner._logits_fn, self.graphdef, kernels),
                               donate_argnums=(1,), compiler_options=opts)

    @staticmethod
    def _forward(graphdef, kernels, state, pool, inp: StepInput):
        # a float32 model means "exact": keep XLA from using TF32 for its float32 GEMMs on GPU
        exact = jax.tree.leaves(state)[0].dtype == jnp.float32
        with jax.default_matmul_precision("highest" if exact else "default"):
            return nnx.merge(graphdef, state)(inp, pool, kernels)

    @classmethod
    def _step_fn(cls, graphdef, kernels, state, pool, inp: StepInput, samp: SamplingArrays, prev):
        tokens = jnp.where(inp.feed >= 0, prev[jnp.maximum(inp.feed, 0)], inp.tokens)
        logits, pool = cls._forward(graphdef, kernels, state, pool, dataclasses.replace(inp, tokens=tokens))
        sampled = sample(logits, samp)
        return jnp.zeros_like(prev).at[: sampled.shape[0]].set(sampled), pool

    @classmethod
    def _logits_fn(cls, graphdef, kernels, state, pool, inp: StepInput):
        return cls._forward(graphdef, kernels, state, pool, inp)

    def _place(self, tree):
        # on a mesh every device needs the whole step input: one explicit replicated transfer, so jit
        # never picks another layout for these host arrays
        return tree if self.mesh is None else parallel.put(tree, self._replicated)

    def step(self, pool, inp: StepInput, samp: SamplingArrays, prev=None):
        """-> (sampled tokens [max_seqs] on device, row i = sequence i; new pool). Asynchronous.

        `prev`: the tokens returned by the step dispatched before this one, if `inp.feed` reads any."""
        prev = self.no_tokens if prev is None else prev
        inp, samp = self._place(inp), self._place(samp)
        exe = self._compiled.get(_signature(inp, samp))
        if exe is not None:
            return exe(self.state, pool, inp, samp, prev)
        return self._step(self.state, pool, inp, samp, prev)

    def precompile(self, pool, examples: list, workers: int | None = None) -> int:
        """Compile the step for every (StepInput, SamplingArrays) example shape, in parallel threads.

        A Llama-7B step program takes ~8 s to compile on the H200 host and an engine has ~30 bucket
        shapes; XLA compiles outside the GIL, so threads turn minutes of warm-up into tens of seconds.
        Tracing and lowering hold the GIL, so they run one at a time in this thread, each program's
        compile starting as soon as it is lowered. Returns how many programs were new.
        """
        workers = workers or os.cpu_count() or 1
        futures: dict = {}
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="slora-compile") as compile_pool:
            for inp, samp in examples:  # each compile starts as soon as its program is lowered
                inp, samp = self._place(inp), self._place(samp)
                sig = _signature(inp, samp)
                if sig not in self._compiled and sig not in futures:
                    futures[sig] = compile_pool.submit(self.lower(pool, inp, samp).compile)
            done = {sig: f.result() for sig, f in futures.items()}
        with self._compiled_lock:
            self._compiled.update(done)
        return len(done)

    def lower(self, pool, inp: StepInput, samp: SamplingArrays):
        """The step program for these input shapes, lowered (not compiled): `.compile()` it, or read it."""
        inp, samp = self._place(inp), self._place(samp)
        return self._step.lower(self.state, pool, inp, samp, self.no_tokens)

    def logits(self, pool, inp: StepInput):
        return self._logits(self.state, pool, self._place(inp))

    def cache_size(self) -> int:
        """Compiled programs so far (the no-recompilation test reads it)."""
        return len(self._compiled) + self._step._cache_size() + self._logits._cache_size()


def _signature(inp: StepInput, samp: SamplingArrays) -> tuple:
    """What selects a compiled step: the pytree structure (incl. static metadata) and leaf shapes/dtypes."""
    leaves, tree = jax.tree.flatten((inp, samp))
    return tree, tuple((x.shape, x.dtype) for x in leaves)

