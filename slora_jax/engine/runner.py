"""The jitted model step (pool donated) and on-device sampling."""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import KernelSet

from ..model.inputs import StepInput
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

    def __init__(self, model, kernels: KernelSet):
        self.graphdef, self.state = nnx.split(model)
        self.kernels = kernels
        self._compiled: dict = {}  # input signature -> ahead-of-time compiled step (precompile)
        self._compiled_lock = threading.Lock()
        self._step = jax.jit(functools.partial(ModelRunner._step_fn, self.graphdef, kernels), donate_argnums=(1,))
        self._logits = jax.jit(functools.partial(ModelRunner._logits_fn, self.graphdef, kernels), donate_argnums=(1,))

    @staticmethod
    def _forward(graphdef, kernels, state, pool, inp: StepInput):
        # a float32 model means "exact": keep XLA from using TF32 for its float32 GEMMs on GPU
        exact = jax.tree.leaves(state)[0].dtype == jnp.float32
        with jax.default_matmul_precision("highest" if exact else "default"):
            return nnx.merge(graphdef, state)(inp, pool, kernels)

    @classmethod
    def _step_fn(cls, graphdef, kernels, state, pool, inp: StepInput, samp: SamplingArrays):
        logits, pool = cls._forward(graphdef, kernels, state, pool, inp)
        return sample(logits, samp), pool

    @classmethod
    def _logits_fn(cls, graphdef, kernels, state, pool, inp: StepInput):
        return cls._forward(graphdef, kernels, state, pool, inp)

    def step(self, pool, inp: StepInput, samp: SamplingArrays):
        """-> (sampled tokens [B] on device, new pool). Asynchronous."""
        exe = self._compiled.get(_signature(inp, samp))
        if exe is not None:
            return exe(self.state, pool, inp, samp)
        return self._step(self.state, pool, inp, samp)

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
                sig = _signature(inp, samp)
                if sig not in self._compiled and sig not in futures:
                    futures[sig] = compile_pool.submit(self._step.lower(self.state, pool, inp, samp).compile)
            done = {sig: f.result() for sig, f in futures.items()}
        with self._compiled_lock:
            self._compiled.update(done)
        return len(done)

    def logits(self, pool, inp: StepInput):
        return self._logits(self.state, pool, inp)

    def cache_size(self) -> int:
        """Compiled programs so far (the no-recompilation test reads it)."""
        return len(self._compiled) + self._step._cache_size() + self._logits._cache_size()


def _signature(inp: StepInput, samp: SamplingArrays) -> tuple:
    """What selects a compiled step: the pytree structure (incl. static metadata) and leaf shapes/dtypes."""
    leaves, tree = jax.tree.flatten((inp, samp))
    return tree, tuple((x.shape, x.dtype) for x in leaves)
