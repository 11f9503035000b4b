"""Paged (chunked) prefill attention for TPU: Pallas' Mosaic lowering.

Same signature and semantics as `reference.paged_attention_prefill` (pool
layout: see `reference.py`); `attention.paged_attention_prefill` routes here on
a TPU backend, and with ``impl="pallas_tpu"`` on any backend (TPU interpret
mode on the CPU). Shape rules and interpret mode: as `attention_tpu` (decode).

Design
------
Work list (XLA, on the device). The packed query axis is cut, per sequence,
into blocks of ``BQ`` query tokens (a power of two). Item ``w`` is (sequence,
first row, row count, position of the first row); there are at most
``cdiv(T, BQ) + B`` items (a static bound), unused ones have 0 rows and exit
at once. The query rows of each item are gathered into a dense tile
``[W, Hkv, G * BQ, hd]`` (head-major rows ``g * BQ + i``), so every kernel
block is a whole, aligned array slice: a query block of one sequence can start
at any row of the packed axis, which a TPU BlockSpec cannot address, and a
copy of q (small next to the K/V it attends) is cheaper than masked partial
stores. The output tile is gathered back to ``[T, Hq, hd]``; rows of no item
(padding, before ``q_starts[0]`` or at or past ``q_starts[-1]``) are 0.

Kernel. Grid ``(W, Hkv)``, both "parallel". Scalar prefetch (SMEM): layer,
the flattened work list and the flattened block table. Program ``(w, h)``
holds the ``[G * BQ, hd]`` query tile of kv-head ``h``'s group (all ``G``
query heads share the K/V it reads), and attends keys ``[0, kv_end)`` with
``kv_end`` = position of its last row + 1. K/V pages come from the pool in
HBM (``memory_space=pl.ANY``) by async copy, ``pages_per_block`` pages per
iteration, double buffered exactly as in the decode kernel (pages past
``kv_end`` are not copied; stale rows are masked and their V rows zeroed).
Causal mask: row ``r`` is query token ``i = r % BQ`` (a bit-and, BQ is a
power of two) at position ``pos0 + i`` and sees keys ``<= pos0 + i``. Online
softmax in float32; rows with no visible key yet keep ``m = -inf`` without
NaN (only malformed inputs, kv_len < chunk length, produce such rows).
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import attention as _attention
from .attention_tpu import (_cdiv, _resolve_interpret, attend_paged, choose_pages_per_block, paged_call,
                            unsupported_reason)

__all__ = ["paged_attention_prefill", "unsupported_reason"]

_TARGET_Q_ROWS = 256  # default query-tile rows (G * BQ)
_MIN_BQ = 16  # a bfloat16 tile's sublane count: the q tile's rows stay whole tiles


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


# --------------------------------------------------------------------------- work list
def _work_list(q_starts, kv_lens, num_tokens, block_q):
    """[W, 4] int32 items (seq, first row, rows, position of first row), W static."""
    nseq = kv_lens.shape[0]
    qs = jnp.clip(q_starts.astype(jnp.int32), 0, num_tokens)
    n = jnp.maximum(qs[1:] - qs[:-1], 0)
    nblk = _cdiv(n, block_q)
    cum = jnp.cumsum(nblk)
    start = cum - nblk
    # sum_b cdiv(n_b, BQ) < T / BQ + B for non-decreasing q_starts
    num_items = min(_cdiv(num_tokens, block_q) + nseq, nseq * _cdiv(num_tokens, block_q))
    wid = jnp.arange(num_items, dtype=jnp.int32)
    owner = jnp.searchsorted(cum, wid, side="right").astype(jnp.int32)
    live = owner < nseq
    seq = jnp.minimum(owner, nseq - 1)
    j = wid - start[seq]
    row0 = jnp.where(live, qs[seq] + j * block_q, 0)
    nrows = jnp.where(live, jnp.clip(n[seq] - j * block_q, 0, block_q), 0)
    pos0 = kv_lens.astype(jnp.int32)[seq] - n[seq] + j * block_q
    return jnp.stack([seq, row0, nrows, pos0], axis=1).astype(jnp.int32)


# --------------------------------------------------------------------------- kernel
def _prefill_kernel(layer_ref, work_ref, bt_ref, q_ref, pool_hbm, o_ref, k_buf, v_buf,
                    k_sem, v_sem, *, block_q, page_rows, pages_per_block, max_pages,
                    num_pages, head_dim, scale, cdtype, precision):
    w = pl.program_id(0)
    seq, nrows, pos0 = work_ref[4 * w], work_ref[4 * w + 2], work_ref[4 * w + 3]
    kv_end = jnp.where(nrows > 0,
                       jnp.minimum(jnp.maximum(pos0 + nrows, 0), max_pages * page_rows), 0)

    def q_pos(rows):  # position of each row's query token: rows are g * BQ + i
        return pos0 + (lax.broadcasted_iota(jnp.int32, (rows, 1), 0) & (block_q - 1))

    attend_paged(q_ref, o_ref, pool_hbm, bt_ref, k_buf, v_buf, k_sem, v_sem, seq=seq, layer=layer_ref[0],
                 kv_end=kv_end, q_pos=q_pos, page_rows=page_rows, pages_per_block=pages_per_block,
                 max_pages=max_pages, num_pages=num_pages, head_dim=head_dim, scale=scale, cdtype=cdtype,
                 precision=precision)


@functools.partial(jax.jit, static_argnames=("page_rows", "scale", "block_q",
                                             "pages_per_block", "interpret"))
def _prefill_mosaic(q, pool, layer, block_tables, q_starts, kv_lens, *, page_rows, scale,
                    block_q, pages_per_block, interpret):
    num_tokens, hq, hd = q.shape
    hkv = pool.shape[-1] // hd
    group = hq // hkv

    work = _work_list(q_starts, kv_lens, num_tokens, block_q)
    items = work.shape[0]
    i = jnp.arange(block_q, dtype=jnp.int32)
    src = work[:, 1:2] + i  # [W, BQ] packed row of each tile token
    # dense query tiles [W, Hkv, G * BQ, hd], rows head-major (g * BQ + i)
    qt = q[jnp.minimum(src, num_tokens - 1)].reshape(items, block_q, hkv, group, hd)
    qt = qt.transpose(0, 2, 3, 1, 4).reshape(items, hkv, group * block_q, hd)

    out = paged_call(_prefill_kernel, qt, pool, (layer, work, block_tables), pages_per_block=pages_per_block,
                     page_rows=page_rows, scale=scale, name="paged_attention_prefill_tpu",
                     interpret=interpret, block_q=block_q)

    # back to [T, Hq, hd]: each packed row of an item reads its tile row; other rows read a 0 row
    flat = out.reshape(items, hkv, group, block_q, hd).transpose(0, 3, 1, 2, 4)
    flat = jnp.concatenate([flat.reshape(items * block_q, hq, hd),
                            jnp.zeros((1, hq, hd), q.dtype)])
    dest = jnp.where(i < work[:, 2:3], src, num_tokens).reshape(-1)  # T: dropped
    inv = jnp.full((num_tokens,), items * block_q, jnp.int32).at[dest].set(
        jnp.arange(items * block_q, dtype=jnp.int32), mode="drop")
    return flat[inv]


# --------------------------------------------------------------------------- wrapper
def paged_attention_prefill(q, pool, layer, block_tables, q_starts, kv_lens, *, page_rows: int,
                            scale: float, interpret=None, block_q: int | None = None,
                            pages_per_block: int | None = None):
    """Causal attention of packed query chunks over their sequences' pages, on TPU.

    q: [T, Hq, hd]; sequence b's queries are rows q_starts[b]:q_starts[b+1] ([B+1]
    int32, non-decreasing) at the last positions of its kv_lens[b] tokens, whose K/V
    (the chunk's own included) are in the pool. Rows outside [q_starts[0],
    q_starts[-1]) are padding (output 0). Returns [T, Hq, hd] in q's dtype.
    Semantics: `reference.paged_attention_prefill`; shape rules: `attention_tpu`.

    interpret: as `attention_tpu.paged_attention_decode`. block_q: query tokens per
    tile (a power of two >= 16; None: about 256 / G tile rows, at most next_pow2(T)).
    pages_per_block: pages per kernel iteration (None: about 256 keys, at most M).
    """
    fn = "paged_attention_prefill(impl='pallas_tpu')"
    _attention._check_prefill(fn, q, pool, layer, block_tables, q_starts, kv_lens, page_rows, scale)
    nseq = block_tables.shape[0]
    reason = unsupported_reason(q, pool, page_rows)
    if reason is not None:
        raise ValueError(f"{fn}: the TPU kernel does not support these shapes: {reason}; "
                         f"use impl='xla'")
    num_tokens, hq, hd = q.shape
    group = hq // (pool.shape[-1] // hd)
    if block_q is None:
        block_q = max(_MIN_BQ, min(_pow2_floor(_TARGET_Q_ROWS // group), 128,
                                   1 << max(0, num_tokens - 1).bit_length()))
    elif not (isinstance(block_q, numbers.Integral) and block_q >= _MIN_BQ
              and block_q & (block_q - 1) == 0):
        raise ValueError(f"{fn}: block_q must be None or a power of two >= {_MIN_BQ}, got "
                         f"{block_q!r}")
    max_pages = block_tables.shape[1]
    pages_per_block = choose_pages_per_block(fn, pages_per_block, page_rows, max_pages)
    if num_tokens == 0 or nseq == 0 or max_pages == 0:  # nothing to attend: every row is 0
        return jnp.zeros(q.shape, q.dtype)
    interpret = _resolve_interpret(interpret)
    out = _prefill_mosaic(q, pool, layer, block_tables, q_starts, kv_lens,
                          page_rows=int(page_rows), scale=float(scale), block_q=int(block_q),
                          pages_per_block=pages_per_block, interpret=interpret)
    if interpret is not False and not isinstance(out, jax.core.Tracer):
        out.block_until_ready()  # see attention_tpu: eager interpreted calls must complete
    return out
