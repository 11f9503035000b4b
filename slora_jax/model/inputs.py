"""The arrays one model step reads: a pytree built on the host by engine/batch.py.

The model only sees these arrays (tokens, positions, where their K/V go, the
page tables attention reads, and the LoRA segment tables); it knows nothing
of requests, the scheduler or the page allocator.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from ..config import LORA_MODULES


@dataclasses.dataclass
class LoraInput:
    """Tokens grouped by adapter into segments; per target module, each
    segment's rank and the pool rows of its A^T and B rows (see
    pallas_kernels/reference.py for the layout; an adapter's scaling is
    folded into its B rows)."""

    seg_starts: jax.Array  # [NS + 1] int32
    ranks: jax.Array  # [7, NS] int32, module order config.LORA_MODULES; 0 = not targeted
    a_rows: tuple  # 7 x [NS, R, K_in(module)] int32
    b_rows: tuple  # 7 x [NS, R, K_out(module)] int32
    # static: the modules any registered adapter targets; the model skips the others' LoRA launches
    # (and under tensor parallelism their all-reduces) instead of running them at rank 0
    modules: tuple = tuple(LORA_MODULES)


@dataclasses.dataclass
class StepInput:
    tokens: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32
    kv_rows: jax.Array  # [T] int32 pool K row for each token's new K/V, -1 = padding
    block_tables: jax.Array  # [B, M] int32 page indices per sequence
    kv_lens: jax.Array  # [B] int32 tokens in the pool per sequence after this step
    q_starts: jax.Array  # [B + 1] int32 token range of each sequence (prefill)
    logit_rows: jax.Array  # [n] int32 token rows whose logits are returned
    lora: Optional[LoraInput] = None
    # [T] int32: row of the previous step's sampled tokens (still on the device) that this token is,
    # -1 = take `tokens`. Resolved by the runner before the model runs (async mode, engine/runner.py).
    feed: Optional[jax.Array] = None
    decode: bool = False  # one token per sequence, token b belongs to sequence b
    page_rows: int = 16  # rows per pool page (static: kernels tile by it)
    # pages in the pool (static): with page_rows, the pool geometry the kernels index by (V rows of page p
    # start at (num_pages + p) * page_rows); given by the page table, never derived from the pool's shape
    num_pages: int = dataclasses.field(kw_only=True)


jax.tree_util.register_dataclass(
    LoraInput, data_fields=["seg_starts", "ranks", "a_rows", "b_rows"], meta_fields=["modules"]
)
jax.tree_util.register_dataclass(
    StepInput,
    data_fields=["tokens", "positions", "kv_rows", "block_tables", "kv_lens", "q_starts", "logit_rows", "lora",
                 "feed"],
    meta_fields=["decode", "page_rows", "num_pages"],
)
