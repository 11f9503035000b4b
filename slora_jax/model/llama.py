"""Flax NNX Llama (MHA and GQA, RoPE with llama3 scaling, RMSNorm, SwiGLU).

Every target linear computes y = x W + (x A) B for a batch in which
each token may use a different adapter of a different rank, or none: the LoRA
term is the segmented shrink/expand kernels reading A/B rows from the unified
pool (each adapter's scaling is folded into its B rows). Attention reads K/V
from the same pool through page tables. The forward is a pure function of
(params, pool, StepInput) -> (logits, pool); the pool is donated by the caller
so K/V writes happen in place.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import KernelSet

from ..config import LORA_MODULES, ModelConfig
from .inputs import LoraInput, StepInput

_MOD = {m: i for i, m in enumerate(LORA_MODULES)}


def _param(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


def rms_norm(x, weight, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_tables(positions, inv_freq):
    """cos, sin [T, 1, hd/2] of every token's position: computed once per step, shared by all layers."""
    ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]


def apply_rope(x, cos, sin):
    """x [T, heads, hd]; HF's rotate-half convention."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class LoraContext:
    """Applies one step's LoRA tables at every target linear of every layer.

    The modules that share an input (q, k, v; gate, up) take one shrink launch and one expand launch;
    the expand adds up the shrink's split-K partial sums itself (no reduction launch between them).
    """

    def __init__(self, lora: LoraInput | None, pool, kernels: KernelSet):
        self.lora, self.pool, self.k = lora, pool, kernels
        self._tables: dict = {}

    def tables(self, modules: tuple):
        """(ranks [M, NS], a_rows [M, NS, R, K_in], b_rows M x [NS, R, K_out]) of a module group, built
        once per step (every layer indexes the same tables)."""
        if modules not in self._tables:
            lo, idx = self.lora, [_MOD[m] for m in modules]
            self._tables[modules] = (jnp.stack([lo.ranks[i] for i in idx]), jnp.stack([lo.a_rows[i] for i in idx]),
                                     tuple(lo.b_rows[i] for i in idx))
        return self._tables[modules]

    def active(self, modules: tuple) -> bool:
        """Whether any registered adapter targets one of `modules` (static: no launch for the rest)."""
        return self.lora is not None and any(m in self.lora.modules for m in modules)

    def __call__(self, x, base_outs: list, modules: tuple, layer):
        """base_outs[i] = x @ W_modules[i]; returns them with LoRA added: one shrink, one expand."""
        if not self.active(modules):
            return list(base_outs)
        ranks, a_rows, b_rows = self.tables(modules)
        v = self.k.lora_shrink(x, self.pool, layer, self.lora.seg_starts, ranks, a_rows, partials=True)
        return list(self.k.lora_expand_group(tuple(base_outs), v, self.pool, layer, self.lora.seg_starts, ranks,
                                             b_rows))

    def row(self, x, w, module: str, layer):
        """x @ w plus LoRA for a row-parallel linear (o, down). Under tensor parallelism one op does
        both, so the LoRA term rides the all-reduce of the base partial sums."""
        if self.k.row_linear is None:
            (y,) = self(x, [x @ w], (module,), layer)
            return y
        lo, i = self.lora, _MOD[module]
        tabs = (lo.seg_starts, lo.ranks[i], lo.a_rows[i], lo.b_rows[i]) if self.active((module,)) else None
        return self.k.row_linear(x, w, self.pool, layer, tabs)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.cfg = cfg
        self.input_norm = nnx.Param(jnp.ones((h,), dtype))
        self.post_norm = nnx.Param(jnp.ones((h,), dtype))
        for m in LORA_MODULES:
            setattr(self, m, _param(rngs, cfg.module_shape(m), dtype))

    def __call__(self, x, inp: StepInput, pool, layer: int, lora: LoraContext, kernels: KernelSet, rope):
        cfg = self.cfg
        t = x.shape[0]
        h = rms_norm(x, self.input_norm[...], cfg.rms_norm_eps)
        # q's LoRA expand shares the launch of k's and v's, which the K/V write below consumes: so the
        # expand's read of the pool is ordered before that in-place write (an unordered read of the
        # pre-write pool would make XLA copy the whole pool)
        q, k, v = lora(h, [h @ self.q_proj[...], h @ self.k_proj[...], h @ self.v_proj[...]],
                       ("q_proj", "k_proj", "v_proj"), layer)
        k = apply_rope(k.reshape(t, cfg.num_kv_heads, cfg.head_dim), *rope)
        geometry = dict(page_rows=inp.page_rows, num_pages=inp.num_pages)
        pool = kernels.write_kv(pool, layer, k.reshape(t, -1), v, inp.kv_rows, **geometry)
        lora.pool = pool
        q = apply_rope(q.reshape(t, cfg.num_heads, cfg.head_dim), *rope)
        scale = cfg.head_dim ** -0.5
        if inp.decode:
            attn = kernels.attention_decode(q, pool, layer, inp.block_tables, inp.kv_lens, scale=scale, **geometry)
        else:
            attn = kernels.attention_prefill(q, pool, layer, inp.block_tables, inp.q_starts, inp.kv_lens,
                                             scale=scale, **geometry)
        attn = attn.reshape(t, cfg.q_size)
        o = lora.row(attn, self.o_proj[...], "o_proj", layer)
        x = x + o
        h = rms_norm(x, self.post_norm[...], cfg.rms_norm_eps)
        g, u = lora(h, [h @ self.gate_proj[...], h @ self.up_proj[...]], ("gate_proj", "up_proj"), layer)
        a = jax.nn.silu(g.astype(jnp.float32)).astype(g.dtype) * u
        d = lora.row(a, self.down_proj[...], "down_proj", layer)
        return x + d, pool


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype=jnp.bfloat16, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = nnx.Param(jnp.ones((cfg.hidden_size,), dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype)

    def __call__(self, inp: StepInput, pool, kernels: KernelSet):
        cfg = self.cfg
        rope = rope_tables(inp.positions, jnp.asarray(cfg.rope_inv_freq(), jnp.float32))
        x = jnp.take(self.embed[...], inp.tokens, axis=0)
        lora = LoraContext(inp.lora, pool, kernels)
        for layer_idx, layer in enumerate(self.layers):
            x, pool = layer(x, inp, pool, np.int32(layer_idx), lora, kernels, rope)
            lora.pool = pool
        h = rms_norm(x[inp.logit_rows], self.norm[...], cfg.rms_norm_eps)
        head = self.embed[...].T if cfg.tie_word_embeddings else self.lm_head[...]
        logits = jnp.dot(h, head, preferred_element_type=jnp.float32)
        return logits, pool
