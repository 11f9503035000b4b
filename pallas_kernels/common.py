"""Shape helpers and argument checks shared by every kernel module and the references.

Each check raises a ValueError (TypeError for a wrong dtype kind in the LoRA tables) naming the
function, the argument and the shape it must have. The pool geometry (``page_rows``, ``num_pages``)
is given by the caller, never derived from the pool: `check_pool_geometry` only checks that the pool
has the ``2 * num_pages * page_rows`` rows the two numbers describe (layout: `reference`'s docstring).
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

LANES = 128  # TPU vreg lanes: the minor tile of every TPU array


# --------------------------------------------------------------------------- shape helpers
def cdiv(a, b):
    """ceil(a / b) for Python ints and int arrays alike."""
    return (a + b - 1) // b


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def pow2_at_least(n: int, lo: int = 16) -> int:
    """next_pow2(n), at least `lo`."""
    return max(lo, next_pow2(n))


def is_pow2(n) -> bool:
    return isinstance(n, numbers.Integral) and n > 0 and n & (n - 1) == 0


def sublane_tile(dtype) -> int:
    """Rows of one native TPU tile of `dtype`: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit types."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def decode_like(t: int, ns: int) -> bool:
    """Many short segments (decode, or mostly decode) rather than a few long ones (prefill)."""
    return t <= 8 * max(ns, 1)


# --------------------------------------------------------------------------- interpret mode
def triton_interpret(interpret) -> bool:
    """`interpret` of a Triton-lowered kernel: None = interpret mode unless on a GPU backend."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def mosaic_interpret(interpret):
    """`interpret` of a Mosaic kernel -> what `pl.pallas_call` gets (False: compile with Mosaic).

    None: compiled on a TPU backend, TPU interpret mode (`pltpu.InterpretParams()`) elsewhere. True: TPU
    interpret mode. A `pltpu.InterpretParams` is used as given.
    """
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


# --------------------------------------------------------------------------- shared checks
def check_layer(fn: str, layer, n_layers: int) -> None:
    """layer: a scalar (may be traced); a Python int must index one of the pool's layers."""
    shape = jnp.shape(layer)
    if shape != ():
        raise ValueError(f"{fn}: layer must be a scalar, got shape {shape}")
    if isinstance(layer, numbers.Integral) and not -n_layers <= layer < n_layers:
        raise ValueError(f"{fn}: layer {layer} out of range for a pool of {n_layers} layers")


def check_pool(fn: str, pool) -> None:
    if pool.ndim != 3:
        raise ValueError(f"{fn}: pool must be 3-D [L, S, W], got shape {pool.shape}")


def check_pool_geometry(fn: str, pool, page_rows, num_pages) -> None:
    """The pool [L, S, W] holds num_pages pages of page_rows K rows and as many V rows: S = 2 N pr."""
    check_pool(fn, pool)
    for arg, val in (("page_rows", page_rows), ("num_pages", num_pages)):
        if not isinstance(val, numbers.Integral) or val < 1:
            raise ValueError(f"{fn}: {arg} must be a positive int, got {val!r}")
    s_rows = pool.shape[1]
    if s_rows % (2 * page_rows):
        raise ValueError(f"{fn}: pool rows S={s_rows} must be a multiple of 2 * page_rows = {2 * page_rows}")
    if s_rows != 2 * num_pages * page_rows:
        raise ValueError(f"{fn}: pool rows S={s_rows} must be 2 * num_pages * page_rows = 2 * {num_pages} * "
                         f"{page_rows} = {2 * num_pages * page_rows} (the pool holds "
                         f"{s_rows // (2 * page_rows)} pages of {page_rows} rows)")


def check_write_kv(fn: str, pool, layer, k, v, kv_rows, page_rows, num_pages) -> None:
    check_pool_geometry(fn, pool, page_rows, num_pages)
    check_layer(fn, layer, pool.shape[0])
    if jnp.ndim(kv_rows) != 1:
        raise ValueError(f"{fn}: kv_rows must be [T], got shape {jnp.shape(kv_rows)}")
    t, w = jnp.shape(kv_rows)[0], pool.shape[2]
    for arg, a in (("k", k), ("v", v)):
        if a.shape != (t, w):
            raise ValueError(f"{fn}: {arg} must have shape [T, W] = {(t, w)} (T from kv_rows, W from the "
                             f"pool), got {a.shape}")


def check_attention(fn: str, q, pool, layer, block_tables, *, page_rows, num_pages, scale) -> None:
    """What decode and prefill share: q [tokens, Hq, hd], the pool and its geometry, the block table,
    layer and scale, and the heads: W = Hkv * hd with Hq a multiple of Hkv."""
    if q.ndim != 3:
        raise ValueError(f"{fn}: q must be 3-D [tokens, Hq, head_dim], got shape {q.shape}")
    check_pool_geometry(fn, pool, page_rows, num_pages)
    if block_tables.ndim != 2:
        raise ValueError(f"{fn}: block_tables must be 2-D [B, pages], got shape {block_tables.shape}")
    if not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"{fn}: block_tables must be integer, got {block_tables.dtype}")
    check_layer(fn, layer, pool.shape[0])
    if not isinstance(scale, numbers.Real):
        raise ValueError(f"{fn}: scale must be a static Python number, got {type(scale).__name__}")
    _, hq, hd = q.shape
    width = pool.shape[2]
    if hd == 0 or width % hd:
        raise ValueError(f"{fn}: pool width W={width} must be a multiple of head_dim={hd} "
                         f"(W = num_kv_heads * head_dim)")
    hkv = width // hd
    if hq % hkv:
        raise ValueError(f"{fn}: Hq={hq} query heads must be a multiple of the {hkv} kv heads "
                         f"(W={width} / head_dim={hd})")


def check_decode(fn: str, q, pool, layer, block_tables, lengths, *, page_rows, num_pages, scale) -> None:
    check_attention(fn, q, pool, layer, block_tables, page_rows=page_rows, num_pages=num_pages, scale=scale)
    batch = q.shape[0]
    if block_tables.shape[0] != batch:
        raise ValueError(f"{fn}: block_tables has {block_tables.shape[0]} rows but q has batch {batch}")
    if jnp.shape(lengths) != (batch,):
        raise ValueError(f"{fn}: lengths must have shape ({batch},), got {jnp.shape(lengths)}")


def check_prefill(fn: str, q, pool, layer, block_tables, q_starts, kv_lens, *, page_rows, num_pages,
                  scale) -> None:
    check_attention(fn, q, pool, layer, block_tables, page_rows=page_rows, num_pages=num_pages, scale=scale)
    nseq = block_tables.shape[0]
    if jnp.shape(q_starts) != (nseq + 1,):
        raise ValueError(f"{fn}: q_starts must have shape ({nseq + 1},) (block_tables has {nseq} rows), "
                         f"got {jnp.shape(q_starts)}")
    if jnp.shape(kv_lens) != (nseq,):
        raise ValueError(f"{fn}: kv_lens must have shape ({nseq},), got {jnp.shape(kv_lens)}")


def check_int(fn: str, arg: str, a) -> None:
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise TypeError(f"{fn}: {arg} must be an integer array, got dtype {a.dtype}")


def _check_lora_common(fn: str, act_name: str, dim_name: str, act, pool, layer, seg_starts) -> None:
    """What shrink and expand share: activations [T, D], the pool, the layer and the segment starts."""
    if act.ndim != 2:
        raise ValueError(f"{fn}: {act_name} must be [T, {dim_name}], got shape {act.shape}")
    if pool.ndim != 3:
        raise ValueError(f"{fn}: pool must be [L, S, W], got shape {pool.shape}")
    if seg_starts.ndim != 1 or seg_starts.shape[0] < 1:
        raise ValueError(f"{fn}: seg_starts must be [NS + 1] with NS >= 0, got shape {seg_starts.shape}")
    check_layer(fn, layer, pool.shape[0])
    check_int(fn, "seg_starts", seg_starts)


def check_lora_shrink(fn: str, x, pool, layer, seg_starts, seg_ranks, a_rows) -> None:
    """x [T, D_in]; a_rows [M, NS, R, K_in] with K_in = ceil(D_in / W); seg_ranks [M, NS]."""
    _check_lora_common(fn, "x", "D_in", x, pool, layer, seg_starts)
    if a_rows.ndim != 4:
        raise ValueError(f"{fn}: a_rows must be [M, NS, R, K_in], got shape {a_rows.shape}")
    d, w = x.shape[1], pool.shape[2]
    ns = seg_starts.shape[0] - 1
    m, ns_a, _, k = a_rows.shape
    k_want = cdiv(d, w)
    if ns_a != ns or k != k_want:
        raise ValueError(
            f"{fn}: a_rows must have shape [M, NS, R, K_in] with NS = len(seg_starts) - 1 = {ns} "
            f"and K_in = ceil(D_in / W) = ceil({d} / {w}) = {k_want}, got {a_rows.shape}"
        )
    if seg_ranks.shape != (m, ns):
        raise ValueError(f"{fn}: seg_ranks must have shape [M, NS] = {(m, ns)}, got {seg_ranks.shape}")
    check_int(fn, "seg_ranks", seg_ranks)
    check_int(fn, "a_rows", a_rows)


def check_lora_expand_group(fn: str, ys, v, pool, layer, seg_starts, seg_ranks, b_rows) -> None:
    """ys M x [T, D_m]; v [M, T, R] or [KS, M, T, R]; seg_ranks [M, NS]; b_rows M x [NS, R, K_m]."""
    if not ys:
        raise ValueError(f"{fn}: no outputs")
    for y in ys:
        _check_lora_common(fn, "y", "D_out", y, pool, layer, seg_starts)
    t = ys[0].shape[0]
    w = pool.shape[2]
    ns = seg_starts.shape[0] - 1
    mods = len(ys)
    if len(b_rows) != mods:
        raise ValueError(f"{fn}: {mods} outputs but {len(b_rows)} b_rows tables")
    r = None
    for y, rows in zip(ys, b_rows):
        if rows.ndim != 3:
            raise ValueError(f"{fn}: b_rows must be [NS, R, K_out], got shape {rows.shape}")
        k_want = cdiv(y.shape[1], w)
        same_r = r is None or rows.shape[1] == r
        if y.shape[0] != t or rows.shape[0] != ns or rows.shape[2] != k_want or not same_r:
            raise ValueError(
                f"{fn}: b_rows must have shape [NS, R, K_out] with NS = len(seg_starts) - 1 = {ns} "
                f"and K_out = ceil(D_out / W) = ceil({y.shape[1]} / {w}) = {k_want} (one R for all "
                f"modules, y of T = {t} rows), got {rows.shape} for y {y.shape}"
            )
        r = rows.shape[1]
        check_int(fn, "b_rows", rows)
    if v.ndim not in (3, 4) or v.shape[-3:] != (mods, t, r):
        raise ValueError(
            f"{fn}: v must have shape [M, T, R] = {(mods, t, r)} or [KS, M, T, R] "
            f"(T from y, R from b_rows), got {v.shape}"
        )
    if seg_ranks.shape != (mods, ns):
        raise ValueError(f"{fn}: seg_ranks must have shape [M, NS] = {(mods, ns)}, got {seg_ranks.shape}")
    check_int(fn, "seg_ranks", seg_ranks)


def check_lora_expand(fn: str, y, v, pool, layer, seg_starts, seg_ranks, b_rows) -> None:
    """One module: y [T, D_out], v [T, R], seg_ranks [NS], b_rows [NS, R, K_out] (its own terms first,
    then the group's checks)."""
    _check_lora_common(fn, "y", "D_out", y, pool, layer, seg_starts)
    if b_rows.ndim != 3:
        raise ValueError(f"{fn}: b_rows must be [NS, R, K_out], got shape {b_rows.shape}")
    t = y.shape[0]
    ns = seg_starts.shape[0] - 1
    r = b_rows.shape[1]
    if v.shape != (t, r):
        raise ValueError(f"{fn}: v must have shape [T, R] = {(t, r)} (T from y, R from b_rows), got {v.shape}")
    if seg_ranks.shape != (ns,):
        raise ValueError(f"{fn}: seg_ranks must have shape [NS] = {(ns,)}, got {seg_ranks.shape}")
    check_lora_expand_group(fn, (y,), v[None], pool, layer, seg_starts, seg_ranks[None], (b_rows,))
