"""A dense numpy Llama + LoRA forward (no pool, no pages, no kernels): the reference the engine must equal."""
from __future__ import annotations

import numpy as np
from flax import nnx

from slora_jax.config import LORA_MODULES


def params_of(llm) -> dict:
    state = llm.engine.runner.state
    return {tuple(map(str, p)): np.asarray(v[...], np.float64) for p, v in nnx.to_flat_state(state)}


def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def _rope(x, pos, inv):
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def forward(cfg, P: dict, tokens, lora=None) -> np.ndarray:
    """Logits [T, V] for one sequence; lora = LoraWeights.modules (scaling folded into B) or None."""
    t = len(tokens)
    pos = np.arange(t, dtype=np.float64)
    inv = cfg.rope_inv_freq()
    x = P[("embed",)][np.asarray(tokens)]

    def lin(h, layer, m):
        y = h @ P[("layers", str(layer), m)]
        if lora and m in lora:
            a, b = lora[m]
            y = y + (h @ a[layer]) @ b[layer]
        return y

    g = cfg.num_heads // cfg.num_kv_heads
    for i in range(cfg.num_layers):
        h = _rms(x, P[("layers", str(i), "input_norm")], cfg.rms_norm_eps)
        q = _rope(lin(h, i, "q_proj").reshape(t, cfg.num_heads, cfg.head_dim), pos, inv)
        k = _rope(lin(h, i, "k_proj").reshape(t, cfg.num_kv_heads, cfg.head_dim), pos, inv)
        v = lin(h, i, "v_proj").reshape(t, cfg.num_kv_heads, cfg.head_dim)
        k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(cfg.head_dim)
        s = np.where(np.tril(np.ones((t, t), bool))[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", p, v).reshape(t, -1)
        x = x + lin(o, i, "o_proj")
        h = _rms(x, P[("layers", str(i), "post_norm")], cfg.rms_norm_eps)
        gt, up = lin(h, i, "gate_proj"), lin(h, i, "up_proj")
        x = x + lin(gt / (1 + np.exp(-gt)) * up, i, "down_proj")
    h = _rms(x, P[("norm",)], cfg.rms_norm_eps)
    head = P[("embed",)].T if cfg.tie_word_embeddings else P[("lm_head",)]
    return h @ head


def greedy(cfg, P, prompt, n, lora=None) -> list:
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(np.argmax(forward(cfg, P, toks, lora)[-1])))
    return toks[len(prompt):]


def random_lora(cfg, rng, rank: int, modules=LORA_MODULES, std=0.05) -> dict:
    """A pytree for LLM.add_adapter: {"<layer>.<module>": (A, B)}."""
    out = {}
    for layer in range(cfg.num_layers):
        for m in modules:
            d_in, d_out = cfg.module_shape(m)
            out[f"{layer}.{m}"] = (rng.normal(0, std, (d_in, rank)), rng.normal(0, std, (rank, d_out)))
    return out
