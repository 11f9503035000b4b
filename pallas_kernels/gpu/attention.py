"""Paged attention over the unified pool, decode and (chunked) prefill: Pallas' Triton lowering.

Both kernels read K and V straight from the pool (layout: see `reference.py`)
through the block table, inside the kernel: no gathered copy of the context is
ever made by XLA. They match `reference.paged_attention_decode` /
`reference.paged_attention_prefill` exactly in signature and semantics; the
pool's geometry (``page_rows``, ``num_pages``) is given by the caller.

Token-level gather. The K row of token ``i`` of a sequence is
``bt[i // page_rows] * page_rows + i % page_rows`` and its V row is that plus
``num_pages * page_rows``; kv-head ``h`` owns columns ``[h * hd, (h + 1) * hd)``
of the row.
A kernel iteration covers ``block_kv`` consecutive tokens (a power of two, any
number of pages: 64 tokens are 64 pages at ``page_rows=1``, 4 at 16, half a
page at 128), so ``page_rows`` needs to be neither a power of two nor a
divisor of ``block_kv``. Each iteration loads the ``block_kv`` block-table
entries (a small gather, L1-resident), turns them into row indices and loads
the ``[block_kv, hd]`` K and V tiles with one pointer-tensor load each.

Decode: grid ``(B, Hkv, num_splits)``. A program owns one (sequence, kv-head)
and the group's ``G = Hq / Hkv`` query heads as a ``[R, hd]`` matrix,
``R = max(16, next_pow2(G))`` (rows past G duplicate a real head and are
never stored), so both dots have at least 16 rows. Online softmax in float32,
base 2. Split-K (flash-decoding): split ``s`` takes the ``s``-th of
``num_splits`` equal shares of the sequence's *actual* length (so short
sequences cost little whatever the table width); with ``num_splits > 1`` the
programs write unnormalised partial outputs and (max, sum) pairs and a small
XLA combine finishes. ``num_splits=None`` picks the smallest count that gives
about ``8 x SMs`` programs.

Mixed steps (prefill chunks batched with sequences of one query row, the running decodes): by default
the one-row sequences go through the decode kernel (their rows gathered into a [B, Hq, hd] batch, the
other sequences given length 0) and the prefill work list skips them, so that a decode row does not
fill a BQ-row query tile alone: a saturated S1 step on the H200 spent ~700 us a layer in the prefill
kernel where the decode kernel takes ~470 us for the same rows. The decode outputs are scattered into
the prefill kernel's (their B rows only).

Prefill: a static work list. The packed query axis is cut, per sequence, into
blocks of ``BQ = block_q // R_g`` query tokens (``R_g = next_pow2(G)``; the
``[BQ * R_g, hd]`` tile holds every query head of the group for those tokens,
so K/V are read once per group). A work item is (sequence, first row, row
count, position of the first row); there are at most
``cdiv(T, BQ) + B + 2`` of them (the two extra cover the zero rows before
``q_starts[0]`` and at or past ``q_starts[-1]``, which the kernel writes as
zeros), computed in XLA from ``q_starts``/``kv_lens`` on the device; unused
items exit at once. Grid ``(items, Hkv)``. Causal: query position ``p`` sees
keys ``0..p``, which include the pages written by earlier chunks. Key blocks
wholly below the diagonal run without masks; the rest are masked.

Tunables (keyword arguments with defaults): decode ``block_kv``,
``num_splits``, ``num_warps``, ``num_stages``; prefill ``block_q``,
``block_kv``, ``num_warps``, ``num_stages``. head_dim must be a power of two
>= 16. Off a GPU backend (``interpret=None`` there) the same kernels run in
Pallas' interpret mode. The TPU kernels of the same ops are
`pallas_kernels.tpu.attention`; `pallas_kernels.kernel_set` picks between them.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..common import cdiv, check_decode, check_prefill, is_pow2, next_pow2, triton_interpret

__all__ = ["paged_attention_decode", "paged_attention_prefill"]

_LOG2E = math.log2(math.e)
_MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16


def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except Exception:  # pragma: no cover - no device at all
        return 132


# --------------------------------------------------------------------------- shared kernel pieces
def _kv_rows(bt_ref, seq, tok, *, page_rows, num_pages, max_pages):
    """Pool K rows of the tokens `tok` ([n] int32, < max_pages * page_rows) of sequence `seq`."""
    if page_rows == 1:
        pidx, off = tok, None
    else:
        pidx, off = tok // page_rows, tok % page_rows
    pidx = jnp.minimum(pidx, max_pages - 1)
    page = plgpu.load(bt_ref.at[seq, pidx])
    page = jnp.minimum(jnp.maximum(page, 0), num_pages - 1)  # never read outside the pool
    return page if off is None else page * page_rows + off


def _online_softmax_step(carry, q, k, v, s_mask, scale_log2):
    """One flash step: q [R, hd], k/v [BK, hd] (compute dtype), s_mask [R, BK] bool or None."""
    acc, m, l = carry
    # float32 tiles in full precision (Triton's default for a float32 dot would be TF32, ~3e-4)
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=prec,
                        preferred_element_type=jnp.float32)
    s = s * scale_log2
    if s_mask is not None:
        s = jnp.where(s_mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with no key yet: no NaN
    alpha = jnp.exp2(m - m_use)
    p = jnp.exp2(s - m_use[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=prec,
                         preferred_element_type=jnp.float32)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l


def _attend_blocks(carry, q, bt_ref, pool_ref, layer, seq, h, lo, hi, *, masked, kv_end, q_pos,
                   block_kv, head_dim, page_rows, num_pages, max_pages, half_rows, cdtype,
                   scale_log2):
    """Run the flash loop over key blocks [lo, hi) of sequence `seq`, kv-head `h`.

    masked=False: every key of the blocks is valid for every query row (no masks).
    masked=True: keys >= kv_end are masked (and not read); with q_pos ([R] positions)
    also keys > q_pos (causal).
    """
    cols = h * head_dim + jnp.arange(head_dim, dtype=jnp.int32)

    def body(blk, carry):
        tok = blk * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
        krow = _kv_rows(bt_ref, seq, tok, page_rows=page_rows, num_pages=num_pages,
                        max_pages=max_pages)
        if masked:
            valid = tok < kv_end
            lmask = valid[:, None]
            k = plgpu.load(pool_ref.at[layer, krow[:, None], cols[None, :]], mask=lmask, other=0)
            v = plgpu.load(pool_ref.at[layer, krow[:, None] + half_rows, cols[None, :]],
                           mask=lmask, other=0)
            s_mask = valid[None, :]
            if q_pos is not None:
                s_mask = s_mask & (tok[None, :] <= q_pos[:, None])
        else:
            k = plgpu.load(pool_ref.at[layer, krow[:, None], cols[None, :]])
            v = plgpu.load(pool_ref.at[layer, krow[:, None] + half_rows, cols[None, :]])
            s_mask = None
        return _online_softmax_step(carry, q, k.astype(cdtype), v.astype(cdtype), s_mask,
                                    scale_log2)

    return lax.fori_loop(lo, hi, body, carry)


def _init_carry(rows, head_dim):
    return (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


# --------------------------------------------------------------------------- decode
def _decode_kernel(layer_ref, lengths_ref, bt_ref, q_ref, pool_ref, *out_refs, group, rows,
                   head_dim, block_kv, num_splits, page_rows, num_pages, max_pages, cdtype,
                   scale_log2):
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    length = jnp.minimum(jnp.maximum(lengths_ref[b], 0), max_pages * page_rows)
    n_blocks = cdiv(length, block_kv)
    n_full = length // block_kv
    if num_splits == 1:
        lo, hi = 0, n_blocks
    else:
        per = cdiv(n_blocks, num_splits)
        lo = s * per
        hi = jnp.minimum(n_blocks, lo + per)

    g = jnp.arange(rows, dtype=jnp.int32)
    dcols = jnp.arange(head_dim, dtype=jnp.int32)
    q_heads = h * group + jnp.minimum(g, group - 1)  # padding rows repeat the last head
    q = plgpu.load(q_ref.at[b, q_heads[:, None], dcols[None, :]]).astype(cdtype)

    common = dict(kv_end=length, q_pos=None, block_kv=block_kv, head_dim=head_dim,
                  page_rows=page_rows, num_pages=num_pages, max_pages=max_pages,
                  half_rows=num_pages * page_rows, cdtype=cdtype, scale_log2=scale_log2)
    carry = _init_carry(rows, head_dim)
    carry = _attend_blocks(carry, q, bt_ref, pool_ref, layer, b, h, lo, jnp.minimum(hi, n_full),
                           masked=False, **common)
    carry = _attend_blocks(carry, q, bt_ref, pool_ref, layer, b, h, jnp.maximum(lo, n_full), hi,
                           masked=True, **common)
    acc, m, l = carry

    # Rows >= group are masked: never written on the GPU. (In interpret mode a masked lane
    # writes back what it read, i.e. a row of the next group that its own program writes,
    # and a lane past Hq is dropped: no clamping, so no duplicate indices in one store.)
    out_heads = h * group + g
    smask = None if rows == group else (g < group)
    if num_splits == 1:
        (o_ref,) = out_refs
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]
        plgpu.store(o_ref.at[b, out_heads[:, None], dcols[None, :]], out.astype(o_ref.dtype),
                    mask=None if smask is None else smask[:, None])
    else:
        o_ref, m_ref, l_ref = out_refs
        plgpu.store(o_ref.at[b, s, out_heads[:, None], dcols[None, :]], acc,
                    mask=None if smask is None else smask[:, None])
        plgpu.store(m_ref.at[b, s, out_heads], m, mask=smask)
        plgpu.store(l_ref.at[b, s, out_heads], l, mask=smask)


def _auto_splits(batch, num_kv_heads, max_ctx, block_kv) -> int:
    """Fewest splits giving ~8 programs per SM, with >= 4 key blocks per split."""
    base = batch * num_kv_heads
    want = cdiv(8 * _num_sms(), base)
    cap = max(1, cdiv(max_ctx, block_kv) // 4)
    return int(max(1, min(want, cap, 32)))


@functools.partial(
    jax.jit,
    static_argnames=("page_rows", "num_pages", "scale", "interpret", "block_kv", "num_splits", "num_warps",
                     "num_stages"))
def _decode_pallas(q, pool, layer, block_tables, lengths, *, page_rows, num_pages, scale, interpret,
                   block_kv, num_splits, num_warps, num_stages):
    batch, hq, hd = q.shape
    hkv = pool.shape[2] // hd
    group = hq // hkv
    rows = max(_MIN_DOT, next_pow2(group))
    max_pages = block_tables.shape[1]
    if num_splits is None:
        num_splits = _auto_splits(batch, hkv, max_pages * page_rows, block_kv)
    cdtype = jnp.promote_types(q.dtype, pool.dtype)
    kernel = functools.partial(
        _decode_kernel, group=group, rows=rows, head_dim=hd, block_kv=block_kv,
        num_splits=num_splits, page_rows=page_rows, num_pages=num_pages, max_pages=max_pages,
        cdtype=cdtype, scale_log2=float(scale) * _LOG2E)
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct((batch, hq, hd), q.dtype)
    else:
        out_shape = (jax.ShapeDtypeStruct((batch, num_splits, hq, hd), jnp.float32),
                     jax.ShapeDtypeStruct((batch, num_splits, hq), jnp.float32),
                     jax.ShapeDtypeStruct((batch, num_splits, hq), jnp.float32))
    res = pl.pallas_call(
        kernel,
        grid=(batch, hkv, num_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_attention_decode",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), lengths.astype(jnp.int32),
      block_tables.astype(jnp.int32), q, pool)
    if num_splits == 1:
        return res
    o, m, l = res  # [B, S, Hq, hd], [B, S, Hq] (m in log2 units)
    m_max = jnp.max(m, axis=1, keepdims=True)
    w = jnp.exp2(m - jnp.where(jnp.isfinite(m_max), m_max, 0.0))  # empty splits: 0
    num = jnp.einsum("bsh,bshd->bhd", w, o)
    den = jnp.sum(w * l, axis=1)
    return (num / jnp.where(den > 0, den, 1.0)[..., None]).astype(q.dtype)


# --------------------------------------------------------------------------- prefill
def _prefill_kernel(layer_ref, work_ref, bt_ref, q_ref, pool_ref, o_ref, *, group, group_p2,
                    block_tokens, head_dim, num_tokens, block_kv, page_rows, num_pages,
                    max_pages, cdtype, scale_log2):
    w, h = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    seq, row0, nrows, pos0 = work_ref[w, 0], work_ref[w, 1], work_ref[w, 2], work_ref[w, 3]
    rows = block_tokens * group_p2
    r = jnp.arange(rows, dtype=jnp.int32)
    if group_p2 == 1:
        i, g = r, None
    else:
        i, g = r // group_p2, r % group_p2
    t = row0 + i  # packed query row of each tile row
    q_pos = pos0 + i
    dcols = jnp.arange(head_dim, dtype=jnp.int32)
    if g is None:
        q_heads = out_heads = h + jnp.zeros_like(r)
    else:
        q_heads = h * group + jnp.minimum(g, group - 1)
        out_heads = h * group + g
    t_load = jnp.minimum(t, num_tokens - 1)
    q = plgpu.load(q_ref.at[t_load[:, None], q_heads[:, None], dcols[None, :]]).astype(cdtype)

    kv_end = jnp.minimum(jnp.maximum(pos0 + nrows, 0), max_pages * page_rows)
    n_blocks = cdiv(kv_end, block_kv)
    n_full = jnp.maximum(jnp.minimum(pos0 + 1, kv_end), 0) // block_kv  # keys <= every row's pos
    common = dict(block_kv=block_kv, head_dim=head_dim, page_rows=page_rows,
                  num_pages=num_pages, max_pages=max_pages, half_rows=num_pages * page_rows,
                  cdtype=cdtype, scale_log2=scale_log2)
    carry = _init_carry(rows, head_dim)
    carry = _attend_blocks(carry, q, bt_ref, pool_ref, layer, seq, h, 0, n_full, masked=False,
                           kv_end=kv_end, q_pos=None, **common)
    carry = _attend_blocks(carry, q, bt_ref, pool_ref, layer, seq, h, n_full, n_blocks,
                           masked=True, kv_end=kv_end, q_pos=q_pos, **common)
    acc, _, l = carry
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]  # rows with no key (zero items): 0
    smask = (i < nrows) & (t < num_tokens)  # unclamped indices: see the decode store
    if g is not None and group != group_p2:
        smask = smask & (g < group)
    plgpu.store(o_ref.at[t[:, None], out_heads[:, None], dcols[None, :]],
                out.astype(o_ref.dtype), mask=smask[:, None])


def _prefill_work(q_starts, kv_lens, num_tokens, block_tokens, skip_single):
    """The static work list [W, 4] int32: (seq, first row, rows, position of first row); `skip_single`: no
    item for a sequence of one query row (the decode kernel takes those)."""
    nseq = kv_lens.shape[0]
    qs = jnp.clip(q_starts.astype(jnp.int32), 0, num_tokens)
    kv = kv_lens.astype(jnp.int32)
    n = jnp.maximum(qs[1:] - qs[:-1], 0)
    if skip_single:
        n = jnp.where(n == 1, 0, n)
    lead, tail0 = qs[0], qs[-1]
    zero = jnp.zeros((1,), jnp.int32)
    # ranges: every sequence's query rows, then the zero rows [0, qs[0]) and [qs[-1], T)
    r_seq = jnp.concatenate([jnp.arange(nseq, dtype=jnp.int32), zero, zero])
    r_row = jnp.concatenate([qs[:-1], zero, tail0[None]])
    r_n = jnp.concatenate([n, lead[None], (num_tokens - tail0)[None]])
    r_pos = jnp.concatenate([kv - n, jnp.full((2,), -block_tokens, jnp.int32)])
    r_is_seq = jnp.arange(nseq + 2) < nseq
    nblk = cdiv(r_n, block_tokens)
    cum = jnp.cumsum(nblk)
    start = cum - nblk
    num_items = cdiv(num_tokens, block_tokens) + nseq + 2
    wid = jnp.arange(num_items, dtype=jnp.int32)
    owner = jnp.searchsorted(cum, wid, side="right").astype(jnp.int32)
    live = owner < nseq + 2
    oc = jnp.minimum(owner, nseq + 1)
    j = wid - start[oc]
    row0 = r_row[oc] + j * block_tokens
    nrows = jnp.where(live, jnp.clip(r_n[oc] - j * block_tokens, 0, block_tokens), 0)
    pos0 = jnp.where(live & r_is_seq[oc], r_pos[oc] + j * block_tokens, -block_tokens)
    row0 = jnp.where(live, row0, 0)
    return jnp.stack([r_seq[oc], row0, nrows, pos0], axis=1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("page_rows", "num_pages", "scale", "interpret", "block_q", "block_kv", "num_warps",
                     "num_stages", "skip_single"))
def _prefill_pallas(q, pool, layer, block_tables, q_starts, kv_lens, *, page_rows, num_pages, scale,
                    interpret, block_q, block_kv, num_warps, num_stages, skip_single=False):
    num_tokens, hq, hd = q.shape
    hkv = pool.shape[2] // hd
    group = hq // hkv
    group_p2 = next_pow2(group)
    block_tokens = max(1, block_q // group_p2)
    if block_tokens * group_p2 < _MIN_DOT:
        block_tokens = _MIN_DOT // group_p2
    work = _prefill_work(q_starts, kv_lens, num_tokens, block_tokens, skip_single)
    kernel = functools.partial(
        _prefill_kernel, group=group, group_p2=group_p2, block_tokens=block_tokens,
        head_dim=hd, num_tokens=num_tokens, block_kv=block_kv, page_rows=page_rows,
        num_pages=num_pages, max_pages=block_tables.shape[1],
        cdtype=jnp.promote_types(q.dtype, pool.dtype), scale_log2=float(scale) * _LOG2E)
    return pl.pallas_call(
        kernel,
        grid=(work.shape[0], hkv),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_attention_prefill",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), work, block_tables.astype(jnp.int32), q, pool)


def _mixed(q, pool, layer, block_tables, q_starts, kv_lens, *, page_rows, num_pages, scale, interpret,
           block_q, block_kv, num_warps, num_stages):
    """The prefill op with its one-row sequences through the decode kernel (see the module docstring)."""
    num_tokens = q.shape[0]
    qs = jnp.clip(q_starts.astype(jnp.int32), 0, num_tokens)
    single = (qs[1:] - qs[:-1]) == 1
    first = jnp.minimum(qs[:-1], num_tokens - 1)
    dec = _decode_pallas(q[first], pool, layer, block_tables, jnp.where(single, kv_lens, 0), page_rows=page_rows,
                         num_pages=num_pages, scale=scale, interpret=interpret, block_kv=block_kv, num_splits=None,
                         num_warps=num_warps, num_stages=num_stages)
    pre = _prefill_pallas(q, pool, layer, block_tables, q_starts, kv_lens, page_rows=page_rows, num_pages=num_pages,
                          scale=scale, interpret=interpret, block_q=block_q, block_kv=block_kv, num_warps=num_warps,
                          num_stages=num_stages, skip_single=True)
    # each one-row sequence's row, unwritten by the prefill kernel, takes its decode output (others dropped)
    return pre.at[jnp.where(single, first, num_tokens)].set(dec, mode="drop")


# --------------------------------------------------------------------------- wrappers
def _check_tunables(fn, hd, block_kv, num_warps, num_stages):
    if not is_pow2(hd) or hd < _MIN_DOT:
        raise ValueError(f"{fn}: the Triton kernel needs head_dim a power of two >= {_MIN_DOT}, "
                         f"got {hd}; use the xla backend")
    if not (isinstance(block_kv, int) and is_pow2(block_kv) and block_kv >= _MIN_DOT):
        raise ValueError(f"{fn}: block_kv must be a power of two >= {_MIN_DOT}, got {block_kv!r}")
    if not (isinstance(num_warps, int) and is_pow2(num_warps)):
        raise ValueError(f"{fn}: num_warps must be a power of two, got {num_warps!r}")
    if not (isinstance(num_stages, int) and num_stages >= 1):
        raise ValueError(f"{fn}: num_stages must be an int >= 1, got {num_stages!r}")


def paged_attention_decode(q, pool, layer, block_tables, lengths, *, page_rows: int, num_pages: int,
                           scale: float, interpret: bool | None = None, block_kv: int = 64,
                           num_splits: int | None = None, num_warps: int = 4, num_stages: int = 2):
    """One query per sequence over its first ``lengths[b]`` tokens (GQA-aware).

    q: [B, Hq, hd]; pool: [L, S, W] with W = Hkv * hd and S = 2 * num_pages * page_rows;
    layer: int32 scalar (may be traced); block_tables: [B, M] int32 page indices;
    lengths: [B] int32 (0: output 0). Returns [B, Hq, hd] in q's dtype. Semantics:
    `reference.paged_attention_decode`.

    interpret: None = interpret mode off a GPU backend. Tunables: block_kv (tokens per
    kernel iteration, a power of two >= 16; = pages per iteration * page_rows),
    num_splits (split-K programs per sequence; None: about 8 programs per SM), num_warps,
    num_stages.
    """
    fn = "paged_attention_decode"
    check_decode(fn, q, pool, layer, block_tables, lengths, page_rows=page_rows, num_pages=num_pages,
                 scale=scale)
    _check_tunables(fn, q.shape[2], block_kv, num_warps, num_stages)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"{fn}: num_splits must be None or an int >= 1, got {num_splits!r}")
    return _decode_pallas(q, pool, layer, block_tables, lengths, page_rows=int(page_rows),
                          num_pages=int(num_pages), scale=float(scale),
                          interpret=triton_interpret(interpret), block_kv=block_kv,
                          num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)


def paged_attention_prefill(q, pool, layer, block_tables, q_starts, kv_lens, *, page_rows: int,
                            num_pages: int, scale: float, interpret: bool | None = None,
                            block_q: int = 64, block_kv: int = 64, num_warps: int = 4,
                            num_stages: int = 2, decode_single_rows: bool = True):
    """Causal attention of packed query chunks over their sequences' pages.

    q: [T, Hq, hd]; sequence b's queries are rows q_starts[b]:q_starts[b+1] ([B+1]
    int32, non-decreasing) and sit at the last positions of its kv_lens[b] ([B] int32)
    tokens, whose K/V (the chunk's own included) are already in the pool. Rows outside
    [q_starts[0], q_starts[-1]) are padding (output 0). Returns [T, Hq, hd] in q's
    dtype. Semantics: `reference.paged_attention_prefill`.

    interpret: as in `paged_attention_decode`. Tunables: block_q (query-tile rows = query
    tokens * next_pow2(Hq / Hkv), a power of two), block_kv (keys per iteration, a power
    of two >= 16), num_warps, num_stages (both kernels' where `decode_single_rows`: sequences of one
    query row through the decode kernel, as a mixed step's running decodes; False: every row through the
    prefill kernel).
    """
    fn = "paged_attention_prefill"
    check_prefill(fn, q, pool, layer, block_tables, q_starts, kv_lens, page_rows=page_rows,
                  num_pages=num_pages, scale=scale)
    _check_tunables(fn, q.shape[2], block_kv, num_warps, num_stages)
    if not (isinstance(block_q, int) and is_pow2(block_q)):
        raise ValueError(f"{fn}: block_q must be a power of two, got {block_q!r}")
    run = _mixed if decode_single_rows else _prefill_pallas
    return run(q, pool, layer, block_tables, q_starts, kv_lens, page_rows=int(page_rows), num_pages=int(num_pages),
               scale=float(scale), interpret=triton_interpret(interpret), block_q=block_q, block_kv=block_kv,
               num_warps=num_warps, num_stages=num_stages)
