"""TPU (Mosaic) LoRA kernels (pallas_kernels/tpu/lora.py) against the references, in TPU interpret mode.

Off TPU, the kernels run under ``pltpu.InterpretParams()``:
Pallas simulates HBM / VMEM / SMEM, the DMAs and their semaphores on CPU, and
fills uninitialised memory (scratch buffers, shrink outputs) with NaN. The cases
come from `test_lora_kernels.Case`, which poisons with NaN everything a kernel must
never read (the other layer, pool columns past D, rows that junk index entries
point to, x / v rows of padding and rank-0 tokens, v past a segment's rank), so a
stray read or an unwritten output row shows up as NaN. Pool widths are multiples
of 128, as the TPU kernels require.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels
from pallas_kernels import common, reference
from pallas_kernels.gpu import lora
from pallas_kernels.tpu import lora as lora_tpu
from tests.test_lora_kernels import Case, check, check_expand, check_shrink, group_case

TPU = dict(module=lora_tpu)

# seg_lens, t, ranks (M x NS), r, d_in, d_out, w, start0, m
# K_in = 2 and K_out = 3 with partial last pool rows (D not a multiple of W or of 128); empty,
# one-token and rank-0 segments; padding after the last segment; 3 fused modules.
MIXED = dict(seg_lens=[0, 1, 13, 0, 1, 17, 5], t=45, r=40, d_in=200, d_out=300, w=128, m=3,
             ranks=[[3, 40, 1, 7, 0, 17, 9], [0, 2, 33, 1, 16, 40, 1], [8, 0, 0, 5, 3, 1, 39]])
# Long segments (128-token blocks, the segment cache across blocks), R > 128: two rank blocks,
# the second skipped for ranks <= 128.
PREFILL = dict(seg_lens=[70, 0, 61, 3], t=150, r=160, d_in=256, d_out=128, w=128, m=1,
               ranks=[[160, 9, 0, 130]])
# Decode: 20 one-token segments (ranks 0..16) in 16-token blocks, padding after.
DECODE = dict(seg_lens=[1] * 20, t=23, r=16, d_in=128, d_out=384, w=128, m=2,
              ranks=[[(s * 7) % 17 for s in range(20)], [(s * 5 + 3) % 17 for s in range(20)]])
# Padding before the first segment, K = 1 with D < W, ranks up to 64.
OFFSET = dict(seg_lens=[4, 0, 9, 2], start0=5, t=31, r=64, d_in=33, d_out=20, w=128, m=1,
              ranks=[[64, 5, 0, 1]])
CASES = {"mixed": MIXED, "prefill": PREFILL, "decode": DECODE, "offset": OFFSET}


@pytest.mark.parametrize("name", sorted(CASES))
def test_f32(name):
    case = Case(0, **CASES[name])
    check_shrink(case, **TPU)
    check_expand(case, **TPU)


@pytest.mark.parametrize("name", ["mixed", "prefill", "decode"])
def test_bf16(name):
    case = Case(7, dtype=jnp.bfloat16, **CASES[name])
    check_shrink(case, **TPU)
    check_expand(case, **TPU)


@pytest.mark.parametrize("block_t", [16, 32])
def test_block_t_and_segment_cache(block_t):
    # 16 / 32-token blocks over 70- and 61-token segments: blocks that start inside a segment
    # reuse the adapter rows fetched by the block before (and blocks that do not must not).
    case = Case(1, **PREFILL)
    check_shrink(case, block_t=block_t, **TPU)
    check_expand(case, block_t=block_t, **TPU)


def test_one_segment_several_modules_and_column_blocks():
    # Every block of every module (shrink) / output column block (expand) sees segment 0 only: the
    # adapter cached for one module or column block must not be reused by the next one.
    case = Case(2, seg_lens=[40], t=40, ranks=[[5], [8]], r=8, d_in=128, d_out=256, w=128, m=2)
    check_shrink(case, **TPU)
    check_shrink(case, block_t=16, **TPU)
    check_expand(case, **TPU)
    check_expand(case, block_t=16, **TPU)


@pytest.mark.parametrize("name", ["mixed", "decode"])
def test_eager_dma(name):
    # The default interpreter runs a DMA when it is waited for; "eager" runs it when it starts.
    # Hardware does either or anything in between: a prefetch into the slot being read would show.
    case = Case(3, **CASES[name])
    params = pltpu.InterpretParams(dma_execution_mode="eager")
    check_shrink(case, interpret=params, **TPU)
    check_expand(case, interpret=params, **TPU)


def test_all_rank_zero_and_all_padding():
    case = Case(4, seg_lens=[3, 0, 2], t=9, ranks=[[0, 0, 0]], r=8, d_in=16, d_out=16, w=128)
    assert not np.asarray(check_shrink(case, **TPU)).any()
    np.testing.assert_array_equal(np.asarray(case.expand(**TPU)), np.asarray(case.y))
    empty = Case(5, seg_lens=[0, 0], t=7, ranks=[[4, 8]], r=8, d_in=16, d_out=16, w=128)
    assert not np.asarray(check_shrink(empty, **TPU)).any()
    check_expand(empty, **TPU)


def test_junk_rows_do_not_matter():
    case = Case(6, **MIXED)
    rng = np.random.default_rng(0)
    other = np.where(np.arange(case.r)[:, None] < case.ranks[..., None, None], case.a_good,
                     rng.integers(0, 25, case.a_good.shape)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(case.shrink(rows=other, **TPU)), np.asarray(case.shrink(**TPU)))
    other_b = np.where(np.arange(case.r)[:, None] < case.ranks[0][:, None, None], case.b_good,
                       rng.integers(0, 25, case.b_good.shape)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(case.expand(rows=other_b, **TPU)), np.asarray(case.expand(**TPU)))


def test_traced_layer_and_jit():
    case = Case(8, **DECODE)

    @jax.jit
    def step(x, y, v, pool, layer, seg_starts, ranks, a_rows, b_rows):
        s = lora_tpu.lora_shrink(x, pool, layer, seg_starts, ranks, a_rows)
        e = lora_tpu.lora_expand(y, v, pool, layer, seg_starts, ranks[0], b_rows)
        return s, e

    s, e = step(case.x, case.y, case.v, case.pool, jnp.int32(case.layer), jnp.asarray(case.seg_starts),
                jnp.asarray(case.ranks), jnp.asarray(case.a_junk), jnp.asarray(case.b_junk))
    check(s, case.shrink_ref(), jnp.float32)
    check(e, case.expand_ref(), jnp.float32)
    neg = Case(9, layer=-1, n_layers=3, **OFFSET)  # a negative layer indexes from the end
    check_shrink(neg, **TPU)
    check_expand(neg, **TPU)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(0, 9), min_size=5, max_size=5),
    ranks=st.lists(st.integers(0, 20), min_size=5, max_size=5),
    start0=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_segments(lens, ranks, start0, seed):
    # Fixed shapes (one compile); T = 48 >= 3 + 5 * 9 leaves padding when segments are short.
    case = Case(seed, seg_lens=lens, start0=start0, t=48, ranks=[ranks], r=20, d_in=160, d_out=136,
                w=128, m=1)
    check_shrink(case, **TPU)
    check_expand(case, **TPU)


# --------------------------------------------------------------------------- dispatch and errors
def test_group_expand_on_tpu_kernels():
    """The model's fused path (shrink partial sums -> one group expand) through the TPU kernels: the
    group runs as one TPU expand per module on the summed partials."""
    case, ys, rows = group_case(31, MIXED, jnp.float32)
    args = (case.pool, case.layer, jnp.asarray(case.seg_starts), jnp.asarray(case.ranks))
    parts = lora_tpu.lora_shrink(case.x, *args, jnp.asarray(case.a_good), partials=True)
    assert parts.shape == (1, case.m, case.t, case.r)
    out = lora_tpu.lora_expand_group(ys, parts, *args, rows)
    ref = reference.lora_expand_group(ys, jnp.nan_to_num(parts), *args, rows)
    for o, r in zip(out, ref):
        check(o, r, jnp.float32)


def test_tpu_backend_dispatches_to_tpu_kernels(monkeypatch):
    case = Case(11, **OFFSET)  # W = 128
    calls = []
    real_shrink, real_expand = lora_tpu.lora_shrink, lora_tpu.lora_expand_group

    def shrink(*a, **k):
        calls.append(("shrink", k.get("interpret")))
        return real_shrink(*a, **{**k, "interpret": True})  # no TPU here: interpret

    def expand(*a, **k):
        calls.append(("expand", k.get("interpret")))
        return real_expand(*a, **{**k, "interpret": True})

    monkeypatch.setattr(lora_tpu, "lora_shrink", shrink)
    monkeypatch.setattr(lora_tpu, "lora_expand_group", expand)
    monkeypatch.setattr(lora, "_shrink_pallas", lambda *a, **k: pytest.fail("Triton kernel on TPU"))
    monkeypatch.setattr(lora, "_expand_pallas", lambda *a, **k: pytest.fail("Triton kernel on TPU"))
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    ks = pallas_kernels.kernel_set("pallas")
    starts, ranks = jnp.asarray(case.seg_starts), jnp.asarray(case.ranks)
    check(ks.lora_shrink(case.x, case.pool, case.layer, starts, ranks, jnp.asarray(case.a_junk)),
          case.shrink_ref(), jnp.float32)
    (out,) = ks.lora_expand_group((case.y,), case.v[None], case.pool, case.layer, starts, ranks[:1],
                                  (jnp.asarray(case.b_junk),))
    check(out, case.expand_ref(), jnp.float32)
    assert calls == [("shrink", False), ("expand", False)]  # compiled with Mosaic on a TPU backend
    # interpret=None on a TPU backend compiles with Mosaic.
    assert common.mosaic_interpret(None) is False
    assert isinstance(common.mosaic_interpret(True), pltpu.InterpretParams)


def test_tpu_backend_falls_back_for_unsupported_shapes(monkeypatch, caplog):
    # Index tables past the SMEM budget: the reference runs, with a warning; explicitly asking for
    # the compiled TPU kernel raises before anything is compiled.
    t, ns, r, k, w = 4, 200, 128, 6, 128
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((t, k * w)), jnp.float32)
    pool = jnp.asarray(rng.standard_normal((2, 16, w)), jnp.float32)
    starts = jnp.asarray(np.minimum(np.arange(ns + 1), t), jnp.int32)
    ranks = jnp.full((1, ns), 3, jnp.int32)
    a_rows = jnp.asarray(rng.integers(0, 16, (1, ns, r, k)), jnp.int32)
    assert lora_tpu.shrink_unsupported(pool.shape, a_rows.shape) is not None
    ref = reference.lora_shrink(x, pool, 1, starts, ranks, a_rows)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with caplog.at_level("WARNING", logger=pallas_kernels.__name__):
        out = pallas_kernels.kernel_set("pallas").lora_shrink(x, pool, 1, starts, ranks, a_rows)
    assert "SMEM budget" in caplog.text
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    with pytest.raises(ValueError, match="SMEM budget"):
        lora_tpu.lora_shrink(x, pool, 1, starts, ranks, a_rows, interpret=False)
    y = jnp.zeros((t, k * w), jnp.float32)
    with pytest.raises(ValueError, match="SMEM budget"):
        lora_tpu.lora_expand(y, jnp.zeros((t, r)), pool, 1, starts, ranks[0], a_rows[0], interpret=False)


def test_no_races():
    # The interpreter's happens-before race detector, over DMAs into the double-buffered scratch.
    # Its result lives in a private module (jax 0.10.2 and 0.11.2: interpret_pallas_call.races).
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    except ImportError:
        pytest.skip("this jax has no TPU interpret race-detector state where this test looks for it")
    case = Case(15, **MIXED)
    params = pltpu.InterpretParams(detect_races=True)
    check_shrink(case, interpret=params, block_t=16, **TPU)
    assert not ipc.races.races_found
    check_expand(case, interpret=params, block_t=16, **TPU)
    assert not ipc.races.races_found


def test_default_interpret_off_tpu():
    assert jax.default_backend() != "tpu"
    assert isinstance(common.mosaic_interpret(None), pltpu.InterpretParams)


def test_errors():
    case = Case(12, seg_lens=[2, 1], t=4, ranks=[[1, 2]], r=2, d_in=16, d_out=16, w=32)
    with pytest.raises(ValueError, match=r"pool width W to be a multiple of 128 .*got W = 32"):
        case.shrink(**TPU)
    with pytest.raises(ValueError, match=r"pool width W to be a multiple of 128 .*got W = 32"):
        case.expand(**TPU)
    ok = Case(13, seg_lens=[2, 1], t=4, ranks=[[1, 2]], r=2, d_in=16, d_out=16, w=128)
    with pytest.raises(ValueError, match="block_t must be a positive multiple of 16 on TPU, got 24"):
        ok.shrink(block_t=24, **TPU)
    with pytest.raises(TypeError, match=r"unknown tunable\(s\) \['num_warps'\] for the TPU kernels"):
        ok.expand(num_warps=4, **TPU)
    # The shared validation still runs first.
    with pytest.raises(ValueError, match=r"seg_ranks must have shape \[M, NS\]"):
        lora_tpu.lora_shrink(ok.x, ok.pool, 1, jnp.asarray(ok.seg_starts), jnp.zeros((2,), jnp.int32),
                             jnp.asarray(ok.a_good))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_mosaic(dtype):
    """The compiled (non-interpret) kernels pass Pallas' Mosaic lowering for a TPU target.

    This runs jax's Pallas -> Mosaic MLIR lowering on CPU (block shapes, memory spaces, DMA and
    semaphore ops, scalar prefetch); Mosaic's own compiler passes run only inside libtpu and are
    not exercised here.
    """
    t, d_in, d_out, w, m, ns, r = 45, 200, 300, 128, 3, 7, 160
    i32 = jnp.int32
    sds = jax.ShapeDtypeStruct
    pool = sds((2, 25, w), dtype)
    common_args = (sds((), i32), sds((ns + 1,), i32))
    shrink = jax.jit(lambda *a: lora_tpu.lora_shrink(*a, interpret=False))
    txt = shrink.trace(sds((t, d_in), dtype), pool, *common_args, sds((m, ns), i32),
                       sds((m, ns, r, 2), i32)).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in txt
    expand = jax.jit(lambda *a: lora_tpu.lora_expand(*a, interpret=False))
    txt = expand.trace(sds((t, d_out), dtype), sds((t, r), jnp.float32), pool, *common_args, sds((ns,), i32),
                       sds((ns, r, 3), i32)).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in txt

