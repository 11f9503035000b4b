"""Where an adapter's rows go in the unified pool, and the waste of that geometry.

Pool rows are W = num_kv_heads * head_dim wide: one token's K (or V) for one
layer fills exactly one row, so GQA models waste no KV memory (S-LoRA's page
width H would waste 3/4 of it on Llama-3-8B). An adapter matrix row of width D
(a column of A, a row of B) takes K = ceil(D / W) pool rows, zero-padded. For
each targeted module, in config.LORA_MODULES order, an adapter stores its r
A^T rows (K_in pool rows each) then its r B rows (K_out each); the same flat
row list is used in every layer (the pool has a layer axis). Under tensor
parallelism the pool's columns are split over devices and `pack` orders each
row so that every device's columns hold the slice of it that device uses.

Waste (padding inside adapter rows; KV rows never waste):
- Llama-2-7B (W = 4096, I = 11008): only MLP rows pad, 11008 -> 12288 (10.4%
  of such a row); an adapter on all 7 modules wastes 4.7% of its rows, one on
  q,k,v,o wastes nothing.
- Llama-3-8B (W = 1024): H = 4096 and I = 14336 are multiples of W: 0%.
- Llama-2-13B (W = 5120, I = 13824 -> 15360): 4.5% on all 7 modules, 0% on attention.
Pages add at most one partly filled page per resident adapter.
`waste_report(cfg)` computes these figures.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import LORA_MODULES, ModelConfig


def row_width(cfg: ModelConfig) -> int:
    return cfg.kv_size


def slots(cfg: ModelConfig, width: int) -> int:
    """Pool rows one matrix row of `width` elements takes."""
    return math.ceil(width / row_width(cfg))


def module_slots(cfg: ModelConfig, module: str) -> tuple[int, int]:
    d_in, d_out = cfg.module_shape(module)
    return slots(cfg, d_in), slots(cfg, d_out)


def num_rows(cfg: ModelConfig, ranks: dict) -> int:
    return sum(r * sum(module_slots(cfg, m)) for m, r in ranks.items())


def pack(cfg: ModelConfig, modules: dict, dtype, tp: int = 1) -> np.ndarray:
    """LoraWeights.modules -> one compact [L, n_rows, W] buffer, ready for one transfer.

    With tp devices the pool's columns are split in tp slices of W/tp; a matrix row's K pool rows then
    give device d a local row of K*W/tp elements, and its d-th 1/tp of the matrix row goes first in it
    (for A^T rows the input features device d holds, for B rows the output columns it computes). So
    every device's kernels read a local row exactly as the single-device kernels read a whole one;
    tp=1 is the plain layout (element j at pool row j // W, column j % W).
    """
    w = row_width(cfg)
    lw = w // tp
    ranks = {m: modules[m][0].shape[2] for m in LORA_MODULES if m in modules}
    out = np.zeros((cfg.num_layers, num_rows(cfg, ranks), w), dtype)
    at = 0
    for m, r in ranks.items():
        a, b = modules[m]  # [L, in, r], [L, r, out]
        for mat in (np.swapaxes(a, 1, 2), b):  # rows of A^T, rows of B: [L, r, D]
            n = mat.shape[2]
            k = slots(cfg, n)
            local = np.zeros((cfg.num_layers, r, tp, k * lw), np.float32)  # [..., device d, its local row]
            local[..., : n // tp] = mat.reshape(cfg.num_layers, r, tp, n // tp)
            # local element c*lw + e of device d sits at pool row c, column d*lw + e
            rows = local.reshape(cfg.num_layers, r, tp, k, lw).transpose(0, 1, 3, 2, 4)
            out[:, at: at + r * k] = rows.reshape(cfg.num_layers, r * k, w)
            at += r * k
    return out


def module_tables(cfg: ModelConfig, ranks: dict, rows: np.ndarray) -> dict:
    """Pool rows of one adapter (flat, from the page table) -> {module: (a_rows [r, K_in], b_rows [r, K_out])}."""
    out, at = {}, 0
    for m in LORA_MODULES:
        if m not in ranks:
            continue
        r = ranks[m]
        k_in, k_out = module_slots(cfg, m)
        a = rows[at: at + r * k_in].reshape(r, k_in)
        at += r * k_in
        b = rows[at: at + r * k_out].reshape(r, k_out)
        at += r * k_out
        out[m] = (a, b)
    return out


def waste_report(cfg: ModelConfig, modules=LORA_MODULES) -> dict:
    """Fraction of an adapter's pool rows that is padding, for a given target set."""
    used = sum(sum(cfg.module_shape(m)) for m in modules)
    stored = sum(sum(module_slots(cfg, m)) for m in modules) * row_width(cfg)
    return {"row_width": row_width(cfg), "adapter_waste": 1 - used / stored, "kv_waste": 0.0}
