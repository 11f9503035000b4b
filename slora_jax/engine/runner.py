"""The jitted model step (pool donated) and on-device sampling."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
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

    def __init__(self, model, kernels: KernelSet, mesh=None):
        """mesh: tensor parallelism over its `tp` axis (params placed sharded, kernels per shard)."""
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh
        if mesh is not None:
            self.state = parallel.place_params(self.state, mesh)
            kernels = shard_kernels(kernels, mesh)
            self._replicated = parallel.replicated(mesh)
        self.kernels = kernels
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

    def _place(self, tree):
        # on a mesh every device needs the whole step input: one explicit replicated transfer, so jit
        # never picks another layout for these host arrays
        return tree if self.mesh is None else parallel.put(tree, self._replicated)

    def step(self, pool, inp: StepInput, samp: SamplingArrays):
        """-> (sampled tokens [B] on device, new pool). Asynchronous."""
        return self._step(self.state, pool, self._place(inp), self._place(samp))

    def logits(self, pool, inp: StepInput):
        return self._logits(self.state, pool, self._place(inp))

    def cache_size(self) -> int:
        """Compiled programs so far (the no-recompilation test reads it)."""
        return self._step._cache_size() + self._logits._cache_size()
