"""Segmented multi-LoRA kernels (pallas_kernels/gpu/lora.py) against the references, in interpret mode.

Every case draws fresh random inputs and poisons with NaN everything the kernels
must never read: the pool's other layer, the pool columns past D in an adapter
row's last pool row, the rows that index tables point to for rank rows j >= rank,
x / v rows of padding tokens, tokens before seg_starts[0] and tokens of rank-0
segments, and v's columns past a segment's rank. The references are run on the
same data with the junk rows pointing at a finite row (the spec says they are
ignored), so any read of poison shows up as NaN. Shrink outputs start as NaN in
interpret mode, so an unwritten padding row fails the comparison too.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pallas_kernels
from pallas_kernels import reference
from pallas_kernels.gpu import lora

NAN = np.float32("nan")


def cdiv(a, b):
    return -(-a // b)


# --------------------------------------------------------------------------- case builder
class Case:
    """Random pool, tables and activations for one call of shrink (M modules) and expand."""

    def __init__(self, seed, *, seg_lens, t, ranks, r, d_in, d_out, w, start0=0, m=1,
                 dtype=jnp.float32, n_layers=2, layer=1):
        rng = np.random.default_rng(seed)
        ns = len(seg_lens)
        self.ranks = np.asarray(ranks, np.int32).reshape(m, ns)
        assert self.ranks.max(initial=0) <= r
        starts = start0 + np.concatenate([[0], np.cumsum(seg_lens)]).astype(np.int32)
        assert starts[-1] <= t
        self.seg_starts = starts
        self.t, self.r, self.m, self.ns, self.w = t, r, m, ns, w
        self.d_in, self.d_out, self.layer, self.dtype = d_in, d_out, layer, dtype
        k_in, k_out = cdiv(d_in, w), cdiv(d_out, w)
        tail_in, tail_out = d_in - (k_in - 1) * w, d_out - (k_out - 1) * w

        # Pool rows: [0, 8) full rows, [8, 16) last rows of A (NaN past tail_in),
        # [16, 24) last rows of B (NaN past tail_out), row 24 all NaN (junk target).
        s = 25
        pool = rng.standard_normal((n_layers, s, w)).astype(np.float32) / np.sqrt(w)
        pool[:, 8:16, tail_in:] = NAN
        pool[:, 16:24, tail_out:] = NAN
        pool[:, 24] = NAN
        for other in range(n_layers):
            if other != layer % n_layers:
                pool[other] = NAN
        self.pool = jnp.asarray(pool, dtype)

        def rows(shape_prefix, k, tail_base, ranks_):
            full = rng.integers(0, 8, (*shape_prefix, r, k))
            full[..., k - 1] = rng.integers(tail_base, tail_base + 8, (*shape_prefix, r))
            keep = np.arange(r) < ranks_[..., None]  # [..., R]
            good = np.where(keep[..., None], full, 0).astype(np.int32)  # junk -> finite row 0
            junk = np.where(keep[..., None], full, 24).astype(np.int32)  # junk -> NaN row
            return good, junk

        self.a_good, self.a_junk = rows((m, ns), k_in, 8, self.ranks)
        self.b_good, self.b_junk = rows((ns,), k_out, 16, self.ranks[0])

        # Which tokens get a LoRA term (module 0's ranks for v/expand poisoning).
        seg = np.searchsorted(starts, np.arange(t), side="right") - 1
        valid = (seg >= 0) & (seg < ns)
        segc = np.clip(seg, 0, ns - 1)
        live_any = valid & (self.ranks.max(axis=0)[segc] > 0)
        rank_tok = np.where(valid, self.ranks[0][segc], 0)
        self.n_live = int(live_any.sum())

        x = rng.standard_normal((t, d_in)).astype(np.float32)
        x[~live_any] = NAN
        self.x = jnp.asarray(x, dtype)
        v = rng.standard_normal((t, r)).astype(np.float32)
        v[np.arange(r)[None, :] >= rank_tok[:, None]] = NAN
        self.v = jnp.asarray(v)
        self.y = jnp.asarray(rng.standard_normal((t, d_out)).astype(np.float32), dtype)

    # -- calls (module: the kernel module under test, pallas_kernels.gpu.lora or pallas_kernels.tpu.lora)
    def shrink(self, rows=None, *, module=lora, **kw):
        return module.lora_shrink(self.x, self.pool, self.layer, jnp.asarray(self.seg_starts),
                                jnp.asarray(self.ranks), jnp.asarray(self.a_junk if rows is None else rows),
                                **kw)

    def shrink_ref(self):
        return reference.lora_shrink(self.x, self.pool, self.layer, jnp.asarray(self.seg_starts),
                                     jnp.asarray(self.ranks), jnp.asarray(self.a_good))

    def expand(self, rows=None, *, module=lora, **kw):
        rows = self.b_junk if rows is None else rows
        return module.lora_expand(self.y, self.v, self.pool, self.layer, jnp.asarray(self.seg_starts),
                                jnp.asarray(self.ranks[0]), jnp.asarray(rows), **kw)

    def expand_ref(self):
        # The reference multiplies masked v (0) by the gathered B rows, so give it finite v.
        v = jnp.nan_to_num(self.v, nan=0.0)
        return reference.lora_expand(self.y, v, self.pool, self.layer, jnp.asarray(self.seg_starts),
                                     jnp.asarray(self.ranks[0]), jnp.asarray(self.b_good))


def check(out, ref, dtype):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    assert np.isfinite(ref).all(), "reference saw poison: the test data is wrong"
    assert np.isfinite(out).all(), (
        f"kernel output has {np.isnan(out).sum()} NaN (read poison or left unwritten)"
    )
    if dtype == jnp.float32:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    else:
        err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
        assert err < 1e-2, f"relative error {err}"


def check_shrink(case, **kw):
    out = case.shrink(**kw)
    assert out.dtype == jnp.float32 and out.shape == (case.m, case.t, case.r)
    check(out, case.shrink_ref(), jnp.float32 if case.dtype == jnp.float32 else case.dtype)
    return out


def check_expand(case, **kw):
    out = case.expand(**kw)
    assert out.dtype == case.dtype and out.shape == case.y.shape
    check(out, case.expand_ref(), case.dtype)
    # Rows without a LoRA term are untouched, bit for bit.
    seg = np.searchsorted(case.seg_starts, np.arange(case.t), side="right") - 1
    valid = (seg >= 0) & (seg < case.ns)
    dead = ~valid | (case.ranks[0][np.clip(seg, 0, case.ns - 1)] == 0)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[dead], np.asarray(case.y, np.float32)[dead])
    return out


# --------------------------------------------------------------------------- cases
# seg_lens, t, ranks (M x NS), r, d_in, d_out, w, start0, m
MIXED = dict(seg_lens=[0, 1, 13, 0, 1, 17, 5], t=45, r=40, d_in=50, d_out=40, w=24, m=3,
             ranks=[[3, 40, 1, 7, 0, 17, 9], [0, 2, 33, 1, 16, 40, 1], [8, 0, 0, 5, 3, 1, 39]])
PREFILL = dict(seg_lens=[70, 0, 61], t=150, r=128, d_in=40, d_out=72, w=16, m=1, ranks=[[128, 9, 37]])
DECODE = dict(seg_lens=[1] * 20, t=23, r=16, d_in=64, d_out=64, w=64, m=2,
              ranks=[[(s * 7) % 17 for s in range(20)], [(s * 5 + 3) % 17 for s in range(20)]])
OFFSET = dict(seg_lens=[4, 0, 9, 2], start0=5, t=31, r=24, d_in=33, d_out=20, w=32, m=1,
              ranks=[[24, 5, 0, 1]])
CASES = {"mixed": MIXED, "prefill": PREFILL, "decode": DECODE, "offset": OFFSET}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_shrink_f32(name, seed):
    check_shrink(Case(seed, **CASES[name]))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_expand_f32(name, seed):
    check_expand(Case(seed, **CASES[name]))


@pytest.mark.parametrize("name", ["mixed", "prefill", "decode"])
def test_bf16(name):
    case = Case(7, dtype=jnp.bfloat16, **CASES[name])
    check_shrink(case)
    check_expand(case)


def test_bf16_decode_token_blocks():
    """The 16-token-block kernels on a decode batch (the default there is the one-token mode)."""
    case = Case(19, dtype=jnp.bfloat16, **CASES["decode"])
    check_shrink(case, block_t=16)
    check_expand(case, block_t=16)


def test_defaults_follow_the_batch_and_given_tunables():
    dec = lora.shrink_defaults(512, 512, 1, 8, 4096, 4096)
    assert (dec["block_t"], dec["block_r"], dec["k_splits"]) == (1, 8, 2)  # 512 programs -> 2 splits
    assert lora.shrink_defaults(32, 32, 1, 64, 4096, 4096)["k_splits"] == 8  # few tokens: more splits
    # token blocks given: a rank block a dot accepts, and splits counted for those blocks
    blk = lora.shrink_defaults(512, 512, 1, 8, 4096, 4096, block_t=16)
    assert blk["block_r"] >= 16 and blk["k_splits"] == 1
    assert lora.shrink_defaults(512, 512, 1, 8, 4096, 4096, k_splits=3)["k_splits"] == 3
    pre = lora.shrink_defaults(2048, 4, 1, 16, 4096, 4096)
    assert pre["block_t"] == 64 and pre["block_r"] == 16
    assert lora.expand_defaults(512, 512, 8, 4096)["block_t"] == 1
    small = lora.expand_defaults(32, 32, 64, 4096)  # few tokens: narrower column blocks, more programs
    assert (small["block_t"], small["block_r"], small["block_d"]) == (1, 16, 256)
    assert lora.expand_defaults(2048, 4, 64, 4096)["block_t"] == 64
    assert lora.expand_defaults(512, 512, 8, 64)["block_d"] == 64  # never wider than the pool row


@pytest.mark.parametrize("name", ["mixed", "decode"])
def test_bf16_one_token_mode(name):
    """block_t = 1 (float32 CUDA-core products, no 16-bit split) on a bf16 pool."""
    case = Case(17, dtype=jnp.bfloat16, **CASES[name])
    check_shrink(case, block_t=1, block_r=8, block_d=32, k_splits=2)
    check_expand(case, block_t=1, block_r=8, block_d=32)


@pytest.mark.parametrize(
    "tunables",
    [
        dict(k_splits=3),
        dict(k_splits=8, block_d=16),
        dict(block_t=32, block_r=32, block_d=16, num_warps=8, num_stages=2),
        dict(block_t=64, block_r=64, block_d=64),
        # one token per program (the decode mode): rank blocks below 16, split reductions
        dict(block_t=1, block_r=4, block_d=16, k_splits=3),
        dict(block_t=1, block_r=32, block_d=64, num_warps=2),
    ],
)
def test_tunables(tunables):
    case = Case(3, **MIXED)
    check_shrink(case, **tunables)
    tunables = {k: v for k, v in tunables.items() if k != "k_splits"}
    check_expand(case, **tunables)


def test_all_rank_zero_and_all_padding():
    case = Case(4, seg_lens=[3, 0, 2], t=9, ranks=[[0, 0, 0]], r=8, d_in=16, d_out=16, w=16)
    out = check_shrink(case)
    assert not np.asarray(out).any()
    np.testing.assert_array_equal(np.asarray(case.expand()), np.asarray(case.y))
    empty = Case(5, seg_lens=[0, 0], t=7, ranks=[[4, 8]], r=8, d_in=16, d_out=16, w=16)
    assert not np.asarray(check_shrink(empty)).any()
    check_expand(empty)


def test_junk_rows_do_not_matter():
    case = Case(6, **MIXED)
    rng = np.random.default_rng(0)
    other = np.where(np.arange(case.r)[:, None] < case.ranks[..., None, None], case.a_good,
                     rng.integers(0, 24, case.a_good.shape)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(case.shrink(rows=other)), np.asarray(case.shrink()))
    other_b = np.where(np.arange(case.r)[:, None] < case.ranks[0][:, None, None], case.b_good,
                       rng.integers(0, 24, case.b_good.shape)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(case.expand(rows=other_b)), np.asarray(case.expand()))


def test_traced_layer_and_jit():
    case = Case(8, **DECODE)

    @jax.jit
    def step(x, y, v, pool, layer, seg_starts, ranks, a_rows, b_rows):
        s = lora.lora_shrink(x, pool, layer, seg_starts, ranks, a_rows)
        e = lora.lora_expand(y, v, pool, layer, seg_starts, ranks[0], b_rows)
        return s, e

    s, e = step(case.x, case.y, case.v, case.pool, jnp.int32(case.layer), jnp.asarray(case.seg_starts),
                jnp.asarray(case.ranks), jnp.asarray(case.a_junk), jnp.asarray(case.b_junk))
    check(s, case.shrink_ref(), jnp.float32)
    check(e, case.expand_ref(), jnp.float32)
    # A negative layer indexes from the end, as in the reference.
    neg = Case(9, layer=-1, n_layers=3, **OFFSET)
    check_shrink(neg)
    check_expand(neg)


def test_xla_backend_is_reference():
    case = Case(10, **OFFSET)
    ks = pallas_kernels.kernel_set("xla")
    starts, ranks = jnp.asarray(case.seg_starts), jnp.asarray(case.ranks)
    np.testing.assert_array_equal(
        np.asarray(ks.lora_shrink(case.x, case.pool, case.layer, starts, ranks, jnp.asarray(case.a_good))),
        np.asarray(case.shrink_ref()))
    v = jnp.nan_to_num(case.v, nan=0.0)
    (out,) = ks.lora_expand_group((case.y,), v[None], case.pool, case.layer, starts, ranks[:1],
                                  (jnp.asarray(case.b_good),))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(case.expand_ref()))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(0, 9), min_size=5, max_size=5),
    ranks=st.lists(st.integers(0, 20), min_size=5, max_size=5),
    start0=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_segments(lens, ranks, start0, seed):
    # Fixed shapes (one compile); T = 48 >= 3 + 5 * 9 leaves padding when segments are short.
    case = Case(seed, seg_lens=lens, start0=start0, t=48, ranks=[ranks], r=20, d_in=37, d_out=29,
                w=16, m=1)
    check_shrink(case)
    check_expand(case)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(0, 3), min_size=9, max_size=9),
    ranks=st.lists(st.integers(0, 20), min_size=9, max_size=9),
    start0=st.integers(0, 3),
    block_r=st.sampled_from([1, 4, 8, 32]),
    k_splits=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_segments_one_token_mode(lens, ranks, start0, block_r, k_splits, seed):
    # Decode-like batches (1-3 tokens a segment, empty ones, padding on both sides) in the one-token mode.
    case = Case(seed, seg_lens=lens, start0=start0, t=32, ranks=[ranks], r=20, d_in=37, d_out=29,
                w=16, m=1)
    check_shrink(case, block_t=1, block_r=block_r, block_d=16, k_splits=k_splits)
    check_expand(case, block_t=1, block_r=block_r, block_d=16)


# --------------------------------------------------------------------------- wrapper errors
def _args():
    t, d, w, ns, r, m = 5, 20, 8, 2, 4, 2
    k = cdiv(d, w)
    return dict(
        x=jnp.zeros((t, d)), pool=jnp.zeros((1, 10, w)), layer=0,
        seg_starts=jnp.array([0, 2, 5], jnp.int32), seg_ranks=jnp.zeros((m, ns), jnp.int32),
        a_rows=jnp.zeros((m, ns, r, k), jnp.int32),
    ), dict(
        y=jnp.zeros((t, d)), v=jnp.zeros((t, r)), pool=jnp.zeros((1, 10, w)), layer=0,
        seg_starts=jnp.array([0, 2, 5], jnp.int32), seg_ranks=jnp.zeros((ns,), jnp.int32),
        b_rows=jnp.zeros((ns, r, k), jnp.int32),
    )


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("x", jnp.zeros((5,)), r"x must be \[T, D_in\]"),
        ("pool", jnp.zeros((10, 8)), r"pool must be \[L, S, W\]"),
        ("a_rows", jnp.zeros((2, 2, 4, 2), jnp.int32),
         r"K_in = ceil\(D_in / W\) = ceil\(20 / 8\) = 3, got \(2, 2, 4, 2\)"),
        ("a_rows", jnp.zeros((2, 3, 4, 3), jnp.int32), r"NS = len\(seg_starts\) - 1 = 2"),
        ("a_rows", jnp.zeros((2, 2, 4), jnp.int32), r"a_rows must be \[M, NS, R, K_in\]"),
        ("seg_ranks", jnp.zeros((2,), jnp.int32), r"seg_ranks must have shape \[M, NS\] = \(2, 2\)"),
        ("seg_starts", jnp.zeros((2, 2), jnp.int32), r"seg_starts must be \[NS \+ 1\]"),
        ("layer", jnp.zeros((1,), jnp.int32), r"layer must be a scalar"),
        ("layer", 3, r"layer 3 out of range for a pool of 1 layers"),
        ("a_rows", jnp.zeros((2, 2, 4, 3)), r"a_rows must be an integer array"),
    ],
)
def test_shrink_errors(field, value, match):
    args, _ = _args()
    args[field] = value
    with pytest.raises((ValueError, TypeError), match=match):
        lora.lora_shrink(**args)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("y", jnp.zeros((5, 20, 1)), r"y must be \[T, D_out\]"),
        ("v", jnp.zeros((5, 3)), r"v must have shape \[T, R\] = \(5, 4\)"),
        ("b_rows", jnp.zeros((2, 4, 2), jnp.int32), r"K_out = ceil\(D_out / W\) = ceil\(20 / 8\) = 3"),
        ("seg_ranks", jnp.zeros((2, 2), jnp.int32), r"seg_ranks must have shape \[NS\] = \(2,\)"),
        ("b_rows", jnp.zeros((4, 3), jnp.int32), r"b_rows must be \[NS, R, K_out\]"),
    ],
)
def test_expand_errors(field, value, match):
    _, args = _args()
    args[field] = value
    with pytest.raises((ValueError, TypeError), match=match):
        lora.lora_expand(**args)


def test_bad_tunables_and_impl():
    args, eargs = _args()
    with pytest.raises(ValueError, match=r"block_d must be a power of two >= 16 .*got 24"):
        lora.lora_shrink(**args, block_d=24)
    with pytest.raises(ValueError, match=r"block_t must be a power of two >= 16 \(block_t = 1.*got 8"):
        lora.lora_expand(**eargs, block_t=8)
    with pytest.raises(ValueError, match=r"block_r must be a power of two >= 16 .*got 8"):
        lora.lora_shrink(**args, block_t=16, block_r=8)  # below 16 only in the one-token mode
    with pytest.raises(ValueError, match=r"block_d must be a power of two >= 16 .*got 8"):
        lora.lora_shrink(**args, block_t=1, block_d=8)
    with pytest.raises(TypeError, match=r"unknown tunable\(s\) \['k_splits'\]"):
        lora.lora_expand(**eargs, k_splits=2)
    with pytest.raises(ValueError, match=r"kernels must be one of \[.*\], got 'cuda'"):
        pallas_kernels.kernel_set("cuda")


def test_tpu_falls_back_to_reference(monkeypatch):
    case = Case(11, **OFFSET)  # W = 32: not a multiple of 128, which the TPU kernels need
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    calls = []
    monkeypatch.setattr(lora, "_shrink_pallas", lambda *a, **k: calls.append(a))
    ks = pallas_kernels.kernel_set("pallas")  # on a TPU backend: the compiled Mosaic kernels
    out = ks.lora_shrink(case.x, case.pool, case.layer, jnp.asarray(case.seg_starts), jnp.asarray(case.ranks),
                         jnp.asarray(case.a_good))
    assert not calls
    np.testing.assert_array_equal(np.asarray(out), np.asarray(case.shrink_ref()))


# --------------------------------------------------------------------------- fused module groups
def group_case(seed, spec: dict, dtype):
    """A Case of M modules plus, per module, its own output width and B rows."""
    case = Case(seed, dtype=dtype, **spec)
    rng = np.random.default_rng(seed + 1)
    dims = [case.d_out, case.w, case.d_out + case.w + 3][:case.m]  # K_out 1 .. 3+ pool rows, one partial
    ys, rows = [], []
    for d in dims:
        ys.append(jnp.asarray(rng.standard_normal((case.t, d)).astype(np.float32), dtype))
        k = cdiv(d, case.w)
        full = rng.integers(0, 8, (case.ns, case.r, k))  # rows [0, 8) are finite in all W columns
        rows.append(jnp.asarray(full, jnp.int32))
    return case, tuple(ys), tuple(rows)


@pytest.mark.parametrize("name", ["mixed", "decode", "prefill"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_expand_takes_split_k_partials(name, dtype):
    """One launch for M modules of different widths and ranks, fed the shrink's unreduced split-K
    partial sums, equals each module's reference expand of the reduced shrink."""
    case, ys, rows = group_case(21, CASES[name], dtype)
    args = (case.pool, case.layer, jnp.asarray(case.seg_starts), jnp.asarray(case.ranks))
    x_rows = jnp.asarray(case.a_good)
    parts = lora.lora_shrink(case.x, *args, x_rows, partials=True, k_splits=4)
    assert parts.ndim == 4 and parts.shape[1:] == (case.m, case.t, case.r)
    if case.d_in > case.w:  # enough D chunks for the split to happen
        assert parts.shape[0] > 1
    v = lora.lora_shrink(case.x, *args, x_rows, k_splits=4)
    np.testing.assert_allclose(np.nan_to_num(np.asarray(parts.sum(0))), np.nan_to_num(np.asarray(v)),
                               rtol=1e-5, atol=1e-5)
    out = lora.lora_expand_group(ys, parts, *args, rows)
    v_ref = jnp.nan_to_num(reference.lora_shrink(case.x, *args, x_rows))
    for m, (y, o) in enumerate(zip(ys, out)):
        ref = reference.lora_expand(y, v_ref[m], case.pool, case.layer, jnp.asarray(case.seg_starts),
                                    jnp.asarray(case.ranks[m]), rows[m])
        assert o.dtype == y.dtype and o.shape == y.shape
        check(o, ref, dtype)
    # the XLA reference of the group, from the same partial sums, agrees too
    for o, r in zip(out, reference.lora_expand_group(ys, jnp.nan_to_num(parts), *args, rows)):
        check(o, r, dtype)


def test_group_expand_errors():
    case, ys, rows = group_case(3, MIXED, jnp.float32)
    args = (case.pool, case.layer, jnp.asarray(case.seg_starts), jnp.asarray(case.ranks))
    v = jnp.zeros((case.m, case.t, case.r))
    with pytest.raises(ValueError, match="3 outputs but 2 b_rows tables"):
        lora.lora_expand_group(ys, v, *args, rows[:2])
    with pytest.raises(ValueError, match=r"v must have shape \[M, T, R\] = \(3, 45, 40\) or \[KS, M, T, R\]"):
        lora.lora_expand_group(ys, v[:2], *args, rows)
    with pytest.raises(ValueError, match=r"seg_ranks must have shape \[M, NS\] = \(3, 7\)"):
        lora.lora_expand_group(ys, v, *args[:3], jnp.asarray(case.ranks)[0], rows)
    with pytest.raises(ValueError, match=r"K_out = ceil\(D_out / W\)"):
        lora.lora_expand_group(ys, v, *args, (rows[1], rows[1], rows[2]))


# --------------------------------------------------------------------------- backend choice and lowering
@pytest.mark.parametrize("device, backend, interpret, resolved", [
    ("cpu", "auto", None, ("xla", False)),
    ("cpu", "pallas", None, ("triton", True)),
    ("cpu", "mosaic", None, ("mosaic", True)),
    ("gpu", "auto", None, ("triton", False)),
    ("gpu", "pallas", None, ("triton", False)),
    ("gpu", "triton-interpret", None, ("triton", True)),
    ("gpu", "xla", True, ("xla", False)),
    ("tpu", "auto", None, ("mosaic", False)),
    ("tpu", "pallas", None, ("mosaic", False)),
    ("tpu", "mosaic", True, ("mosaic", True)),
])
def test_kernel_set_resolves_backends(monkeypatch, device, backend, interpret, resolved):
    monkeypatch.setattr(jax, "default_backend", lambda: device)
    assert pallas_kernels.resolve_backend(backend, interpret) == resolved
    ks = pallas_kernels.kernel_set(backend, interpret)
    assert ks.name == resolved[0] + ("-interpret" if resolved[1] else "")
    assert ks is pallas_kernels.kernel_set(*resolved)  # one object per choice: a stable static jit argument


def test_lowers_for_a_gpu_target():
    """The compiled (non-interpret) kernels pass Pallas' Triton lowering for a CUDA target (on CPU: the
    lowering to Triton IR only; Triton's own compiler runs on the GPU)."""
    sds, i32, bf16 = jax.ShapeDtypeStruct, jnp.int32, jnp.bfloat16
    t, d, ns, r, m = 37, 256, 33, 16, 3
    pool, tables = sds((2, 64, d), bf16), (sds((), i32), sds((ns + 1,), i32), sds((m, ns), i32))
    for tun in ({}, dict(block_t=16)):  # the one-token mode (decode default) and token blocks
        shrink = jax.jit(lambda *a, tun=tun: lora.lora_shrink(*a, interpret=False, partials=True, **tun))
        txt = shrink.trace(sds((t, d), bf16), pool, *tables, sds((m, ns, r, 1), i32)).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "triton" in txt.lower()
        expand = jax.jit(lambda *a, tun=tun: lora.lora_expand_group(*a, interpret=False, **tun))
        txt = expand.trace((sds((t, d), bf16),) * m, sds((2, m, t, r), jnp.float32), pool, *tables,
                           (sds((ns, r, 1), i32),) * m).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in txt.lower()
