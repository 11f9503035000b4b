"""Segmented multi-LoRA kernels over the unified pool: Pallas' TPU (Mosaic) lowering.

Same contract as the GPU kernels of `pallas_kernels.gpu.lora` (the exact
semantics are `reference.lora_shrink` / `reference.lora_expand`; the pool layout
``[L, S, W]`` and the segments are described in `reference`'s docstring). Off
TPU (``interpret=None`` there) the kernels run in Pallas' TPU interpret mode
(``pltpu.InterpretParams``), which simulates VMEM / SMEM / HBM, DMAs and
semaphores on CPU.

Why not the GPU design: Mosaic has no vector gathers (the Triton kernels load
``pool[layer, idx[:, None], cols]`` with a vector of row indices), and TPU
blocks are moved by DMA in tiles of ``(8, 128)`` 32-bit elements
(``(16, 128)`` for 16-bit), so tiles must be lane- and sublane-aligned.

Design (both kernels)
---------------------
* Scalar prefetch (``pltpu.PrefetchScalarGridSpec``) puts the small tables in
  SMEM before the grid runs: ``layer``, ``seg_starts``, the ranks and the
  pool-row tables (flattened to 1-D, as SMEM pads 2-D
  arrays). Everything data-dependent (which segment, which pool row) is a
  scalar read from SMEM.
* The pool stays in HBM (``memory_space=pl.ANY``). An adapter's rows are
  fetched by manual DMA (``pltpu.make_async_copy``), one ``[1, W]`` pool row
  per copy, into a VMEM scratch buffer with two slots (double buffering):
  only rows ``j < rank`` are copied, so DMA traffic follows the real rank.
  All copies of one segment signal the slot's DMA semaphore and are waited
  for with a same-shaped descriptor, once per copy.
* Grid ``(outer, token block)``: the activations / outputs are ordinary
  pipelined ``BlockSpec`` blocks of ``BT`` tokens (Pallas double-buffers
  them). A token block loops over the segments that intersect it (found by a
  scalar binary search over ``seg_starts``); for each, it waits for that
  segment's adapter rows while the next segment's rows are already being
  copied into the other slot, multiplies the whole ``BT``-row tile on the MXU
  (float32 accumulation) and merges the rows of that segment into the output
  tile with a row mask (``jnp.where``). Empty segments, rank-0 segments and
  padding tokens issue no DMA and no matmul; their output rows are zeros
  (shrink) or ``y`` unchanged, bit for bit (expand).
* The adapter of the last segment of a block stays in its slot (an SMEM
  scalar remembers which segment that is), so a long prefill segment spanning
  many token blocks is fetched once, not once per block. This needs the token
  block axis to run in order ("arbitrary"); the outer axis is "parallel"
  (megacore) and resets the cache at its first token block.
* Rank blocks of ``BR`` rows: ``BR = R`` rounded up to the sublane tile when
  ``R <= 128``, else 128 (one MXU width); blocks at or past the segment's rank
  are skipped (``pl.when``), so a rank-8 adapter in an ``R = 256`` batch does
  one block of work.

Block choices: ``BT`` = 16 tokens for decode-like batches (many 1-token
segments: the smallest block that is a whole sublane tile for both 32-bit
(8) and 16-bit (16) activations, so little MXU work is wasted on rows of
other segments) and 128 for prefill-like batches (one MXU height; fewer grid
steps and, with the segment cache, fewer adapter fetches). ``block_t`` may be
given (a multiple of 16): it is the only tunable.

Shrink (``[M, T, R]`` float32)
------------------------------
Grid ``(M, ceil(T / BT))``. ``x`` block ``[BT, D_in_p]`` (``D_in`` rounded up
to 128 lanes; the columns past ``D_in`` are masked), output block
``[BT, R]`` of module ``m``. The scratch holds ``[2, K_in, Rp, W]``: for
each slot, the ``K_in`` pool rows of each of the segment's ``A^T`` rows.
The product is ``sum_c x[:, c*W:(c+1)*W] @ A_c^T`` (``K_in`` NT matmuls of
``[BT, W] x [W, BR]``); in the last chunk the columns past ``D_in`` are masked
to zero on both sides (the pool's padding columns are never trusted).
16-bit ``x`` and pool: 16-bit MXU inputs, float32 accumulation (exact
products); anything else runs in float32 at ``Precision.HIGHEST``.

Expand (``y``'s dtype, ``y`` aliased to the output)
---------------------------------------------------
Grid ``(K_out, ceil(T / BT))``: program ``(c, i)`` owns output columns
``[c*W, (c+1)*W)`` (pool row ``c`` of every ``B`` row) of token block ``i``.
Scratch ``[2, Rp, W]`` holds pool row ``c`` of each of the segment's ``B``
rows. ``delta = v[:, :rank] @ B[:rank, cW:(c+1)W]`` (rows of ``B``
at or past the rank are zeroed in VMEM, so stale or uninitialised scratch
never reaches the result); rows of the segment get ``y + delta``, every
other row keeps ``y``. With a bf16 pool, ``v`` is split into a bf16
high and low part (two MXU passes), which keeps about float32 accuracy.
`lora_expand_group` (the modules sharing one shrink) runs one expand per
module on the summed split-K partials.

Constraints (compiled): ``W % 128 == 0`` (pool rows are DMA'd into
lane-aligned tiles and ``y`` is tiled ``W`` columns wide), and the index
tables must fit the SMEM budget (`SMEM_TABLE_BUDGET`, 512 KiB: shrink needs
about ``4 * M * NS * R * K_in`` bytes, expand ``4 * NS * R * K_out``; e.g. a
Llama-3-8B down_proj shrink (``K_in = 14``) with R = 64 fits up to ~140
segments). These functions raise when either fails (in interpret mode only the
width rule applies: SMEM is not simulated); `shrink_unsupported` /
`expand_unsupported` say why, and `pallas_kernels.kernel_set` runs the
reference for such shapes.

Open questions for hardware (the kernels are tested in TPU interpret mode and
their Pallas -> Mosaic lowering is checked on CPU, but Mosaic's own compiler
passes run only in libtpu):
* every pool row is its own DMA of ``[1, W]`` into row ``j`` of a tiled VMEM
  buffer, i.e. a destination smaller than one ``(8, 128)`` tile at a dynamic
  sublane offset; if Mosaic rejects or serialises such DMAs, the fix is a
  buffer whose row axis is untiled (more VMEM) or adapter pages of 8-16 rows
  copied as whole tiles (DESIGN.md section 3);
* the cost of many small DMAs per segment (``rank * K`` of them) and of the
  scalar work per segment in decode batches (one segment per token);
* VMEM: the scratch is ``2 * K * Rp * W`` pool elements; when the estimate
  passes 12 MiB the kernel raises Mosaic's scoped VMEM limit (up to 100 MiB);
* a future version could fetch the index rows of each segment by DMA instead
  of scalar-prefetching the whole tables, lifting the SMEM limit.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..common import (LANES, cdiv, check_lora_expand, check_lora_expand_group, check_lora_shrink, decode_like,
                      mosaic_interpret, round_up, sublane_tile)

__all__ = ["lora_shrink", "lora_expand", "lora_expand_group", "shrink_unsupported", "expand_unsupported",
           "block_t_default"]

# Bytes of index tables the kernels may scalar-prefetch into SMEM (1 MiB per core on TPU v4 and later;
# half is left to Mosaic and to SMEM padding).
SMEM_TABLE_BUDGET = 512 * 1024


# --------------------------------------------------------------------------- helpers
def _width_reason(w: int) -> str | None:
    if w % LANES:
        return (f"the TPU kernels need the pool width W to be a multiple of {LANES} "
                f"(lane-aligned DMA tiles), got W = {w}")
    return None


def _smem_reason(n_words: int) -> str | None:
    if 4 * n_words > SMEM_TABLE_BUDGET:
        return (f"the index tables ({4 * n_words} bytes) exceed the TPU kernels' SMEM budget for "
                f"scalar prefetch ({SMEM_TABLE_BUDGET} bytes)")
    return None


def _shrink_words(m: int, ns: int, r: int, k: int) -> int:
    return m * ns * r * k + m * ns + ns + 2  # a_rows, ranks, seg_starts, layer


def _expand_words(ns: int, r: int, k: int) -> int:
    return ns * r * k + ns + ns + 2  # b_rows, ranks, seg_starts, layer


def shrink_unsupported(pool_shape, a_rows_shape) -> str | None:
    """Why the compiled TPU shrink cannot run on these shapes (None: it can)."""
    return _width_reason(pool_shape[-1]) or _smem_reason(_shrink_words(*a_rows_shape))


def expand_unsupported(pool_shape, b_rows_shape) -> str | None:
    """Why the compiled TPU expand cannot run on these shapes (None: it can)."""
    return _width_reason(pool_shape[-1]) or _smem_reason(_expand_words(*b_rows_shape))


def block_t_default(t: int, ns: int) -> int:
    """16 tokens for decode-like batches (many short segments), 128 for prefill-like ones."""
    return 16 if decode_like(t, ns) else 128


def _check_block_t(name: str, block_t) -> None:
    if not isinstance(block_t, int) or block_t < 16 or block_t % 16:
        raise ValueError(f"{name}: block_t must be a positive multiple of 16 on TPU, got {block_t!r}")


def _tunables(name: str, tunables: dict) -> int | None:
    given = {k: v for k, v in tunables.items() if v is not None}
    unknown = sorted(set(given) - {"block_t"})
    if unknown:
        raise TypeError(f"{name}: unknown tunable(s) {unknown} for the TPU kernels; allowed: ['block_t']")
    bt = given.get("block_t")
    if bt is not None:
        _check_block_t(name, bt)
    return bt


def _entry_checks(name: str, interpret, pool_shape, rows_shape, unsupported, tunables: dict):
    """Both entry points' checks -> (interpret params, block_t). The width rule holds in interpret mode
    too (it tests what runs on TPU); SMEM limits are not simulated there, so `unsupported` is skipped."""
    interpret = mosaic_interpret(interpret)
    reason = _width_reason(pool_shape[-1]) or (None if interpret else unsupported(pool_shape, rows_shape))
    if reason:
        raise ValueError(f"{name}: {reason}")
    return interpret, _tunables(name, tunables)


def _compute_dtype(*dtypes) -> jnp.dtype:
    """bf16 tiles stay bf16 (MXU-native, exact products); anything else is float32."""
    dts = {jnp.dtype(d) for d in dtypes}
    if dts == {jnp.dtype(jnp.bfloat16)}:
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


def _dot(a, b, cdt, *, trans_b: bool):
    """[m, k] x [k, n] (or [n, k] with trans_b) with float32 accumulation."""
    prec = lax.Precision.HIGHEST if cdt == jnp.float32 else None
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(a.astype(cdt), b.astype(cdt), dims, precision=prec,
                           preferred_element_type=jnp.float32)


def _vmem_limit(estimate: int) -> int | None:
    if estimate <= 12 * 2**20:
        return None  # Mosaic's default scoped limit is enough
    return min(100 * 2**20, int(estimate * 1.25) + 4 * 2**20)


def _compiler_params(estimate: int):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                vmem_limit_bytes=_vmem_limit(estimate))


def _layer_array(layer) -> jax.Array:
    return jnp.asarray(layer, jnp.int32).reshape(1)


# --------------------------------------------------------------------------- in-kernel scalar helpers
class _Segments:
    """Scalar views of the segment table of one token block ``[lo, hi)`` (SMEM reads only)."""

    def __init__(self, starts_ref, *, ns: int, t: int, lo, hi):
        self.starts_ref, self.ns, self.t, self.lo, self.hi = starts_ref, ns, t, lo, hi

    def start(self, s):
        """seg_starts[s] clipped to [0, T] (s clamped into [0, NS]: never an out-of-range read)."""
        return jnp.clip(self.starts_ref[jnp.clip(s, 0, self.ns)], 0, self.t)

    def count_le(self, tok):
        """Number of s in [0, NS] with start(s) <= tok (binary search; starts are nondecreasing)."""
        ns = self.ns

        def body(_, carry):
            lo, hi = carry
            mid = lax.div(lo + hi, 2)
            le = self.start(mid) <= tok
            go = lo < hi
            return jnp.where(go & le, mid + 1, lo), jnp.where(go & ~le, mid, hi)

        n_steps = (ns + 1).bit_length() + 1
        lo, _ = lax.fori_loop(0, n_steps, body, (jnp.int32(0), jnp.int32(ns + 1)))
        return lo

    def span(self, s):
        """Tokens of segment s inside this block: [a, b) (empty when a >= b)."""
        return jnp.maximum(self.start(s), self.lo), jnp.minimum(self.start(s + 1), self.hi)

    def range(self):
        """First and last segment (in [0, NS - 1]) that may have tokens in this block."""
        s_a = jnp.maximum(self.count_le(self.lo) - 1, 0)
        s_b = jnp.minimum(self.count_le(self.hi - 1) - 1, self.ns - 1)
        return s_a, s_b


def _segment_loop(segs: _Segments, key_ref, *, rank_of, issue, wait, compute):
    """Walk the segments of one token block with double-buffered adapter fetches.

    rank_of(s): the segment's rank (clamped to [0, R]); issue(s, slot) /
    wait(s, slot): start / wait for the copies of segment s into a slot;
    compute(s, slot): use them. key_ref (SMEM int32[2]) = (segment held in
    slot key_ref[1] from the previous block, or -1; that slot).
    """
    s_a, s_b = segs.range()
    nonempty = s_a <= s_b

    def needed(s):
        s = jnp.clip(s, 0, segs.ns - 1)  # never an out-of-range table read
        a, b = segs.span(s)
        return (rank_of(s) > 0) & (a < b)

    cached = nonempty & (key_ref[0] == s_a)
    base = jnp.where(cached, key_ref[1], 0)

    def slot_of(s):
        return lax.rem(base + s - s_a, 2)

    @pl.when(nonempty & ~cached & needed(s_a))
    def _():
        issue(s_a, base)

    def body(s, carry):
        slot = slot_of(s)
        nxt = jnp.minimum(s + 1, segs.ns - 1)

        @pl.when((s < s_b) & needed(nxt))
        def _():
            issue(nxt, 1 - slot)  # overlaps with this segment's wait and matmul

        need = needed(s)

        @pl.when(need & ~(cached & (s == s_a)))
        def _():
            wait(s, slot)

        @pl.when(need)
        def _():
            compute(s, slot)

        return carry

    lax.fori_loop(s_a, s_b + 1, body, jnp.int32(0))
    last_ok = nonempty & needed(s_b)
    key_ref[0] = jnp.where(last_ok, s_b, -1)
    key_ref[1] = jnp.where(last_ok, slot_of(s_b), 0)


def _row_copies(n, k, make):
    """Start (or wait for) the copies of rows j < n, pool rows c < k: make(j, c) -> descriptor op."""

    def body(j, carry):
        for c in range(k):
            make(j, c)
        return carry

    lax.fori_loop(0, n, body, jnp.int32(0))


def _program_start(i, key_ref, layer_ref, starts_ref, *, n_layers, ns, t, bt):
    """What both kernels do first: forget the adapter cached in scratch at the start of a grid column
    (i == 0); return the layer (negative counts from the end, clamped) and token block i's segments."""
    @pl.when(i == 0)
    def _():
        key_ref[0] = -1
        key_ref[1] = 0

    layer = layer_ref[0]
    layer = jnp.clip(jnp.where(layer < 0, layer + n_layers, layer), 0, n_layers - 1)
    lo = i * bt
    return layer, _Segments(starts_ref, ns=ns, t=t, lo=lo, hi=jnp.minimum(lo + bt, t))


# --------------------------------------------------------------------------- shrink
def _shrink_kernel(layer_ref, starts_ref, ranks_ref, rows_ref, x_ref, pool_ref, out_ref,
                   abuf, sems, key_ref, *, n_layers, n_rows, ns, t, d, w, k, r, br, nrb, bt, cdt):
    m = pl.program_id(0)
    i = pl.program_id(1)

    layer, segs = _program_start(i, key_ref, layer_ref, starts_ref, n_layers=n_layers, ns=ns, t=t, bt=bt)
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    def rank_of(s):
        return jnp.clip(ranks_ref[m * ns + s], 0, r)

    def copy(s, slot, j, c):
        row = jnp.clip(rows_ref[((m * ns + s) * r + j) * k + c], 0, n_rows - 1)
        return pltpu.make_async_copy(pool_ref.at[layer, pl.ds(row, 1), :],
                                     abuf.at[slot, c, pl.ds(j, 1), :], sems.at[slot])

    def issue(s, slot):
        _row_copies(rank_of(s), k, lambda j, c: copy(s, slot, j, c).start())

    def wait(s, slot):
        # Every copy moves one [1, W] row: wait once per copy on the slot's semaphore.
        desc = pltpu.make_async_copy(pool_ref.at[0, pl.ds(0, 1), :], abuf.at[slot, 0, pl.ds(0, 1), :],
                                     sems.at[slot])
        _row_copies(rank_of(s), k, lambda j, c: desc.wait())

    tail = d - (k - 1) * w  # columns of x in the last pool row, 1..W
    tail_p = min(w, round_up(tail, LANES))

    def compute(s, slot):
        a, b = segs.span(s)
        rank = rank_of(s)
        for rb in range(nrb):
            c0 = rb * br
            wr = min(br, r - c0)

            @pl.when(rank > c0)
            def _():
                acc = jnp.zeros((bt, br), jnp.float32)
                for c in range(k):
                    width = w if c < k - 1 else tail_p
                    xc = x_ref[:, c * w:c * w + width]
                    ac = abuf[slot, c, c0:c0 + br, :width]
                    if c == k - 1 and tail < width:  # mask columns past D_in on both sides
                        xc = jnp.where(lax.broadcasted_iota(jnp.int32, xc.shape, 1) < tail, xc, 0)
                        ac = jnp.where(lax.broadcasted_iota(jnp.int32, ac.shape, 1) < tail, ac, 0)
                    acc = acc + _dot(xc, ac, cdt, trans_b=True)
                acc = acc[:, :wr]
                tok = segs.lo + lax.broadcasted_iota(jnp.int32, (bt, wr), 0)
                col = c0 + lax.broadcasted_iota(jnp.int32, (bt, wr), 1)
                keep = (tok >= a) & (tok < b) & (col < rank)
                out_ref[:, c0:c0 + wr] = jnp.where(keep, acc, out_ref[:, c0:c0 + wr])

    _segment_loop(segs, key_ref, rank_of=rank_of, issue=issue, wait=wait, compute=compute)


@functools.partial(jax.jit, static_argnames=("block_t", "interpret"))
def _shrink_call(x, pool, layer, seg_starts, seg_ranks, a_rows, *, block_t, interpret):
    t, d = x.shape
    n_layers, n_rows, w = pool.shape
    m, ns, r, k = a_rows.shape
    bt = block_t
    sub = sublane_tile(pool.dtype)
    br = round_up(r, sub) if r <= LANES else LANES
    nrb = cdiv(r, br)
    rp = nrb * br
    dp = round_up(d, LANES)
    kernel = functools.partial(
        _shrink_kernel, n_layers=n_layers, n_rows=n_rows, ns=ns, t=t, d=d, w=w, k=k, r=r, br=br,
        nrb=nrb, bt=bt, cdt=_compute_dtype(x.dtype, pool.dtype),
    )
    isz = jnp.dtype(pool.dtype).itemsize
    estimate = (2 * k * rp * w * isz + 2 * bt * dp * jnp.dtype(x.dtype).itemsize
                + 2 * bt * round_up(r, LANES) * 4)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(m, cdiv(t, bt)),
        in_specs=[
            pl.BlockSpec((bt, dp), lambda mi, i, *_: (i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((None, bt, r), lambda mi, i, *_: (mi, i, 0)),
        scratch_shapes=[
            pltpu.VMEM((2, k, rp, w), pool.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SMEM((2,), jnp.int32),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((m, t, r), jnp.float32),
        compiler_params=_compiler_params(estimate),
        interpret=interpret,
        name=f"lora_shrink_tpu_bt{bt}_br{br}",
    )(layer, seg_starts, seg_ranks.reshape(-1), a_rows.reshape(-1), x, pool)


def lora_shrink(x, pool, layer, seg_starts, seg_ranks, a_rows, *, interpret=None, partials: bool = False,
                **tunables):
    """v[m, t, j] = x[t] . A_m(seg(t))[:, j] for j < rank, else 0 (see `reference.lora_shrink`).

    x: [T, D_in]; pool: [L, S, W] with W % 128 == 0; layer: int32 scalar (may be traced);
    seg_starts: [NS + 1] int32; seg_ranks: [M, NS] int32; a_rows: [M, NS, R, K_in] int32.
    Returns float32 [M, T, R] ([1, M, T, R] with ``partials=True``, the split-K form the
    expands take; this kernel does not split K).

    interpret: None (TPU interpret mode off a TPU backend, compiled on one), True/False, or a
    `pltpu.InterpretParams`. tunables: block_t (multiple of 16; default `block_t_default`).
    """
    name = "lora_shrink"
    check_lora_shrink(name, x, pool, layer, seg_starts, seg_ranks, a_rows)
    interpret, bt = _entry_checks(name, interpret, pool.shape, a_rows.shape, shrink_unsupported, tunables)
    t, d = x.shape
    m, ns, r, _ = a_rows.shape
    if t == 0 or r == 0 or m == 0 or ns == 0 or d == 0:
        v = jnp.zeros((m, t, r), jnp.float32)
    else:
        v = _shrink_call(
            x, pool, _layer_array(layer), seg_starts.astype(jnp.int32), seg_ranks.astype(jnp.int32),
            a_rows.astype(jnp.int32), block_t=bt or block_t_default(t, ns), interpret=interpret,
        )
    return v[None] if partials else v


# --------------------------------------------------------------------------- expand
def _expand_kernel(layer_ref, starts_ref, ranks_ref, rows_ref, v_ref, pool_ref, y_ref,
                   o_ref, bbuf, sems, key_ref, delta_ref, *, n_layers, n_rows, ns, t, w, k, r, br,
                   nrb, bt, cdt):
    c = pl.program_id(0)
    i = pl.program_id(1)

    layer, segs = _program_start(i, key_ref, layer_ref, starts_ref, n_layers=n_layers, ns=ns, t=t, bt=bt)
    o_ref[...] = y_ref[...]

    def rank_of(s):
        return jnp.clip(ranks_ref[s], 0, r)

    def copy(s, slot, j):
        row = jnp.clip(rows_ref[(s * r + j) * k + c], 0, n_rows - 1)
        return pltpu.make_async_copy(pool_ref.at[layer, pl.ds(row, 1), :],
                                     bbuf.at[slot, pl.ds(j, 1), :], sems.at[slot])

    def issue(s, slot):
        _row_copies(rank_of(s), 1, lambda j, _: copy(s, slot, j).start())

    def wait(s, slot):
        desc = pltpu.make_async_copy(pool_ref.at[0, pl.ds(0, 1), :], bbuf.at[slot, pl.ds(0, 1), :],
                                     sems.at[slot])
        _row_copies(rank_of(s), 1, lambda j, _: desc.wait())

    def compute(s, slot):
        a, b = segs.span(s)
        rank = rank_of(s)
        delta_ref[...] = jnp.zeros(delta_ref.shape, jnp.float32)
        for rb in range(nrb):
            c0 = rb * br

            @pl.when(rank > c0)
            def _():
                # Whole (tile-aligned) rank blocks: v's block is >= R wide, columns >= rank and
                # B rows >= rank (stale or uninitialised scratch) are zeroed.
                vt = v_ref[:, c0:c0 + br].astype(jnp.float32)
                vt = jnp.where(c0 + lax.broadcasted_iota(jnp.int32, (bt, br), 1) < rank, vt, 0.0)
                bt_ = bbuf[slot, c0:c0 + br, :]
                bt_ = jnp.where(c0 + lax.broadcasted_iota(jnp.int32, (br, w), 0) < rank, bt_, 0)
                if cdt == jnp.float32:
                    part = _dot(vt, bt_, cdt, trans_b=False)
                else:  # bf16 MXU passes at about float32 accuracy: v = hi + lo
                    v_hi = vt.astype(cdt)
                    v_lo = vt - v_hi.astype(jnp.float32)
                    part = _dot(v_hi, bt_, cdt, trans_b=False) + _dot(v_lo, bt_, cdt, trans_b=False)
                delta_ref[...] += part

        tok = segs.lo + lax.broadcasted_iota(jnp.int32, (bt, w), 0)
        keep = (tok >= a) & (tok < b)
        new = (y_ref[...].astype(jnp.float32) + delta_ref[...]).astype(o_ref.dtype)
        o_ref[...] = jnp.where(keep, new, o_ref[...])

    _segment_loop(segs, key_ref, rank_of=rank_of, issue=issue, wait=wait, compute=compute)


@functools.partial(jax.jit, static_argnames=("block_t", "interpret"))
def _expand_call(y, v, pool, layer, seg_starts, seg_ranks, b_rows, *, block_t, interpret):
    t, d = y.shape
    n_layers, n_rows, w = pool.shape
    ns, r, k = b_rows.shape
    bt = block_t
    sub = sublane_tile(pool.dtype)
    br = round_up(r, sub) if r <= LANES else LANES
    nrb = cdiv(r, br)
    rp = nrb * br
    cdt = jnp.dtype(jnp.bfloat16) if jnp.dtype(pool.dtype) == jnp.bfloat16 else jnp.dtype(jnp.float32)
    kernel = functools.partial(
        _expand_kernel, n_layers=n_layers, n_rows=n_rows, ns=ns, t=t, w=w, k=k, r=r, br=br, nrb=nrb,
        bt=bt, cdt=cdt,
    )
    vb = round_up(rp, LANES)  # v's block: whole rank blocks, lane-aligned (columns >= R masked)
    estimate = (2 * rp * w * jnp.dtype(pool.dtype).itemsize + 4 * bt * w * jnp.dtype(y.dtype).itemsize
                + 2 * bt * vb * 4 + bt * w * 4)
    # y aliased to the output: 4 scalar-prefetch operands, then v, pool, y. TPU interpret mode (jax
    # 0.10.2 and 0.11.2) returns an aliased output with the input's block padding when T or D_out is
    # not a multiple of the block, so there it aliases only unpadded shapes (every output block is
    # written in full either way, so the result is the same).
    padded = t % bt or d % w
    aliases = {} if (interpret and padded) else {6: 0}
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(k, cdiv(t, bt)),
        in_specs=[
            pl.BlockSpec((bt, vb), lambda c, i, *_: (i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec((bt, w), lambda c, i, *_: (i, c)),
        ],
        out_specs=pl.BlockSpec((bt, w), lambda c, i, *_: (i, c)),
        scratch_shapes=[
            pltpu.VMEM((2, rp, w), pool.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SMEM((2,), jnp.int32),
            pltpu.VMEM((bt, w), jnp.float32),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        input_output_aliases=aliases,
        compiler_params=_compiler_params(estimate),
        interpret=interpret,
        name=f"lora_expand_tpu_bt{bt}_br{br}",
    )(layer, seg_starts, seg_ranks, b_rows.reshape(-1), v, pool, y)


def lora_expand(y, v, pool, layer, seg_starts, seg_ranks, b_rows, *, interpret=None, **tunables):
    """y[t] + sum_{j < rank} v[t, j] * B(seg(t))[j, :] (see `reference.lora_expand`).

    y: [T, D_out] (returned in its dtype, aliased to the output: donate it to update in place);
    v: [T, R] float32; pool: [L, S, W] with W % 128 == 0; seg_starts: [NS + 1]; seg_ranks: [NS];
    b_rows: [NS, R, K_out]. interpret, tunables: as in `lora_shrink`.
    """
    check_lora_expand("lora_expand", y, v, pool, layer, seg_starts, seg_ranks, b_rows)
    return _expand(y, v, pool, layer, seg_starts, seg_ranks, b_rows, interpret, tunables)


def lora_expand_group(ys, v, pool, layer, seg_starts, seg_ranks, b_rows, *, interpret=None, **tunables) -> tuple:
    """`lora_expand` of the M modules sharing one shrink: ys[m] + v[m] @ B_m, one expand per module.

    ys: M x [T, D_m]; v: [M, T, R] float32 or [KS, M, T, R] split-K partial sums (summed here);
    seg_ranks: [M, NS]; b_rows: M x [NS, R, K_m]. Returns a tuple of M arrays.
    """
    ys, b_rows = tuple(ys), tuple(b_rows)
    check_lora_expand_group("lora_expand", ys, v, pool, layer, seg_starts, seg_ranks, b_rows)
    vs = v.sum(axis=0) if v.ndim == 4 else v
    return tuple(_expand(y, vs[m], pool, layer, seg_starts, seg_ranks[m], b_rows[m], interpret, tunables)
                 for m, y in enumerate(ys))


def _expand(y, v, pool, layer, seg_starts, seg_ranks, b_rows, interpret, tunables):
    """One module's expand on validated arguments."""
    interpret, bt = _entry_checks("lora_expand", interpret, pool.shape, b_rows.shape, expand_unsupported,
                                  tunables)
    t, d = y.shape
    ns, r, _ = b_rows.shape
    if t == 0 or r == 0 or ns == 0 or d == 0:
        return y
    return _expand_call(
        y, v.astype(jnp.float32), pool, _layer_array(layer), seg_starts.astype(jnp.int32),
        seg_ranks.astype(jnp.int32), b_rows.astype(jnp.int32), block_t=bt or block_t_default(t, ns),
        interpret=interpret,
    )
