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
from jax.experimental.pallas import tpu as pltpu

from . import attention as _attention
from .attention_tpu import LANES, _cdiv, _resolve_interpret, unsupported_reason

__all__ = ["paged_attention_prefill", "unsupported_reason"]

_TARGET_BLOCK_TOKENS = 256  # default keys per kernel iteration
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
    w, h = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    seq, nrows, pos0 = work_ref[4 * w], work_ref[4 * w + 2], work_ref[4 * w + 3]
    block_tokens = pages_per_block * page_rows
    kv_end = jnp.where(nrows > 0,
                       jnp.minimum(jnp.maximum(pos0 + nrows, 0), max_pages * page_rows), 0)
    n_pages = _cdiv(kv_end, page_rows)
    n_blocks = _cdiv(kv_end, block_tokens)
    col = pl.multiple_of(h * head_dim, LANES)

    def page_copies(blk, slot):
        """[(live, k copy, v copy)] for the pages of key block `blk` into buffer `slot`."""
        out = []
        for j in range(pages_per_block):
            pidx = blk * pages_per_block + j
            page = bt_ref[seq * max_pages + jnp.minimum(pidx, max_pages - 1)]
            page = jnp.minimum(jnp.maximum(page, 0), num_pages - 1)  # never leave the pool
            k_row = pl.multiple_of(page * page_rows, page_rows)
            v_row = pl.multiple_of((page + num_pages) * page_rows, page_rows)
            k_src = pool_hbm.at[layer, pl.ds(k_row, page_rows), pl.ds(col, head_dim)]
            v_src = pool_hbm.at[layer, pl.ds(v_row, page_rows), pl.ds(col, head_dim)]
            out.append((pidx < n_pages,
                        pltpu.make_async_copy(k_src, k_buf.at[slot, j], k_sem.at[slot]),
                        pltpu.make_async_copy(v_src, v_buf.at[slot, j], v_sem.at[slot])))
        return out

    def start(blk, slot):
        for live, kc, vc in page_copies(blk, slot):
            @pl.when(live)
            def _():
                kc.start()
                vc.start()

    def wait(blk, slot):
        for live, kc, vc in page_copies(blk, slot):
            @pl.when(live)
            def _():
                kc.wait()
                vc.wait()

    @pl.when(n_blocks == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    @pl.when(n_blocks > 0)
    def _():
        start(0, 0)
        q = q_ref[...].astype(cdtype)  # [G * BQ, hd]
        rows = q.shape[0]
        # position of each row's query token: rows are g * BQ + i
        q_pos = pos0 + (lax.broadcasted_iota(jnp.int32, (rows, 1), 0) & (block_q - 1))

        def body(i, carry):
            acc, m, l = carry
            slot = i % 2

            @pl.when(i + 1 < n_blocks)
            def _():
                start(i + 1, 1 - slot)

            wait(i, slot)
            k = k_buf[slot].reshape(block_tokens, head_dim).astype(cdtype)
            v = v_buf[slot].reshape(block_tokens, head_dim).astype(cdtype)
            first = i * block_tokens
            key = first + lax.broadcasted_iota(jnp.int32, (1, block_tokens), 1)
            row_ok = first + lax.broadcasted_iota(jnp.int32, (block_tokens, 1), 0) < kv_end
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * scale  # [R, C]
            s = jnp.where((key < kv_end) & (key <= q_pos), s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no visible key yet: no NaN
            alpha = jnp.exp(m - m_use)
            p = jnp.exp(s - m_use)
            l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
            v = jnp.where(row_ok, v, jnp.zeros_like(v))  # stale rows may hold NaN/Inf
            pv = lax.dot_general(p.astype(cdtype), v, (((1,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=jnp.float32)
            return alpha * acc + pv, m_new, l

        init = (jnp.zeros((rows, head_dim), jnp.float32),
                jnp.full((rows, 1), -jnp.inf, jnp.float32),
                jnp.zeros((rows, 1), jnp.float32))
        acc, _, l = lax.fori_loop(0, n_blocks, body, init)
        o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("page_rows", "scale", "block_q",
                                             "pages_per_block", "interpret"))
def _prefill_mosaic(q, pool, layer, block_tables, q_starts, kv_lens, *, page_rows, scale,
                    block_q, pages_per_block, interpret):
    num_tokens, hq, hd = q.shape
    _, s_rows, width = pool.shape
    hkv = width // hd
    group = hq // hkv
    max_pages = block_tables.shape[1]
    num_pages = s_rows // (2 * page_rows)
    cdtype = jnp.promote_types(q.dtype, pool.dtype)
    precision = lax.Precision.HIGHEST if cdtype == jnp.float32 else None

    work = _work_list(q_starts, kv_lens, num_tokens, block_q)
    items = work.shape[0]
    i = jnp.arange(block_q, dtype=jnp.int32)
    src = work[:, 1:2] + i  # [W, BQ] packed row of each tile token
    # dense query tiles [W, Hkv, G * BQ, hd], rows head-major (g * BQ + i)
    qt = q[jnp.minimum(src, num_tokens - 1)].reshape(items, block_q, hkv, group, hd)
    qt = qt.transpose(0, 2, 3, 1, 4).reshape(items, hkv, group * block_q, hd)

    kernel = functools.partial(
        _prefill_kernel, block_q=block_q, page_rows=page_rows, pages_per_block=pages_per_block,
        max_pages=max_pages, num_pages=num_pages, head_dim=hd, scale=scale, cdtype=cdtype,
        precision=precision)
    tile = pl.BlockSpec((None, None, group * block_q, hd), lambda w, h, *_: (w, h, 0, 0))
    buf = pltpu.VMEM((2, pages_per_block, page_rows, hd), pool.dtype)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(items, hkv),
            in_specs=[tile, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=tile,
            scratch_shapes=[buf, buf, pltpu.SemaphoreType.DMA((2,)),
                            pltpu.SemaphoreType.DMA((2,))],
        ),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="paged_attention_prefill_tpu",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), work.reshape(-1),
      block_tables.astype(jnp.int32).reshape(-1), qt, pool)

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
    _attention._check_common(fn, q, pool, layer, block_tables, page_rows, scale)
    nseq = block_tables.shape[0]
    if jnp.shape(q_starts) != (nseq + 1,):
        raise ValueError(f"{fn}: q_starts must have shape ({nseq + 1},) (block_tables has "
                         f"{nseq} rows), got {jnp.shape(q_starts)}")
    if jnp.shape(kv_lens) != (nseq,):
        raise ValueError(f"{fn}: kv_lens must have shape ({nseq},), got {jnp.shape(kv_lens)}")
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
    if pages_per_block is None:
        pages_per_block = max(1, _TARGET_BLOCK_TOKENS // int(page_rows))
    elif not (isinstance(pages_per_block, numbers.Integral) and pages_per_block >= 1):
        raise ValueError(f"{fn}: pages_per_block must be None or an int >= 1, got "
                         f"{pages_per_block!r}")
    pages_per_block = int(min(pages_per_block, max(1, max_pages)))
    if num_tokens == 0 or nseq == 0 or max_pages == 0:  # nothing to attend: every row is 0
        return jnp.zeros(q.shape, q.dtype)
    interpret = _resolve_interpret(interpret)
    out = _prefill_mosaic(q, pool, layer, block_tables, q_starts, kv_lens,
                          page_rows=int(page_rows), scale=float(scale), block_q=int(block_q),
                          pages_per_block=pages_per_block, interpret=interpret)
    if interpret is not False and not isinstance(out, jax.core.Tracer):
        out.block_until_ready()  # see attention_tpu: eager interpreted calls must complete
    return out
