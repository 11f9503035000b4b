"""TPU (Mosaic) paged decode attention (pallas_kernels/attention_tpu.py) against the reference.

No TPU here: the kernel runs in Pallas' TPU interpret mode on the CPU
(``interpret=pltpu.InterpretParams()``), which simulates HBM, VMEM, the async
copies and their DMA semaphores, raises on out-of-bounds reads and fills
uninitialised VMEM with NaN (so a page that is used without having been copied
shows up as NaN). Fresh random inputs per seed; a seed changes data, lengths and
page tables, never shapes, so each shape compiles once.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import attention, reference
from tests import test_attention_kernels as _helpers

pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
if not hasattr(pltpu, "InterpretParams"):  # pragma: no cover - older/newer jax
    pytest.skip(f"jax {jax.__version__} has no TPU interpret mode "
                "(jax.experimental.pallas.tpu.InterpretParams)", allow_module_level=True)

from pallas_kernels import attention_tpu  # noqa: E402

make_pool, make_tables = _helpers.make_pool, _helpers.make_tables
awkward_lengths, assert_close, cdiv = _helpers.awkward_lengths, _helpers.assert_close, _helpers.cdiv

SEEDS = (0, 1, 2)
HD = 128  # the kernel needs head_dim % 128 == 0


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """TPU interpret mode keeps global state that an exception leaves dirty."""
    yield
    pltpu.reset_tpu_interpret_mode_state()


def _run(q, pool, layer, bt, lengths, **kw):
    return attention_tpu.paged_attention_decode(q, pool, layer, bt, lengths,
                                                interpret=pltpu.InterpretParams(), **kw)


# --------------------------------------------------------------------------- vs reference
CASES = [
    # hq, hkv, page_rows, batch, max_pages, dtype, pages_per_block
    pytest.param(2, 2, 8, 5, 5, jnp.float32, 2, id="mha-pr8-f32-ppb2"),
    pytest.param(8, 2, 16, 4, 3, jnp.float32, None, id="gqa4-pr16-f32"),
    pytest.param(6, 2, 8, 3, 7, jnp.float32, 3, id="gqa3-pr8-f32-ppb3"),
    pytest.param(4, 1, 8, 1, 4, jnp.float32, 1, id="mqa4-pr8-f32-b1-ppb1"),
    pytest.param(2, 2, 16, 4, 4, jnp.bfloat16, 2, id="mha-pr16-bf16-ppb2"),
    pytest.param(8, 2, 16, 5, 5, jnp.bfloat16, None, id="gqa4-pr16-bf16"),
]


@pytest.mark.parametrize("hq,hkv,page_rows,batch,max_pages,dtype,ppb", CASES)
def test_decode_matches_reference(hq, hkv, page_rows, batch, max_pages, dtype, ppb):
    num_layers, layer = 3, 1  # every layer holds different data
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        lengths = awkward_lengths(rng, batch, page_rows, max_pages * page_rows)
        needed = [cdiv(int(n), page_rows) for n in lengths]
        num_pages = sum(needed) + 3
        pool = make_pool(rng, num_layers, num_pages, page_rows, hkv * HD, dtype)
        bt = make_tables(rng, needed, max_pages, num_pages,
                         pad="garbage" if seed % 2 else "minus_one")
        q = jnp.asarray(rng.standard_normal((batch, hq, HD), dtype=np.float32), dtype)
        lengths = jnp.asarray(lengths)
        kw = dict(page_rows=page_rows, scale=HD ** -0.5)
        out = _run(q, pool, jnp.int32(layer), bt, lengths, pages_per_block=ppb, **kw)
        ref = reference.paged_attention_decode(q, pool, layer, bt, lengths, **kw)
        assert_close(out, ref, dtype)
        assert np.all(np.asarray(out)[np.asarray(lengths) == 0] == 0)


def test_decode_lengths_special_values():
    """Every batch row gets one of 0, 1, page, page + 1, odd, the maximum, a negative
    length (= 0) and one past the table (clamped, as the reference masks)."""
    rng = np.random.default_rng(11)
    hq, hkv, page_rows, max_pages = 4, 2, 8, 3
    lengths = np.array([0, 1, 8, 9, 13, 24, -3, 40], np.int32)
    batch = lengths.size
    needed = [max_pages] * batch
    num_pages = batch * max_pages
    pool = make_pool(rng, 2, num_pages, page_rows, hkv * HD, jnp.float32)
    bt = make_tables(rng, needed, max_pages, num_pages)
    q = jnp.asarray(rng.standard_normal((batch, hq, HD), dtype=np.float32))
    kw = dict(page_rows=page_rows, scale=0.2)
    out = _run(q, pool, 1, bt, jnp.asarray(lengths), pages_per_block=2, **kw)
    ref = reference.paged_attention_decode(q, pool, 1, bt, jnp.asarray(lengths), **kw)
    assert_close(out, ref, jnp.float32)
    assert np.all(np.asarray(out)[[0, 6]] == 0)


def test_decode_reads_only_the_context():
    """Rows past each length (rest of the last page), pages of no sequence and the
    other layers hold NaN: the output is unchanged (no unmasked stale data)."""
    rng = np.random.default_rng(7)
    hq, hkv, page_rows, batch, max_pages = 4, 2, 8, 5, 4
    lengths = np.array([0, 1, 9, 32, 15], np.int32)
    needed = [cdiv(int(n), page_rows) for n in lengths]
    num_pages = sum(needed) + 2
    pool = make_pool(rng, 3, num_pages, page_rows, hkv * HD, jnp.float32)
    bt = make_tables(rng, needed, max_pages, num_pages, pad="minus_one")
    q = jnp.asarray(rng.standard_normal((batch, hq, HD), dtype=np.float32))
    live = np.zeros(pool.shape[1] // 2, bool)
    bt_np = np.asarray(bt)
    for b, n in enumerate(lengths):
        for i in range(n):
            live[bt_np[b, i // page_rows] * page_rows + i % page_rows] = True
    layer = 2
    dirty = np.asarray(pool).copy()
    dirty[:layer] = np.nan
    dirty[layer, : live.size][~live] = np.nan
    dirty[layer, live.size:][~live] = np.nan
    kw = dict(page_rows=page_rows, scale=0.3)
    ref = reference.paged_attention_decode(q, pool, layer, jnp.maximum(bt, 0), lengths, **kw)
    for ppb in (1, 3):
        out = _run(q, jnp.asarray(dirty), layer, bt, jnp.asarray(lengths),
                   pages_per_block=ppb, **kw)
        assert_close(out, ref, jnp.float32)


def test_decode_traced_layer_under_jit_and_mixed_dtypes():
    """layer traced under an outer jit; f32 queries over a bf16 pool (computed in f32)."""
    rng = np.random.default_rng(3)
    hq, hkv, page_rows, batch, max_pages = 4, 4, 16, 3, 3
    lengths = awkward_lengths(rng, batch, page_rows, max_pages * page_rows)
    needed = [cdiv(int(n), page_rows) for n in lengths]
    num_pages = sum(needed) + 1
    pool = make_pool(rng, 3, num_pages, page_rows, hkv * HD, jnp.bfloat16)
    bt = make_tables(rng, needed, max_pages, num_pages)
    q = jnp.asarray(rng.standard_normal((batch, hq, HD), dtype=np.float32))
    kw = dict(page_rows=page_rows, scale=HD ** -0.5)
    f = jax.jit(lambda q, pool, layer, bt, n: _run(q, pool, layer, bt, n, **kw))
    for layer in (0, 2):
        # traced: the wrapper cannot block, so block here (see attention_tpu's eager path)
        out = f(q, pool, jnp.int32(layer), bt, jnp.asarray(lengths)).block_until_ready()
        ref = reference.paged_attention_decode(q, pool, layer, bt, jnp.asarray(lengths), **kw)
        assert_close(out, ref, jnp.float32)


# --------------------------------------------------------------------------- errors
def _inputs(hd=HD, page_rows=8, dtype=jnp.float32, hq=4, hkv=2):
    q = jnp.zeros((2, hq, hd), dtype)
    pool = jnp.zeros((1, 2 * 4 * page_rows, hkv * hd), dtype)
    return q, pool, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,), jnp.int32)


@pytest.mark.parametrize("hd,page_rows,dtype,match", [
    (64, 8, jnp.float32, r"head_dim=64 is not a multiple of 128"),
    (128, 4, jnp.float32, r"page_rows=4 is not a multiple of 8: .*float32"),
    (128, 8, jnp.bfloat16, r"page_rows=8 is not a multiple of 16: .*bfloat16"),
])
def test_decode_unsupported_shapes_raise(hd, page_rows, dtype, match):
    q, pool, bt, n = _inputs(hd, page_rows, dtype)
    with pytest.raises(ValueError, match=match):
        attention_tpu.paged_attention_decode(q, pool, 0, bt, n, page_rows=page_rows, scale=1.0)
    with pytest.raises(ValueError, match=match):  # explicit impl: raises too
        attention.paged_attention_decode(q, pool, 0, bt, n, page_rows=page_rows, scale=1.0,
                                         impl="pallas_tpu")


def test_decode_bad_arguments_raise():
    q, pool, bt, n = _inputs()
    with pytest.raises(ValueError, match="pages_per_block"):
        attention_tpu.paged_attention_decode(q, pool, 0, bt, n, page_rows=8, scale=1.0,
                                             pages_per_block=0)
    with pytest.raises(ValueError, match="lengths must have shape"):
        attention_tpu.paged_attention_decode(q, pool, 0, bt, n[:1], page_rows=8, scale=1.0)
    with pytest.raises(ValueError, match="multiple of the 2 kv heads"):
        attention_tpu.paged_attention_decode(q[:, :3], pool, 0, bt, n, page_rows=8, scale=1.0)
    with pytest.raises(ValueError, match="impl must be"):
        attention.paged_attention_decode(q, pool, 0, bt, n, page_rows=8, scale=1.0,
                                         impl="mosaic")


# --------------------------------------------------------------------------- dispatch
def test_dispatch_pallas_tpu_on_cpu_runs_the_kernel():
    rng = np.random.default_rng(5)
    hq, hkv, page_rows, batch, max_pages = 4, 2, 8, 3, 3
    lengths = jnp.asarray([5, 0, 24], jnp.int32)
    pool = make_pool(rng, 2, batch * max_pages, page_rows, hkv * HD, jnp.float32)
    bt = make_tables(rng, [max_pages] * batch, max_pages, batch * max_pages)
    q = jnp.asarray(rng.standard_normal((batch, hq, HD), dtype=np.float32))
    kw = dict(page_rows=page_rows, scale=0.1)
    out = attention.paged_attention_decode(q, pool, 1, bt, lengths, impl="pallas_tpu", **kw)
    ref = reference.paged_attention_decode(q, pool, 1, bt, lengths, **kw)
    assert_close(out, ref, jnp.float32)


def test_dispatch_on_a_tpu_backend(monkeypatch, caplog):
    """With the backend reported as TPU: impl='pallas' decode goes to the Mosaic kernel
    (compiled: interpret=False), unsupported shapes and prefill to the reference."""
    calls = []

    def spy(*args, **kw):
        calls.append(kw)
        return "mosaic"

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(attention_tpu, "paged_attention_decode", spy)
    q, pool, bt, n = _inputs()
    assert attention.paged_attention_decode(q, pool, 0, bt, n, page_rows=8, scale=1.0) == "mosaic"
    assert calls[-1]["interpret"] is False
    assert attention.paged_attention_decode(q, pool, 0, bt, n, page_rows=8, scale=1.0,
                                            impl="pallas_tpu", interpret=True) == "mosaic"
    assert calls[-1]["interpret"] is True
    ncalls = len(calls)
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        q64, pool64, bt, n = _inputs(hd=64)
        out = attention.paged_attention_decode(q64, pool64, 0, bt, n, page_rows=8, scale=1.0)
        assert out.shape == q64.shape and len(calls) == ncalls
        assert "head_dim=64" in caplog.text
        qs, kv = jnp.asarray([0, 1, 2], jnp.int32), jnp.asarray([1, 1], jnp.int32)
        out = attention.paged_attention_prefill(q[:2], pool, 0, bt, qs, kv, page_rows=8,
                                                scale=1.0)
        assert out.shape == (2, 4, HD) and len(calls) == ncalls
        assert "prefill" in caplog.text


def test_prefill_pallas_tpu_uses_the_reference():
    rng = np.random.default_rng(9)
    pool = make_pool(rng, 1, 4, 8, 2 * HD, jnp.float32)
    bt = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
    q = jnp.asarray(rng.standard_normal((5, 4, HD), dtype=np.float32))
    qs, kv = jnp.asarray([0, 3, 5], jnp.int32), jnp.asarray([10, 2], jnp.int32)
    kw = dict(page_rows=8, scale=0.1)
    out = attention.paged_attention_prefill(q, pool, 0, bt, qs, kv, impl="pallas_tpu", **kw)
    ref = reference.paged_attention_prefill(q, pool, 0, bt, qs, kv, **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
