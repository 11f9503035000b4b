"""Pure-jnp references of every kernel, over the unified pool layout.

These are the specification the Pallas kernels are tested against, and the
`kernels="xla"` path. They take arrays and index tables only (no engine
objects), so this package imports nothing of `slora_jax`.

Pool layout (shared by all kernels)
-----------------------------------
``pool`` has shape ``[L, S, W]``: for every layer, ``S`` rows of width ``W``,
where ``W`` is the width of one token's K (or V) vector in one layer
(``num_kv_heads * head_dim``). Rows are grouped in pages of ``page_rows`` rows;
a page index ``p`` (``0 <= p < N``, ``N = num_pages``, ``S = 2 * N * page_rows``)
owns the K block of rows ``[p * page_rows, (p + 1) * page_rows)`` and the V block
``[(N + p) * page_rows, (N + p + 1) * page_rows)``. In block units (blocks of
``page_rows`` rows) the V block of page ``p`` is ``p + N``. Every function that
indexes pages takes ``page_rows`` and ``num_pages`` from the caller (the pool's
geometry is given, not derived from its shape) and checks them against the pool.

A page either holds ``page_rows`` tokens of one sequence's K and V (token
``i`` of a sequence sits at offset ``i % page_rows`` of the page
``block_table[i // page_rows]``), or ``2 * page_rows`` rows of an adapter.

An adapter matrix row of width ``D`` (a column of A, i.e. a row of A^T, or a
row of B) is stored zero-padded over ``K = ceil(D / W)`` pool rows; the LoRA
kernels get, per segment and rank row, those ``K`` pool row indices, and read
``concat(pool[layer, rows[c]] for c in range(K))[:D]``.

Under tensor parallelism every device runs these kernels on its own column
slice of the pool (``W / tp`` wide) with its local ``D`` (its heads, its
features, or the whole row where every device holds a matrix row whole:
then ``K = ceil(D / (W / tp))``); the rules above hold unchanged for that slice.

Segments
--------
Tokens of one step are grouped by adapter into contiguous segments:
segment ``s`` covers tokens ``seg_starts[s]:seg_starts[s + 1]`` and has rank
``seg_ranks[s]`` (0: no adapter; its tokens get no LoRA term). Tokens at or
after ``seg_starts[-1]`` are padding. Rank rows ``j >= seg_ranks[s]`` of the
index tables are ignored (any in-range value).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import common

# References are exact: float32 products in full precision (XLA's GPU default for a float32 GEMM is TF32).
_EXACT = jax.lax.Precision.HIGHEST


def _token_segments(starts: jax.Array, num_tokens: int) -> tuple:
    """(valid [T], segment [T]) of every token for segment starts [S + 1]: valid is False for tokens
    before starts[0] or at or past starts[-1], whose segment index is clipped into [0, S)."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seg = jnp.searchsorted(starts, t, side="right").astype(jnp.int32) - 1
    n = starts.shape[0] - 1
    return (seg >= 0) & (seg < n), jnp.clip(seg, 0, n - 1)


def _gather_rows(pool, layer, rows, width):
    """rows [S, R, K] -> matrix rows [S, R, width] read from pool[layer]."""
    s, r, k = rows.shape
    w = pool.shape[-1]
    flat = jnp.take(pool[layer], rows.reshape(-1), axis=0)  # [S*R*K, W]
    return flat.reshape(s, r, k * w)[..., :width]


def lora_shrink(x, pool, layer, seg_starts, seg_ranks, a_rows, *, partials=False):
    """v[m, t, j] = x[t] . A_m(seg(t))[:, j] for j < rank, else 0.

    x: [T, D_in]; pool: [L, S, W]; layer: int32 scalar;
    seg_starts: [NS + 1] int32; seg_ranks: [M, NS] int32;
    a_rows: [M, NS, R, K_in] int32 pool rows of A^T (M modules sharing x).
    Returns float32 [M, T, R] ([1, M, T, R] with partials=True: the kernels' split-K form).
    """
    common.check_lora_shrink("lora_shrink", x, pool, layer, seg_starts, seg_ranks, a_rows)
    t, d_in = x.shape
    m, ns, r, k = a_rows.shape
    valid, seg_c = _token_segments(seg_starts, t)
    # one gather and one contraction for all M modules: a single op reads every module's rows
    a_t = _gather_rows(pool, layer, a_rows.reshape(m * ns, r, k), d_in).reshape(m, ns, r, d_in)
    v = jnp.einsum("td,mtrd->mtr", x.astype(jnp.float32), a_t[:, seg_c].astype(jnp.float32), precision=_EXACT)
    keep = valid[None, :, None] & (jnp.arange(r)[None, None, :] < seg_ranks[:, seg_c][:, :, None])
    v = jnp.where(keep, v, 0.0)
    return v[None] if partials else v


def _expand_delta(v, b, seg_c, keep):
    """sum_{j < rank} v[t, j] * b[seg(t), j, :] in float32."""
    vv = jnp.where(keep, v, 0.0)
    return jnp.einsum("tr,trd->td", vv, b[seg_c].astype(jnp.float32), precision=_EXACT)


def lora_expand(y, v, pool, layer, seg_starts, seg_ranks, b_rows):
    """y[t] + sum_{j < rank} v[t, j] * B(seg(t))[j, :].

    y: [T, D_out] (base output, returned in its dtype); v: [T, R] float32;
    seg_ranks: [NS]; b_rows: [NS, R, K_out]. An adapter's scaling (alpha / r) is folded into its
    B rows by whoever writes them into the pool.
    """
    common.check_lora_expand("lora_expand", y, v, pool, layer, seg_starts, seg_ranks, b_rows)
    (out,) = lora_expand_group((y,), v[None], pool, layer, seg_starts, seg_ranks[None], (b_rows,))
    return out


def lora_expand_group(ys, v, pool, layer, seg_starts, seg_ranks, b_rows):
    """`lora_expand` of M modules that share one shrink: ys[m] + v[m] @ B_m.

    ys: M x [T, D_m]; v: [M, T, R] float32, or [KS, M, T, R] partial sums (summed here);
    seg_ranks: [M, NS]; b_rows: M x [NS, R, K_m]. Returns a tuple of M arrays.
    All modules' B rows are read by one gather, so every output depends on the same single read of
    the pool (a model that writes K/V into the pool from some of the outputs orders that read first).
    """
    ys, b_rows = tuple(ys), tuple(b_rows)
    common.check_lora_expand_group("lora_expand", ys, v, pool, layer, seg_starts, seg_ranks, b_rows)
    if v.ndim == 4:
        v = v.sum(axis=0)
    t = ys[0].shape[0]
    ns, r, _ = b_rows[0].shape
    w = pool.shape[-1]
    valid, seg_c = _token_segments(seg_starts, t)
    widths = [rows.shape[2] for rows in b_rows]
    b_all = _gather_rows(pool, layer, jnp.concatenate(b_rows, axis=2), sum(widths) * w)  # [NS, R, sum K * W]
    outs, col = [], 0
    for m, (y, k) in enumerate(zip(ys, widths)):
        keep = valid[:, None] & (jnp.arange(r)[None, :] < seg_ranks[m][seg_c][:, None])
        delta = _expand_delta(v[m], b_all[..., col:col + y.shape[1]], seg_c, keep)
        outs.append((y.astype(jnp.float32) + delta).astype(y.dtype))
        col += k * w
    return tuple(outs)


def write_kv(pool, layer, k, v, kv_rows, *, page_rows, num_pages):
    """Write new K/V rows: token t's K to pool row kv_rows[t], its V to kv_rows[t] + num_pages * page_rows.

    k, v: [T, W]; kv_rows: [T] int32 K rows (page * page_rows + offset), -1 = skip.
    Returns the updated pool (in place under jit when the pool is donated).
    """
    common.check_write_kv("write_kv", pool, layer, k, v, kv_rows, page_rows, num_pages)
    s = pool.shape[1]
    k_rows = jnp.where(kv_rows < 0, s, kv_rows)  # out of range -> dropped
    v_rows = jnp.where(kv_rows < 0, s, kv_rows + num_pages * page_rows)
    # One scatter for K and V: it depends on both, so every read of the pool that produced k or v is
    # ordered before it and XLA updates the pool in place (two scatters made XLA copy the whole pool).
    rows = jnp.concatenate([k_rows, v_rows])
    return pool.at[layer, rows].set(jnp.concatenate([k, v]).astype(pool.dtype), mode="drop")


def _gather_kv(pool, layer, block_tables, page_rows, num_pages):
    """block_tables [B, M] -> K, V of shape [B, M * page_rows, W]."""
    offs = jnp.arange(page_rows, dtype=jnp.int32)
    k_rows = (block_tables[..., None] * page_rows + offs).reshape(block_tables.shape[0], -1)
    v_rows = k_rows + num_pages * page_rows
    return pool[layer][k_rows], pool[layer][v_rows]


def _attend(q, k, v, mask, scale):
    """q [B, Q, Hq, hd]; k, v [B, C, Hkv, hd]; mask [B, Q, C] -> [B, Q, Hq, hd]."""
    b, nq, hq, hd = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, nq, hkv, g, hd).astype(jnp.float32)
    s = jnp.einsum("bqhgd,bchd->bhgqc", qg, k.astype(jnp.float32), precision=_EXACT) * scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(mask[:, None, None], p, 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgqc,bchd->bqhgd", p / jnp.where(denom > 0, denom, 1.0), v.astype(jnp.float32),
                   precision=_EXACT)
    return o.reshape(b, nq, hq, hd).astype(q.dtype)


def paged_attention_decode(q, pool, layer, block_tables, lengths, *, page_rows, num_pages, scale):
    """One query per sequence over its first lengths[b] tokens (GQA-aware).

    q: [B, Hq, hd]; block_tables: [B, M] int32 page indices; lengths: [B] int32
    (0: inactive row, output 0). Returns [B, Hq, hd] in q's dtype.
    """
    common.check_decode("paged_attention_decode", q, pool, layer, block_tables, lengths, page_rows=page_rows,
                        num_pages=num_pages, scale=scale)
    b, hq, hd = q.shape
    k, v = _gather_kv(pool, layer, block_tables, page_rows, num_pages)
    hkv = pool.shape[-1] // hd
    c = k.shape[1]
    k = k.reshape(b, c, hkv, hd)
    v = v.reshape(b, c, hkv, hd)
    mask = (jnp.arange(c)[None, :] < lengths[:, None])[:, None, :]
    return _attend(q[:, None], k, v, mask, scale)[:, 0]


def paged_attention_prefill(q, pool, layer, block_tables, q_starts, kv_lens, *, page_rows, num_pages, scale):
    """Causal attention of packed query chunks over their sequences' pages.

    q: [T, Hq, hd], sequence b's queries are rows q_starts[b]:q_starts[b+1] and
    are the last n_b positions of its kv_lens[b] tokens (its K/V, the chunk's
    own included, are already in the pool). Query i of b sits at position
    kv_lens[b] - n_b + i and sees keys 0..that position. Rows at or past
    q_starts[-1] are padding (output 0). Returns [T, Hq, hd].
    """
    common.check_prefill("paged_attention_prefill", q, pool, layer, block_tables, q_starts, kv_lens,
                         page_rows=page_rows, num_pages=num_pages, scale=scale)
    t, hq, hd = q.shape
    nb = block_tables.shape[0]
    valid, seq_c = _token_segments(q_starts, t)
    n_q = q_starts[1:] - q_starts[:-1]
    pos = kv_lens[seq_c] - n_q[seq_c] + (jnp.arange(t) - q_starts[seq_c])
    k, v = _gather_kv(pool, layer, block_tables, page_rows, num_pages)
    hkv = pool.shape[-1] // hd
    c = k.shape[1]
    k = k.reshape(nb, c, hkv, hd)[seq_c]
    v = v.reshape(nb, c, hkv, hd)[seq_c]
    mask = (jnp.arange(c)[None, :] <= pos[:, None]) & valid[:, None]
    out = _attend(q[:, None], k, v, mask[:, None, :], scale)[:, 0]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
