"""Segmented multi-LoRA kernels over the unified pool (S-LoRA's MBGMM / MBGMV), Triton lowering.

``lora_shrink`` computes ``v = x @ A`` and ``lora_expand`` computes
``y + v @ B`` for a batch whose tokens are grouped into contiguous
segments, one adapter (of its own rank) per segment. Both read the adapter
rows straight out of the pool by their row indices, inside the kernel; the
layout and the exact semantics are those of `reference.py` (its docstring and
its ``lora_shrink`` / ``lora_expand``).

Pallas' Triton lowering (GPU); ``interpret=None`` runs Pallas' interpret mode
off a GPU backend (the CPU tests). The TPU kernels of the same ops are
`pallas_kernels.tpu.lora`; `pallas_kernels.kernel_set` picks between them.

Work list (static grid, any segment lengths)
--------------------------------------------
Under ``jit`` the grid must be static although segment lengths are not. Each
kernel's grid axis 0 enumerates ``NS + 1 + ceil(T / BT)`` *work items*, each a
run of at most ``BT`` tokens of one segment:

* head item ``s`` (``0 <= s <= NS``) covers segment ``s`` from its start up to
  the first multiple of ``BT`` (empty when the start is aligned);
* global item ``g`` covers tokens ``[g*BT, (g+1)*BT)`` of the segment that
  contains token ``g*BT``, cut at that segment's end.

With ``BT = 1`` every head item would be empty, so there are none: item ``i``
is token ``i``. Every token is covered exactly once (``s = NS`` and ``s = -1``
stand for the padding tokens after ``seg_starts[-1]`` and before
``seg_starts[0]``). A
program finds its item from ``seg_starts`` alone (one vector compare for
global items), so no XLA op runs before the kernel: in a model step the only
per-call inputs are the tables the engine already has.

Why this and not a ``(segment, token-block)`` list built with a cumsum or a
grid over segments with an inner token loop: a decode batch (512 one-token
segments) gets 512 programs that each read one adapter (a per-segment grid
would give the same, but a 4 x 512-token prefill would then run 4 programs
walking 512 tokens each, and a cumsum work list costs extra XLA launches per
call); a prefill gets ``T / BT`` full blocks of ``BT`` tokens that share one
adapter tile (the MBGMM case) plus at most ``NS + 1`` partial head blocks.
Programs of empty items, padding and rank-0 segments exit after reading the
tables (shrink writes their zeros).

Shrink (``[M, T, R]`` float32)
------------------------------
Grid ``(items, M * ceil(R / BR) * k_splits)``: a program owns ``BT`` tokens x
``BR`` rank columns of one module and one of ``k_splits`` slices of the
``D_in`` reduction. Rank blocks at or past the segment's rank only store
zeros, so work follows the real rank (waste only inside the last rank block).
The reduction walks ``D_in`` in ``BD``-wide chunks that never straddle a pool
row: chunk ``(c, jb)`` is columns ``[jb*BD, jb*BD + BD)`` of the adapter's
``c``-th pool row, so both the ``x`` tile and the gathered ``A^T`` tile
(``pool[layer, rows[m, s, j, c], cols]``) are contiguous loads, multiplied on
tensor cores (``[BT, BD] x [BD, BR]``, float32 accumulation); the block's
pool row indices are loaded once, before the pipelined loop. ``k_splits > 1``
splits those chunks over more programs for small batches; the partial results
are summed by one small XLA reduction (deterministic, no atomics) or, with
``partials=True``, left for the expand to add up as it loads them (no launch
between shrink and expand). The default (`shrink_defaults`) doubles the split
up to 8 until there are ~256 programs. All ``M`` modules (q, k, v share ``x``)
are one launch.

Expand (``y``'s dtype)
----------------------
One launch serves the ``M`` modules that share a shrink (`lora_expand_group`):
grid ``(items, sum_m K_out(m) * ceil(W / BD))``, the column blocks of module 0,
then module 1, ...; a program owns ``BT`` tokens x ``BD`` output columns lying
in one pool row ``c`` of the segment's ``B`` rows, loops over the segment's rank
blocks only (dynamic trip count), and writes ``delta`` (zeros for padding and
rank-0 tokens: every element is written once). ``y + delta`` is then an XLA
add, which fuses with whatever produced ``y``: the base GEMM's split-K
reduction, a slice of merged GEMMs. Updating ``y`` in place inside the kernel
instead would pin ``y`` as a materialised buffer and cost those producers a
launch each. With a 16-bit pool, ``v`` is split into a 16-bit high and
low part (two tensor-core dots), which keeps the product at about float32
accuracy.

One-token mode (``block_t = 1``, the decode default)
--------------------------------------------------
Each program then owns one token (there are no head items). In a decode batch
a 16-token tile holds 1 real token and 15 masked rows, which move no bytes but
still take registers, shared-memory stages and a tensor-core dot; instead the
shrink multiplies the token's ``x`` chunk into its ``A^T`` tile and sums
along D, and the expand sums ``v``-weighted ``B`` rows, elementwise in float32 on
the CUDA cores (no 16-bit split, no 16-wide minimum on the rank block).

Tunables
--------
Keyword arguments of `lora_shrink` (``block_t``, ``block_r``, ``block_d``,
``k_splits``, ``num_warps``, ``num_stages``) and `lora_expand` /
`lora_expand_group` (the same without ``k_splits``); those not given come from
`shrink_defaults` / `expand_defaults`, which choose by batch shape. Block sizes
are powers of two, at least 16 (Triton's ``dot`` minimum) except in the
one-token mode; every edge (T, D_in, D_out, W, R, segment ends) is masked.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..common import (cdiv, check_lora_expand, check_lora_expand_group, check_lora_shrink, decode_like,
                      pow2_at_least, triton_interpret)

__all__ = ["lora_shrink", "lora_expand", "lora_expand_group", "shrink_defaults", "expand_defaults"]

_SHRINK_TUNABLES = ("block_t", "block_r", "block_d", "k_splits", "num_warps", "num_stages")
_EXPAND_TUNABLES = ("block_t", "block_r", "block_d", "num_warps", "num_stages")


# --------------------------------------------------------------------------- tunables
def shrink_defaults(t: int, ns: int, m: int, r: int, d: int, w: int, **given) -> dict[str, int]:
    """Tunables of `lora_shrink` (T tokens, NS segments, M modules, max rank R, D_in, W): the defaults,
    overridden by `given`; ``k_splits`` is then derived from the result unless given.

    Decode-like batches: one token per program (``block_t = 1``: a matrix-vector product per token
    instead of a 16-row dot of which 15 rows are padding), up to 16 rank columns, 256-wide D chunks.
    Prefill-like: 64-token blocks sharing one adapter tile, the whole rank in one block. ``k_splits``
    splits D_in until there are about 1,024 programs (one-token mode) or 256 (token blocks), at most 8.
    """
    decode = decode_like(t, ns)
    bt = given.get("block_t") or (1 if decode else 64)
    if bt == 1:
        cfg = dict(block_r=min(16, pow2_at_least(r, 1)), block_d=256)
    elif decode:
        cfg = dict(block_r=16 if r <= 8 else 32, block_d=512)
    else:
        cfg = dict(block_r=min(64, pow2_at_least(r)), block_d=128)
    cfg.update(block_t=bt, num_warps=4, num_stages=3)
    cfg["block_d"] = min(cfg["block_d"], pow2_at_least(w))
    cfg.update({k: v for k, v in given.items() if v is not None})
    if cfg.get("k_splits") is None:
        bt, br, bd = cfg["block_t"], cfg["block_r"], cfg["block_d"]
        items = cdiv(t, bt) + (min(ns, t) if bt > 1 else 0)  # one-token mode: no head items
        programs = max(1, items * m * cdiv(max(r, 1), br))
        chunks = cdiv(d, w) * cdiv(w, bd)
        target = 1024 if bt == 1 else 256
        ks = 1
        while ks < 8 and programs * ks < target and 2 * ks <= chunks:
            ks *= 2
        cfg["k_splits"] = ks
    return cfg


def expand_defaults(t: int, ns: int, r: int, w: int, **given) -> dict[str, int]:
    """Tunables of `lora_expand` (T tokens, NS segments, max rank R, pool width W): the defaults,
    overridden by `given`.

    Decode-like batches: one token per program; from 128 tokens 8 rank rows x 1,024 output columns per
    step, below that 16 x 256 (more programs for few tokens). Prefill-like: 64 x 128 output tiles, rank
    blocks of up to 64, 4 warps.
    """
    decode = decode_like(t, ns)
    bt = given.get("block_t") or (1 if decode else 64)
    if bt == 1:
        wide = t >= 128
        cfg = dict(block_r=min(8 if wide else 16, pow2_at_least(r, 1)), block_d=1024 if wide else 256)
    elif decode:
        cfg = dict(block_r=16, block_d=256)
    else:
        cfg = dict(block_r=min(64, pow2_at_least(r)), block_d=128)
    cfg.update(block_t=bt, num_warps=4, num_stages=3)
    cfg["block_d"] = min(cfg["block_d"], pow2_at_least(w))
    cfg.update({k: v for k, v in given.items() if v is not None})
    return cfg


def _tunables(name: str, given: dict[str, Any], allowed: tuple[str, ...], defaults) -> dict[str, int]:
    """`defaults(**given)` (the defaults with the given tunables in), checked; unknown names are an error."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"{name}: unknown tunable(s) {unknown}; allowed: {list(allowed)}")
    cfg = defaults(**given)
    vector = cfg["block_t"] == 1  # one-token mode: no tensor-core dot, so no 16-wide minimum on the rank
    for k in ("block_t", "block_r", "block_d"):
        v, lo = cfg[k], 1 if vector and k != "block_d" else 16
        if not isinstance(v, int) or v < lo or v & (v - 1):
            raise ValueError(f"{name}: {k} must be a power of two >= 16 (block_t = 1: one token per "
                             f"program, then block_r >= 1), got {v!r}")
    if "k_splits" in cfg and (not isinstance(cfg["k_splits"], int) or cfg["k_splits"] < 1):
        raise ValueError(f"{name}: k_splits must be a positive int, got {cfg['k_splits']!r}")
    return cfg


def _layer_array(layer) -> jax.Array:
    """layer as an int32 [1] array (a bitcast, no XLA op); kernels clamp it like jnp indexing."""
    return jnp.asarray(layer, jnp.int32).reshape(1)


def _load_layer(layer_ref, n_layers: int):
    """pool[layer] as jnp indexes it: negative wraps once, out of range clamps."""
    layer = layer_ref[0]
    layer = jnp.where(layer < 0, layer + n_layers, layer)
    return jnp.clip(layer, 0, n_layers - 1)


def _dot(a, b, cdt, trans_b=False):
    """float32 accumulation; float32 tiles in full precision (Triton's default would be TF32)."""
    prec = lax.Precision.HIGHEST if cdt == jnp.float32 else None
    return plgpu.dot(a.astype(cdt), b.astype(cdt), trans_b=trans_b, precision=prec)


# --------------------------------------------------------------------------- work items
def _work_item(i, starts_ref, *, ns: int, nsp: int, t: int, bt: int):
    """Work item i -> (segment, first token, end token); segment in [-1, NS]."""
    n_head = 0 if bt == 1 else ns + 1  # with one token per block every head item is empty: none are made
    is_head = i < n_head
    # Head item s: from the segment's start to the next multiple of BT.
    s_h = jnp.minimum(i, ns)
    lo_h = jnp.clip(starts_ref[s_h], 0, t)
    end_h = jnp.where(s_h < ns, jnp.clip(starts_ref[jnp.minimum(s_h + 1, ns)], 0, t), t)
    hi_h = jnp.minimum(lax.div(lo_h + (bt - 1), bt) * bt, end_h)
    # Global item g: block g's tokens of the segment holding token g * BT.
    tok_g = jnp.maximum(i - n_head, 0) * bt
    lane = lax.broadcasted_iota(jnp.int32, (nsp,), 0)
    sv = plgpu.load(starts_ref.at[pl.ds(0, nsp)], mask=lane <= ns, other=t)
    sv = jnp.clip(sv, 0, t)
    s_g = jnp.sum((sv <= tok_g).astype(jnp.int32)) - 1
    end_g = jnp.where(s_g >= ns, t, jnp.clip(starts_ref[jnp.clip(s_g + 1, 0, ns)], 0, t))
    hi_g = jnp.minimum(tok_g + bt, end_g)
    seg = jnp.where(is_head, s_h, s_g)
    lo = jnp.where(is_head, lo_h, tok_g)
    hi = jnp.where(is_head, hi_h, hi_g)
    return seg, lo, hi


def _num_items(t: int, ns: int, bt: int) -> int:
    return (0 if bt == 1 else ns + 1) + cdiv(t, bt)


def _compute_dtype(*dtypes) -> jnp.dtype:
    """16-bit float tiles stay 16-bit (tensor cores, exact products); anything else is float32."""
    dts = {jnp.dtype(d) for d in dtypes}
    if len(dts) == 1 and next(iter(dts)) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return next(iter(dts))
    return jnp.dtype(jnp.float32)


# --------------------------------------------------------------------------- shrink
def _shrink_kernel(layer_ref, starts_ref, ranks_ref, rows_ref, x_ref, pool_ref, out_ref, *,
                   n_layers, ns, nsp, t, d, w, k, kp, r, nrb, ks, bt, br, bd, nj, n_chunks,
                   per_split, cdt):
    i = pl.program_id(0)
    j = pl.program_id(1)  # (module, rank block, split), split fastest
    m = lax.div(j, nrb * ks)
    rb = lax.rem(lax.div(j, ks), nrb)
    sp = lax.rem(j, ks)

    seg, lo, hi = _work_item(i, starts_ref, ns=ns, nsp=nsp, t=t, bt=bt)
    real = (seg >= 0) & (seg < ns)
    segc = jnp.clip(seg, 0, ns - 1)
    rank = jnp.where(real, jnp.clip(ranks_ref[m, segc], 0, r), 0)

    r0 = rb * br
    jv = r0 + lax.broadcasted_iota(jnp.int32, (br,), 0)
    rmask = jv < rank
    tmask = (lo + lax.broadcasted_iota(jnp.int32, (bt,), 0)) < hi
    lane = lax.broadcasted_iota(jnp.int32, (bd,), 0)
    layer = _load_layer(layer_ref, n_layers)

    c_begin = sp * per_split
    n_iter = jnp.minimum(per_split, n_chunks - c_begin)
    n_iter = jnp.where((rank > r0) & (hi > lo), n_iter, 0)

    # The pool rows of this rank block, loaded once (not inside the pipelined loop).
    if k == 1:
        idx_all = plgpu.load(rows_ref.at[m, segc, pl.ds(r0, br), jnp.int32(0)], mask=rmask, other=0)
    else:
        kcol = lax.broadcasted_iota(jnp.int32, (br, kp), 1)
        idx_all = plgpu.load(rows_ref.at[m, segc, pl.ds(r0, br), pl.ds(0, kp)],
                             mask=rmask[:, None] & (kcol < k), other=0)

    def body(q, acc):
        ch = c_begin + q
        c = lax.div(ch, nj)  # which of the K pool rows of an adapter row
        col0 = lax.rem(ch, nj) * bd  # column offset inside that pool row
        cols = col0 + lane
        cmask = (cols < w) & (cols < d - c * w)
        idx = idx_all if k == 1 else jnp.sum(jnp.where(kcol == c, idx_all, 0), axis=1)
        xt = plgpu.load(
            x_ref.at[pl.ds(lo, bt), pl.ds(c * w + col0, bd)],
            mask=tmask[:, None] & cmask[None, :],
            other=0,
        )
        at = plgpu.load(
            pool_ref.at[layer, idx[:, None], cols[None, :]],
            mask=rmask[:, None] & cmask[None, :],
            other=0,
        )
        if bt == 1:  # one token: a matrix-vector product on the CUDA cores, in float32
            return acc + jnp.sum(xt.astype(jnp.float32) * at.astype(jnp.float32), axis=1)[None, :]
        return acc + _dot(xt, at, cdt, trans_b=True)

    acc = lax.fori_loop(0, n_iter, body, jnp.zeros((bt, br), jnp.float32))
    acc = jnp.where(rmask[None, :], acc, 0.0)
    plgpu.store(
        out_ref.at[sp, m, pl.ds(lo, bt), pl.ds(r0, br)],
        acc,
        mask=tmask[:, None] & (jv < r)[None, :],
    )


@functools.partial(
    jax.jit,
    static_argnames=("block_t", "block_r", "block_d", "k_splits", "num_warps", "num_stages", "interpret",
                     "partials"),
)
def _shrink_pallas(x, pool, layer, seg_starts, seg_ranks, a_rows, *, block_t, block_r, block_d,
                   k_splits, num_warps, num_stages, interpret, partials):
    t, d = x.shape
    _, _, w = pool.shape
    m, ns, r, _ = a_rows.shape
    bt, br, bd = block_t, block_r, block_d
    nj = cdiv(w, bd)
    k_full = cdiv(d, w)
    n_chunks = (k_full - 1) * nj + cdiv(d - (k_full - 1) * w, bd)
    ks = max(1, min(k_splits, n_chunks))
    per_split = cdiv(n_chunks, ks)
    ks = cdiv(n_chunks, per_split)
    nrb = cdiv(r, br)
    nsp = pow2_at_least(ns + 1, 2)
    kernel = functools.partial(
        _shrink_kernel, n_layers=pool.shape[0], ns=ns, nsp=nsp, t=t, d=d, w=w, k=k_full,
        kp=pow2_at_least(k_full, 2), r=r, nrb=nrb, ks=ks, bt=bt, br=br, bd=bd, nj=nj,
        n_chunks=n_chunks, per_split=per_split, cdt=_compute_dtype(x.dtype, pool.dtype),
    )
    out = pl.pallas_call(
        kernel,
        grid=(_num_items(t, ns, bt), m * nrb * ks),
        out_shape=jax.ShapeDtypeStruct((ks, m, t, r), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"lora_shrink_bt{bt}_br{br}_bd{bd}_ks{ks}",
    )(layer, seg_starts, seg_ranks, a_rows, x, pool)
    if partials:
        return out
    return out.reshape(m, t, r) if ks == 1 else out.sum(axis=0)


def lora_shrink(x, pool, layer, seg_starts, seg_ranks, a_rows, *, interpret: bool | None = None,
                partials: bool = False, **tunables) -> jax.Array:
    """v[m, t, j] = x[t] . A_m(seg(t))[:, j] for j < rank, else 0 (see `reference.lora_shrink`).

    x: [T, D_in]; pool: [L, S, W]; layer: int32 scalar (may be traced);
    seg_starts: [NS + 1] int32; seg_ranks: [M, NS] int32;
    a_rows: [M, NS, R, K_in] int32 pool rows of A^T, K_in = ceil(D_in / W).
    Returns float32 [M, T, R]; with ``partials=True`` float32 [KS, M, T, R]
    whose sum over axis 0 is that (the kernel's split-K partial sums, KS >= 1,
    left for `lora_expand_group` to add up instead of a reduction launch here).

    interpret: None = interpret mode off a GPU backend, compiled on one.
    tunables: block_t, block_r, block_d (powers of two >= 16; block_t = 1 is the
    one-token mode, where block_r may be smaller), k_splits, num_warps,
    num_stages; defaults from `shrink_defaults`.
    """
    name = "lora_shrink"
    check_lora_shrink(name, x, pool, layer, seg_starts, seg_ranks, a_rows)
    t, d = x.shape
    w = pool.shape[2]
    ns = seg_starts.shape[0] - 1
    m, _, r, _ = a_rows.shape
    cfg = _tunables(name, tunables, _SHRINK_TUNABLES, functools.partial(shrink_defaults, t, ns, m, r, d, w))
    if t == 0 or r == 0 or m == 0 or ns == 0 or d == 0:
        v = jnp.zeros((m, t, r), jnp.float32)
        return v[None] if partials else v
    return _shrink_pallas(
        x, pool, _layer_array(layer), seg_starts.astype(jnp.int32), seg_ranks.astype(jnp.int32),
        a_rows.astype(jnp.int32), interpret=triton_interpret(interpret), partials=partials, **cfg,
    )


# --------------------------------------------------------------------------- expand
def _expand_kernel(layer_ref, starts_ref, ranks_ref, *refs, n_layers, ns, nsp, t, dims,
                   ks_in, w, r, bt, br, bd, nj, cdt):
    mods = len(dims)
    rows_refs, (v_ref, pool_ref), o_refs = refs[:mods], refs[mods:mods + 2], refs[mods + 2:]
    i = pl.program_id(0)
    n = pl.program_id(1)
    # Which module owns output column block n: blocks are laid out module after module.
    m, n_loc, d = jnp.int32(0), n, jnp.int32(dims[0])
    first = 0
    for j in range(1, mods):
        first += cdiv(dims[j - 1], w) * nj
        mine = n >= first
        m = jnp.where(mine, j, m)
        n_loc = jnp.where(mine, n - first, n_loc)
        d = jnp.where(mine, dims[j], d)
    seg, lo, hi = _work_item(i, starts_ref, ns=ns, nsp=nsp, t=t, bt=bt)
    real = (seg >= 0) & (seg < ns)
    segc = jnp.clip(seg, 0, ns - 1)
    rank = jnp.where(real, jnp.clip(ranks_ref[m, segc], 0, r), 0)

    c = lax.div(n_loc, nj)  # pool row (of each B row) holding this column block
    col0 = lax.rem(n_loc, nj) * bd
    cols = col0 + lax.broadcasted_iota(jnp.int32, (bd,), 0)
    cmask = (cols < w) & (cols < d - c * w)
    tmask = (lo + lax.broadcasted_iota(jnp.int32, (bt,), 0)) < hi
    active = (hi > lo) & (rank > 0) & (c * w + col0 < d)
    layer = _load_layer(layer_ref, n_layers)
    n_rb = jnp.where(active, lax.div(rank + (br - 1), br), 0)

    def body(q, acc):
        jv = q * br + lax.broadcasted_iota(jnp.int32, (br,), 0)
        rmask = jv < rank
        # Mask v by the static R only (vector loads), then drop columns >= rank. Split-K partial sums
        # of the shrink are added here, so the shrink needs no reduction launch of its own.
        vmask = tmask[:, None] & (jv < r)[None, :]
        vt = sum(plgpu.load(v_ref.at[jnp.int32(s), m, pl.ds(lo, bt), pl.ds(q * br, br)], mask=vmask, other=0.0)
                 for s in range(ks_in))
        vt = jnp.where(rmask[None, :], vt.astype(jnp.float32), 0.0)
        # this module's B row indices (c < K_m there); the other modules' loads are masked off (no memory
        # traffic), their column index only clamped in range
        idx = sum(plgpu.load(rows_refs[j].at[segc, pl.ds(q * br, br), jnp.minimum(c, rows_refs[j].shape[2] - 1)],
                             mask=rmask & (m == j), other=0) for j in range(mods))
        bt_ = plgpu.load(
            pool_ref.at[layer, idx[:, None], cols[None, :]],
            mask=rmask[:, None] & cmask[None, :],
            other=0,
        )
        if bt == 1:  # one token: v-weighted B rows summed on the CUDA cores, in float32
            return acc + jnp.sum(vt.reshape(br, 1) * bt_.astype(jnp.float32), axis=0)[None, :]
        if cdt == jnp.float32:
            return acc + _dot(vt, bt_, cdt)
        # 16-bit tensor-core dots at about float32 accuracy: v = hi + lo.
        v_hi = vt.astype(cdt)
        v_lo = vt - v_hi.astype(jnp.float32)
        return acc + _dot(v_hi, bt_, cdt) + _dot(v_lo, bt_, cdt)

    acc = lax.fori_loop(0, n_rb, body, jnp.zeros((bt, bd), jnp.float32))
    omask = tmask[:, None] & cmask[None, :]  # inactive tokens get their zeros too
    for j, o_ref in enumerate(o_refs):  # only module m's store is live
        plgpu.store(o_ref.at[pl.ds(lo, bt), pl.ds(c * w + col0, bd)], acc.astype(o_ref.dtype),
                    mask=omask & (m == j))


@functools.partial(
    jax.jit, static_argnames=("block_t", "block_r", "block_d", "num_warps", "num_stages", "interpret")
)
def _expand_pallas(ys, v, pool, layer, seg_starts, seg_ranks, b_rows, *, block_t,
                   block_r, block_d, num_warps, num_stages, interpret):
    mods = len(ys)
    t = ys[0].shape[0]
    dims = tuple(y.shape[1] for y in ys)
    _, _, w = pool.shape
    ks_in, _, _, r = v.shape
    ns = seg_starts.shape[0] - 1
    bt, br, bd = block_t, block_r, block_d
    nj = cdiv(w, bd)
    nsp = pow2_at_least(ns + 1, 2)
    kernel = functools.partial(
        _expand_kernel, n_layers=pool.shape[0], ns=ns, nsp=nsp, t=t, dims=dims, ks_in=ks_in, w=w, r=r,
        bt=bt, br=br, bd=bd, nj=nj, cdt=_compute_dtype(pool.dtype),
    )
    deltas = pl.pallas_call(
        kernel,
        grid=(_num_items(t, ns, bt), sum(cdiv(d, w) for d in dims) * nj),
        out_shape=tuple(jax.ShapeDtypeStruct(y.shape, y.dtype) for y in ys),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"lora_expand{mods}_bt{bt}_br{br}_bd{bd}",
    )(layer, seg_starts, seg_ranks, *b_rows, v, pool)
    return tuple(y + dy for y, dy in zip(ys, deltas))


def lora_expand_group(ys, v, pool, layer, seg_starts, seg_ranks, b_rows, *, interpret: bool | None = None,
                      **tunables) -> tuple:
    """`lora_expand` of M modules sharing one shrink, in one launch: ys[m] + v[m] @ B_m.

    ys: M x [T, D_m] (the kernel writes the deltas; the adds fuse with ys' producers);
    v: [M, T, R] float32 or [KS, M, T, R] split-K partial sums (`lora_shrink(partials=True)`),
    summed inside the kernel; seg_ranks: [M, NS]; b_rows: M x [NS, R, K_m].
    Returns a tuple of M arrays. interpret, tunables: as in `lora_expand`.
    """
    ys, b_rows = tuple(ys), tuple(b_rows)
    check_lora_expand_group("lora_expand", ys, v, pool, layer, seg_starts, seg_ranks, b_rows)
    return _expand_group(ys, v, pool, layer, seg_starts, seg_ranks, b_rows, interpret, tunables)


def _expand_group(ys, v, pool, layer, seg_starts, seg_ranks, b_rows, interpret, tunables):
    """`lora_expand_group` on validated arguments."""
    t = ys[0].shape[0]
    w = pool.shape[2]
    ns = seg_starts.shape[0] - 1
    r = v.shape[-1]
    cfg = _tunables("lora_expand", tunables, _EXPAND_TUNABLES, functools.partial(expand_defaults, t, ns, r, w))
    if t == 0 or r == 0 or ns == 0:
        return ys
    v4 = v if v.ndim == 4 else v[None]
    return _expand_pallas(
        ys, v4.astype(jnp.float32), pool, _layer_array(layer), seg_starts.astype(jnp.int32),
        seg_ranks.astype(jnp.int32), tuple(rows.astype(jnp.int32) for rows in b_rows),
        interpret=triton_interpret(interpret), **cfg,
    )


def lora_expand(y, v, pool, layer, seg_starts, seg_ranks, b_rows, *, interpret: bool | None = None,
                **tunables) -> jax.Array:
    """y[t] + sum_{j < rank} v[t, j] * B(seg(t))[j, :] (see `reference.lora_expand`).

    y: [T, D_out] (returned in its dtype); v: [T, R] float32; pool: [L, S, W]; layer: int32
    scalar; seg_starts: [NS + 1]; seg_ranks: [NS]; b_rows: [NS, R, K_out]
    with K_out = ceil(D_out / W).

    interpret: as in `lora_shrink`. tunables: block_t, block_r, block_d
    (powers of two >= 16; block_t = 1 is the one-token mode), num_warps,
    num_stages; defaults from `expand_defaults`.
    """
    check_lora_expand("lora_expand", y, v, pool, layer, seg_starts, seg_ranks, b_rows)
    (out,) = _expand_group((y,), v[None], pool, layer, seg_starts, seg_ranks[None], (b_rows,), interpret,
                           tunables)
    return out
