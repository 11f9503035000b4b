"""Paged attention over the unified pool, decode and (chunked) prefill: Pallas' TPU (Mosaic) lowering.

Same signatures and semantics as `reference.paged_attention_decode` /
`reference.paged_attention_prefill` (pool layout: see `reference.py`; the
geometry ``page_rows``, ``num_pages`` is given by the caller). The GPU kernels
of the same ops are `pallas_kernels.gpu.attention`; `pallas_kernels.kernel_set`
picks between them and runs the reference for shapes these cannot take
(`unsupported_reason`).

Decode
------
Grid ``(B, Hkv)``, both axes "parallel" (programs are independent, so a
megacore chip may split either axis). Program ``(b, h)`` owns sequence ``b``
and kv-head ``h``, with the ``G = Hq / Hkv`` query heads of its group as one
``[G, hd]`` matrix (q is viewed as ``[B, Hkv, G, hd]``, so the block's last two
dims are full dims for every G, no sublane padding rule applies to it).

Scalar prefetch (SMEM): the layer index, ``lengths`` and the flattened block
table (``B * M`` int32). The pool stays in HBM (``memory_space=pl.ANY``); the
kernel copies pages itself. A kernel iteration covers ``pages_per_block``
pages, ``C = pages_per_block * page_rows`` tokens: for each page ``j`` it
starts two async copies, the K slab
``pool[layer, page * page_rows : +page_rows, h * hd : +hd]`` and the V slab at
row ``(page + N) * page_rows``, into VMEM buffers ``[2, pages_per_block,
page_rows, hd]`` (double buffered: block ``i + 1`` is in flight while block
``i`` is computed). Pages at or past ``cdiv(length, page_rows)`` are not
copied at all (their buffer rows hold stale data, which is masked: scores of
keys ``>= length`` are ``-inf`` and their V rows are zeroed before ``p @ v``,
so stale NaN/Inf never reaches the output). Table entries are clamped to
``[0, N)`` and table positions to ``[0, M)``: no copy ever leaves the pool.

Online softmax in float32 (natural base, running max ``m`` and sum ``l`` as
``[G, 1]``, accumulator ``[G, hd]``). Both dots run in the compute dtype
``promote(q.dtype, pool.dtype)`` with float32 accumulation; float32 dots use
``Precision.HIGHEST`` (the reference is exact), bfloat16 dots are single-pass
(probabilities are rounded to the V dtype, as in the GPU kernel).
``lengths[b] <= 0`` writes zeros; lengths past ``M * page_rows`` are clamped
(the reference masks the same keys).

Prefill
-------
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
iteration, double buffered exactly as in decode (pages past
``kv_end`` are not copied; stale rows are masked and their V rows zeroed).
Causal mask: row ``r`` is query token ``i = r % BQ`` (a bit-and, BQ is a
power of two) at position ``pos0 + i`` and sees keys ``<= pos0 + i``. Online
softmax in float32; rows with no visible key yet keep ``m = -inf`` without
NaN (only malformed inputs, kv_len < chunk length, produce such rows).

Shape rules (TPU tiling; both kernels; checked, with a precise ``ValueError``)
------------------------------------------------------------------------------
* ``head_dim % 128 == 0``: a head's columns ``[h * hd, (h + 1) * hd)`` must be
  a whole number of 128-lane tiles for the copy out of the pool. Padding is not
  an option: it would mean copying the whole pool on every call. Models with
  ``head_dim`` 64 (or other) use the XLA reference on TPU (`kernel_set`
  routes them there with a warning; the functions here raise).
* ``page_rows % (8 * packing) == 0`` where ``packing = 4 // itemsize`` of the
  pool dtype: 8 for float32, 16 for bfloat16/float16, 32 for 8-bit types. A
  page's first row must start a native ``(8 * packing, 128)`` tile of the pool
  in HBM (Mosaic rejects copies at unaligned offsets in tiled dimensions).
* pool/q dtypes of at most 32 bits.
* The flattened block table sits in SMEM: ``B * M * 4`` bytes must fit (it is
  small for serving shapes; very wide tables would need a chunked variant).

Interpret mode: ``interpret=None`` picks TPU interpret mode
(``pltpu.InterpretParams()``: simulated HBM/VMEM, DMAs and semaphores, with
out-of-bounds reads raising and uninitialised VMEM filled with NaN) off a TPU
backend and the compiled kernel on one; ``True`` forces interpret mode, and
an ``InterpretParams`` instance is passed through. An eager (not traced)
interpreted call blocks until its result is ready: the interpreter's host
callbacks dispatch JAX ops themselves and can deadlock against ops dispatched
meanwhile on a CPU client with few cores. Under an outer ``jit`` the caller
should block on the result before dispatching more.

Tunables (keyword arguments): decode ``pages_per_block`` (pages copied and
attended per kernel iteration; None: about 256 keys, at most M); prefill
``block_q`` (query tokens per tile, a power of two >= 16) and
``pages_per_block``.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..common import LANES, cdiv, check_decode, check_prefill, mosaic_interpret, sublane_tile

__all__ = ["paged_attention_decode", "paged_attention_prefill", "unsupported_reason"]

_TARGET_BLOCK_TOKENS = 256  # default tokens per kernel iteration
_TARGET_Q_ROWS = 256  # default prefill query-tile rows (G * BQ)
_MIN_BQ = 16  # a bfloat16 tile's sublane count: the prefill q tile's rows stay whole tiles


def unsupported_reason(q, pool, page_rows) -> str | None:
    """Why the Mosaic kernels cannot take these shapes/dtypes (None: they can).

    Only the TPU-specific rules; the generic layout checks are `common.check_decode`'s and
    `common.check_prefill`'s.
    """
    hd = q.shape[-1]
    for name, dt in (("q", q.dtype), ("pool", pool.dtype)):
        if jnp.dtype(dt).itemsize > 4:
            return f"{name} dtype {jnp.dtype(dt).name} is wider than 32 bits (unsupported on TPU)"
    if hd % LANES:
        return (f"head_dim={hd} is not a multiple of {LANES}: a kv-head's columns of the pool "
                f"must be whole {LANES}-lane tiles (padding would copy the whole pool)")
    tile = sublane_tile(pool.dtype)
    if not isinstance(page_rows, numbers.Integral) or page_rows % tile:
        return (f"page_rows={page_rows} is not a multiple of {tile}: a page must start a "
                f"native ({tile}, {LANES}) tile of the {jnp.dtype(pool.dtype).name} pool")
    return None


def _page_dma(pool_hbm, bt_ref, k_buf, v_buf, k_sem, v_sem, *, seq, layer, col, n_pages, pages_per_block,
             max_pages, num_pages, page_rows, head_dim):
    """(start, wait) of the async copies of sequence `seq`'s K/V pages of key block `blk` (pages_per_block
    pages, one kv head's `head_dim` columns from `col`) from the pool in HBM into VMEM buffer `slot`.
    Pages past `n_pages` are not copied; table entries are clamped so that no copy leaves the pool."""
    def page_copies(blk, slot):
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

    return start, wait


def _attend_blocks(q, q_pos, kv_end, n_blocks, start, wait, k_buf, v_buf, *, block_tokens, head_dim, scale,
                  cdtype, precision):
    """Online-softmax attention of q [R, hd] over keys [0, kv_end) whose pages arrive block by block
    (_page_dma's start/wait, double-buffered); row r sees the keys at positions <= q_pos[r] ([R, 1]).
    Returns [R, hd] float32; a row that sees no key gets 0."""
    rows = q.shape[0]
    start(0, 0)

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
    return acc / jnp.where(l > 0, l, 1.0)


# --------------------------------------------------------------------------- shared kernel pieces and decode
def _attend_paged(q_ref, o_ref, pool_hbm, bt_ref, k_buf, v_buf, k_sem, v_sem, *, seq, layer, kv_end, q_pos,
                 page_rows, pages_per_block, max_pages, num_pages, head_dim, scale, cdtype, precision):
    """One program of a paged kernel (grid axis 1 = kv head): its query tile [R, hd] attends to sequence
    `seq`'s keys [0, kv_end), row r to those at positions <= q_pos(R)[r]; nothing to see: zeros."""
    block_tokens = pages_per_block * page_rows
    n_blocks = cdiv(kv_end, block_tokens)
    col = pl.multiple_of(pl.program_id(1) * head_dim, LANES)
    start, wait = _page_dma(pool_hbm, bt_ref, k_buf, v_buf, k_sem, v_sem, seq=seq, layer=layer, col=col,
                           n_pages=cdiv(kv_end, page_rows), pages_per_block=pages_per_block,
                           max_pages=max_pages, num_pages=num_pages, page_rows=page_rows, head_dim=head_dim)

    @pl.when(n_blocks == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    @pl.when(n_blocks > 0)
    def _():
        q = q_ref[...].astype(cdtype)
        out = _attend_blocks(q, q_pos(q.shape[0]), kv_end, n_blocks, start, wait, k_buf, v_buf,
                            block_tokens=block_tokens, head_dim=head_dim, scale=scale, cdtype=cdtype,
                            precision=precision)
        o_ref[...] = out.astype(o_ref.dtype)


def _decode_kernel(layer_ref, lengths_ref, bt_ref, q_ref, pool_hbm, o_ref, k_buf, v_buf,
                   k_sem, v_sem, *, page_rows, pages_per_block, max_pages, num_pages,
                   head_dim, scale, cdtype, precision):
    b = pl.program_id(0)
    length = jnp.minimum(jnp.maximum(lengths_ref[b], 0), max_pages * page_rows)
    # q: the group's query heads [G, hd], all at position length - 1
    _attend_paged(q_ref, o_ref, pool_hbm, bt_ref, k_buf, v_buf, k_sem, v_sem, seq=b, layer=layer_ref[0],
                 kv_end=length, q_pos=lambda rows: jnp.full((rows, 1), length - 1, jnp.int32),
                 page_rows=page_rows, pages_per_block=pages_per_block, max_pages=max_pages,
                 num_pages=num_pages, head_dim=head_dim, scale=scale, cdtype=cdtype, precision=precision)


@functools.partial(jax.jit,
                   static_argnames=("page_rows", "num_pages", "scale", "pages_per_block", "interpret"))
def _decode_mosaic(q, pool, layer, block_tables, lengths, *, page_rows, num_pages, scale, pages_per_block,
                   interpret):
    batch, hq, hd = q.shape
    hkv = pool.shape[-1] // hd
    qg = q.reshape(batch, hkv, hq // hkv, hd)
    out = _paged_call(_decode_kernel, qg, pool, (layer, lengths, block_tables), pages_per_block=pages_per_block,
                     page_rows=page_rows, num_pages=num_pages, scale=scale, name="paged_attention_decode_tpu",
                     interpret=interpret)
    return out.reshape(batch, hq, hd)


def _paged_call(kernel, q_tiles, pool, scalars, *, pages_per_block, page_rows, num_pages, scale, name,
               interpret, **kernel_kw):
    """The pallas_call both paged kernels make: grid (tiles, kv heads), one [rows, hd] query tile per
    program from q_tiles [N, Hkv, rows, hd], the pool left in HBM for the kernel's page DMAs into two
    double-buffered VMEM buffers, and three scalar-prefetch operands (the layer first, then int32
    arrays flattened, the block table last). `kernel` gets the geometry as keywords, plus kernel_kw."""
    n, hkv, _, hd = q_tiles.shape
    cdtype = jnp.promote_types(q_tiles.dtype, pool.dtype)
    kernel = functools.partial(
        kernel, page_rows=page_rows, pages_per_block=pages_per_block, max_pages=scalars[-1].shape[1],
        num_pages=num_pages, head_dim=hd, scale=scale, cdtype=cdtype,
        precision=lax.Precision.HIGHEST if cdtype == jnp.float32 else None, **kernel_kw)
    tile = pl.BlockSpec((None, None) + q_tiles.shape[2:], lambda w, h, *_: (w, h, 0, 0))
    buf = pltpu.VMEM((2, pages_per_block, page_rows, hd), pool.dtype)
    layer, *tables = scalars
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(n, hkv),
            in_specs=[tile, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=tile,
            scratch_shapes=[buf, buf, pltpu.SemaphoreType.DMA((2,)),
                            pltpu.SemaphoreType.DMA((2,))],
        ),
        out_shape=jax.ShapeDtypeStruct(q_tiles.shape, q_tiles.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name=name,
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), *(t.astype(jnp.int32).reshape(-1) for t in tables),
      q_tiles, pool)


def _choose_pages_per_block(fn: str, pages_per_block, page_rows: int, max_pages: int) -> int:
    """Pages per key block: the caller's (checked), else about _TARGET_BLOCK_TOKENS keys; at most M."""
    if pages_per_block is None:
        pages_per_block = max(1, _TARGET_BLOCK_TOKENS // int(page_rows))
    elif not (isinstance(pages_per_block, numbers.Integral) and pages_per_block >= 1):
        raise ValueError(f"{fn}: pages_per_block must be None or an int >= 1, got "
                         f"{pages_per_block!r}")
    return int(min(pages_per_block, max(1, max_pages)))


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


# --------------------------------------------------------------------------- prefill work list
def _work_list(q_starts, kv_lens, num_tokens, block_q):
    """[W, 4] int32 items (seq, first row, rows, position of first row), W static."""
    nseq = kv_lens.shape[0]
    qs = jnp.clip(q_starts.astype(jnp.int32), 0, num_tokens)
    n = jnp.maximum(qs[1:] - qs[:-1], 0)
    nblk = cdiv(n, block_q)
    cum = jnp.cumsum(nblk)
    start = cum - nblk
    # sum_b cdiv(n_b, BQ) < T / BQ + B for non-decreasing q_starts
    num_items = min(cdiv(num_tokens, block_q) + nseq, nseq * cdiv(num_tokens, block_q))
    wid = jnp.arange(num_items, dtype=jnp.int32)
    owner = jnp.searchsorted(cum, wid, side="right").astype(jnp.int32)
    live = owner < nseq
    seq = jnp.minimum(owner, nseq - 1)
    j = wid - start[seq]
    row0 = jnp.where(live, qs[seq] + j * block_q, 0)
    nrows = jnp.where(live, jnp.clip(n[seq] - j * block_q, 0, block_q), 0)
    pos0 = kv_lens.astype(jnp.int32)[seq] - n[seq] + j * block_q
    return jnp.stack([seq, row0, nrows, pos0], axis=1).astype(jnp.int32)


# --------------------------------------------------------------------------- prefill kernel
def _prefill_kernel(layer_ref, work_ref, bt_ref, q_ref, pool_hbm, o_ref, k_buf, v_buf,
                    k_sem, v_sem, *, block_q, page_rows, pages_per_block, max_pages,
                    num_pages, head_dim, scale, cdtype, precision):
    w = pl.program_id(0)
    seq, nrows, pos0 = work_ref[4 * w], work_ref[4 * w + 2], work_ref[4 * w + 3]
    kv_end = jnp.where(nrows > 0,
                       jnp.minimum(jnp.maximum(pos0 + nrows, 0), max_pages * page_rows), 0)

    def q_pos(rows):  # position of each row's query token: rows are g * BQ + i
        return pos0 + (lax.broadcasted_iota(jnp.int32, (rows, 1), 0) & (block_q - 1))

    _attend_paged(q_ref, o_ref, pool_hbm, bt_ref, k_buf, v_buf, k_sem, v_sem, seq=seq, layer=layer_ref[0],
                 kv_end=kv_end, q_pos=q_pos, page_rows=page_rows, pages_per_block=pages_per_block,
                 max_pages=max_pages, num_pages=num_pages, head_dim=head_dim, scale=scale, cdtype=cdtype,
                 precision=precision)


@functools.partial(jax.jit, static_argnames=("page_rows", "num_pages", "scale", "block_q",
                                             "pages_per_block", "interpret"))
def _prefill_mosaic(q, pool, layer, block_tables, q_starts, kv_lens, *, page_rows, num_pages, scale,
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

    out = _paged_call(_prefill_kernel, qt, pool, (layer, work, block_tables), pages_per_block=pages_per_block,
                     page_rows=page_rows, num_pages=num_pages, scale=scale, name="paged_attention_prefill_tpu",
                     interpret=interpret, block_q=block_q)

    # back to [T, Hq, hd]: each packed row of an item reads its tile row; other rows read a 0 row
    flat = out.reshape(items, hkv, group, block_q, hd).transpose(0, 3, 1, 2, 4)
    flat = jnp.concatenate([flat.reshape(items * block_q, hq, hd),
                            jnp.zeros((1, hq, hd), q.dtype)])
    dest = jnp.where(i < work[:, 2:3], src, num_tokens).reshape(-1)  # T: dropped
    inv = jnp.full((num_tokens,), items * block_q, jnp.int32).at[dest].set(
        jnp.arange(items * block_q, dtype=jnp.int32), mode="drop")
    return flat[inv]


# --------------------------------------------------------------------------- wrappers
def _eager_wait(out, interpret):
    """TPU interpret mode runs the kernel as host callbacks that themselves dispatch JAX ops; with other ops
    dispatched meanwhile from this thread, a CPU client with few cores can deadlock. An eager interpreted
    call therefore completes before returning."""
    if interpret is not False and not isinstance(out, jax.core.Tracer):
        out.block_until_ready()
    return out


def _check_supported(fn, q, pool, page_rows):
    reason = unsupported_reason(q, pool, page_rows)
    if reason is not None:
        raise ValueError(f"{fn}: the TPU kernel does not support these shapes: {reason}; "
                         f"use the xla backend")


def paged_attention_decode(q, pool, layer, block_tables, lengths, *, page_rows: int, num_pages: int,
                           scale: float, interpret=None, pages_per_block: int | None = None):
    """One query per sequence over its first ``lengths[b]`` tokens (GQA-aware), on TPU.

    q: [B, Hq, hd]; pool: [L, S, W] with W = Hkv * hd and S = 2 * num_pages * page_rows;
    layer: int32 scalar (may be traced); block_tables: [B, M] int32 page indices; lengths:
    [B] int32 (<= 0: output 0). Returns [B, Hq, hd] in q's dtype. Semantics:
    `reference.paged_attention_decode`. Needs head_dim % 128 == 0 and page_rows a
    multiple of the pool dtype's sublane tile (8 for float32, 16 for bfloat16);
    see the module docstring.

    interpret: None (TPU interpret mode off a TPU backend, compiled on one), True/False,
    or a `pltpu.InterpretParams`. pages_per_block: pages copied and attended per kernel
    iteration (None: about 256 tokens, at most M).
    """
    fn = "paged_attention_decode(tpu)"
    check_decode(fn, q, pool, layer, block_tables, lengths, page_rows=page_rows, num_pages=num_pages,
                 scale=scale)
    _check_supported(fn, q, pool, page_rows)
    max_pages = block_tables.shape[1]
    pages_per_block = _choose_pages_per_block(fn, pages_per_block, page_rows, max_pages)
    if q.shape[0] == 0 or max_pages == 0:  # nothing to read: every output row is 0
        return jnp.zeros(q.shape, q.dtype)
    interpret = mosaic_interpret(interpret)
    out = _decode_mosaic(q, pool, layer, block_tables, lengths, page_rows=int(page_rows),
                         num_pages=int(num_pages), scale=float(scale), pages_per_block=pages_per_block,
                         interpret=interpret)
    return _eager_wait(out, interpret)


def paged_attention_prefill(q, pool, layer, block_tables, q_starts, kv_lens, *, page_rows: int,
                            num_pages: int, scale: float, interpret=None, block_q: int | None = None,
                            pages_per_block: int | None = None):
    """Causal attention of packed query chunks over their sequences' pages, on TPU.

    q: [T, Hq, hd]; sequence b's queries are rows q_starts[b]:q_starts[b+1] ([B+1]
    int32, non-decreasing) at the last positions of its kv_lens[b] tokens, whose K/V
    (the chunk's own included) are in the pool. Rows outside [q_starts[0],
    q_starts[-1]) are padding (output 0). Returns [T, Hq, hd] in q's dtype.
    Semantics: `reference.paged_attention_prefill`; shape rules: as decode.

    interpret: as in `paged_attention_decode`. block_q: query tokens per tile (a power
    of two >= 16; None: about 256 / G tile rows, at most next_pow2(T)). pages_per_block:
    pages per kernel iteration (None: about 256 keys, at most M).
    """
    fn = "paged_attention_prefill(tpu)"
    check_prefill(fn, q, pool, layer, block_tables, q_starts, kv_lens, page_rows=page_rows,
                  num_pages=num_pages, scale=scale)
    _check_supported(fn, q, pool, page_rows)
    nseq = block_tables.shape[0]
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
    pages_per_block = _choose_pages_per_block(fn, pages_per_block, page_rows, max_pages)
    if num_tokens == 0 or nseq == 0 or max_pages == 0:  # nothing to attend: every row is 0
        return jnp.zeros(q.shape, q.dtype)
    interpret = mosaic_interpret(interpret)
    out = _prefill_mosaic(q, pool, layer, block_tables, q_starts, kv_lens,
                          page_rows=int(page_rows), num_pages=int(num_pages), scale=float(scale),
                          block_q=int(block_q), pages_per_block=pages_per_block, interpret=interpret)
    return _eager_wait(out, interpret)
