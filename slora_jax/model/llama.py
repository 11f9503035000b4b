"""Flax NNX Llama (MHA and GQA, RoPE with llama3 scaling, RMSNorm, SwiGLU).

Every target linear computes y = x W + scale * (x A) B for a batch in which
each token may use a different adapter of a different rank, or none: the LoRA
term is the segmented shrink/expand kernels reading A/B rows from the unified
pool. Attention reads K/V from the same pool through page tables. The forward
is a pure function of (params, pool, StepInput) -> (logits, pool); the pool
is donated by the caller so K/V writes happen in place.
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


def apply_rope(x, positions, inv_freq):
    """x [T, heads, hd]; HF's rotate-half convention."""
    ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    cos = jnp.cos(ang)[:, None, :]
    sin = jnp.sin(ang)[:, None, :]
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class LoraContext:
    """Applies one step's LoRA tables at every target linear of every layer."""

    def __init__(self, lora: LoraInput | None, pool, kernels: KernelSet):
        self.lora, self.pool, self.k = lora, pool, kernels

    def shrink(self, x, modules: tuple, layer):
        """x @ A for the modules sharing input x, in one launch: [len(modules), T, R] (None without LoRA)."""
        if self.lora is None:
            return None
        lo = self.lora
        idx = [_MOD[m] for m in modules]
        return self.k.lora_shrink(x, self.pool, layer, lo.seg_starts, jnp.stack([lo.ranks[i] for i in idx]),
                                  jnp.stack([lo.a_rows[i] for i in idx]))

    def expand(self, y, v, module: str, layer):
        """y + scale * v @ B of one module."""
        if self.lora is None:
            return y
        lo, i = self.lora, _MOD[module]
        return self.k.lora_expand(y, v, self.pool, layer, lo.seg_starts, lo.ranks[i], lo.b_rows[i], lo.scales[i])

    def __call__(self, x, base_outs: list, modules: tuple, layer):
        """base_outs[i] = x @ W_modules[i]; returns them with LoRA added (shrink fused over modules)."""
        v = self.shrink(x, modules, layer)
        if v is None:
            return base_outs
        return [self.expand(y, v[j], m, layer) for j, (y, m) in enumerate(zip(base_outs, modules))]

    def row(self, x, w, module: str, layer):
        """x @ w plus LoRA for a row-parallel linear (o, down). Under tensor parallelism one op does
        both, so the LoRA term rides the all-reduce of the base partial sums."""
        if self.k.row_linear is None:
            (y,) = self(x, [x @ w], (module,), layer)
            return y
        lo, i = self.lora, _MOD[module]
        tabs = None if lo is None else (lo.seg_starts, lo.ranks[i], lo.a_rows[i], lo.b_rows[i], lo.scales[i])
        return self.k.row_linear(x, w, self.pool, layer, tabs)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.cfg = cfg
        self.input_norm = nnx.Param(jnp.ones((h,), dtype))
        self.post_norm = nnx.Param(jnp.ones((h,), dtype))
        for m in LORA_MODULES:
            setattr(self, m, _param(rngs, cfg.module_shape(m), dtype))

    def __call__(self, x, inp: StepInput, pool, layer: int, lora: LoraContext, kernels: KernelSet, inv_freq):
        cfg = self.cfg
        t = x.shape[0]
        h = rms_norm(x, self.input_norm[...], cfg.rms_norm_eps)
        v_qkv = lora.shrink(h, ("q_proj", "k_proj", "v_proj"), layer)
        k = h @ self.k_proj[...]
        v = h @ self.v_proj[...]
        if v_qkv is not None:
            k, v = lora.expand(k, v_qkv[1], "k_proj", layer), lora.expand(v, v_qkv[2], "v_proj", layer)
        k = apply_rope(k.reshape(t, cfg.num_kv_heads, cfg.head_dim), inp.positions, inv_freq)
        pool = kernels.write_kv(pool, layer, k.reshape(t, -1), v, inp.kv_slots)
        lora.pool = pool
        # q's LoRA expand reads the pool after the K/V write (its adapter rows are untouched by it): a
        # read of the pre-write pool that nothing orders before the in-place write would make XLA copy
        # the whole pool, twice per step.
        q = h @ self.q_proj[...]
        if v_qkv is not None:
            q = lora.expand(q, v_qkv[0], "q_proj", layer)
        q = apply_rope(q.reshape(t, cfg.num_heads, cfg.head_dim), inp.positions, inv_freq)
        page_rows = inp.page_rows
        scale = cfg.head_dim ** -0.5
        if inp.decode:
            attn = kernels.attention_decode(q, pool, layer, inp.block_tables, inp.kv_lens,
                                            page_rows=page_rows, scale=scale)
        else:
            attn = kernels.attention_prefill(q, pool, layer, inp.block_tables, inp.q_starts, inp.kv_lens,
                                             page_rows=page_rows, scale=scale)
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
        inv_freq = jnp.asarray(cfg.rope_inv_freq(), jnp.float32)
        x = jnp.take(self.embed[...], inp.tokens, axis=0)
        lora = LoraContext(inp.lora, pool, kernels)
        for layer_idx, layer in enumerate(self.layers):
            x, pool = layer(x, inp, pool, np.int32(layer_idx), lora, kernels, inv_freq)
            lora.pool = pool
        h = rms_norm(x[inp.logit_rows], self.norm[...], cfg.rms_norm_eps)
        head = self.embed[...].T if cfg.tie_word_embeddings else self.lm_head[...]
        logits = jnp.dot(h, head, preferred_element_type=jnp.float32)
        return logits, pool
