"""TPU (Mosaic) paged attention against the reference: decode and (chunked) prefill
(pallas_kernels/tpu/attention.py), and kernel_set's routing to them.

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

import pallas_kernels
from pallas_kernels import reference
from tests import test_attention_kernels as _helpers

pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
if not hasattr(pltpu, "InterpretParams"):  # pragma: no cover - older/newer jax
    pytest.skip(f"jax {jax.__version__} has no TPU interpret mode "
                "(jax.experimental.pallas.tpu.InterpretParams)", allow_module_level=True)

from pallas_kernels.tpu import attention as attention_tpu  # noqa: E402

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
        kw = dict(page_rows=page_rows, num_pages=num_pages, scale=HD ** -0.5)
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
    kw = dict(page_rows=page_rows, num_pages=num_pages, scale=0.2)
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
    kw = dict(page_rows=page_rows, num_pages=num_pages, scale=0.3)
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
    kw = dict(page_rows=page_rows, num_pages=num_pages, scale=HD ** -0.5)
    f = jax.jit(lambda q, pool, layer, bt, n: _run(q, pool, layer, bt, n, **kw))
    for layer in (0, 2):
        # traced: the wrapper cannot block, so block here (see attention_tpu's eager path)
        out = f(q, pool, jnp.int32(layer), bt, jnp.asarray(lengths)).block_until_ready()
        ref = reference.paged_attention_decode(q, pool, layer, bt, jnp.asarray(lengths), **kw)
        assert_close(out, ref, jnp.float32)


# --------------------------------------------------------------------------- errors
NP = 4  # pages in the pools of _inputs


def _inputs(hd=HD, page_rows=8, dtype=jnp.float32, hq=4, hkv=2):
    q = jnp.zeros((2, hq, hd), dtype)
    pool = jnp.zeros((1, 2 * NP * page_rows, hkv * hd), dtype)
    return q, pool, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,), jnp.int32)


@pytest.mark.parametrize("hd,page_rows,dtype,match", [
    (64, 8, jnp.float32, r"head_dim=64 is not a multiple of 128"),
    (128, 4, jnp.float32, r"page_rows=4 is not a multiple of 8: .*float32"),
    (128, 8, jnp.bfloat16, r"page_rows=8 is not a multiple of 16: .*bfloat16"),
])
def test_decode_unsupported_shapes_raise(hd, page_rows, dtype, match):
    q, pool, bt, n = _inputs(hd, page_rows, dtype)
    kw = dict(page_rows=page_rows, num_pages=NP, scale=1.0)
    with pytest.raises(ValueError, match=match):
        attention_tpu.paged_attention_decode(q, pool, 0, bt, n, **kw)
    # the mosaic backend routes these shapes to the reference instead
    out = pallas_kernels.kernel_set("mosaic").attention_decode(q, pool, 0, bt, n, **kw)
    np.testing.assert_array_equal(out, reference.paged_attention_decode(q, pool, 0, bt, n, **kw))


def test_decode_bad_arguments_raise():
    q, pool, bt, n = _inputs()
    kw = dict(page_rows=8, num_pages=NP, scale=1.0)
    with pytest.raises(ValueError, match="pages_per_block"):
        attention_tpu.paged_attention_decode(q, pool, 0, bt, n, **kw, pages_per_block=0)
    with pytest.raises(ValueError, match="lengths must have shape"):
        attention_tpu.paged_attention_decode(q, pool, 0, bt, n[:1], **kw)
    with pytest.raises(ValueError, match="multiple of the 2 kv heads"):
        attention_tpu.paged_attention_decode(q[:, :3], pool, 0, bt, n, **kw)
    with pytest.raises(ValueError, match=r"num_pages \* page_rows = 2 \* 3 \* 8 = 48"):
        attention_tpu.paged_attention_decode(q, pool, 0, bt, n, **{**kw, "num_pages": 3})
    with pytest.raises(ValueError, match="kernels must be one of"):
        pallas_kernels.kernel_set("tpu")


# --------------------------------------------------------------------------- dispatch
def test_dispatch_pallas_tpu_on_cpu_runs_the_kernel():
    rng = np.random.default_rng(5)
    hq, hkv, page_rows, batch, max_pages = 4, 2, 8, 3, 3
    lengths = jnp.asarray([5, 0, 24], jnp.int32)
    pool = make_pool(rng, 2, batch * max_pages, page_rows, hkv * HD, jnp.float32)
    bt = make_tables(rng, [max_pages] * batch, max_pages, batch * max_pages)
    q = jnp.asarray(rng.standard_normal((batch, hq, HD), dtype=np.float32))
    kw = dict(page_rows=page_rows, num_pages=batch * max_pages, scale=0.1)
    out = pallas_kernels.kernel_set("mosaic").attention_decode(q, pool, 1, bt, lengths, **kw)
    ref = reference.paged_attention_decode(q, pool, 1, bt, lengths, **kw)
    assert_close(out, ref, jnp.float32)


def test_dispatch_on_a_tpu_backend(monkeypatch, caplog):
    """With the backend reported as TPU: kernel_set('pallas') decode and prefill go to the Mosaic
    kernels (compiled: interpret=False), unsupported shapes to the reference."""
    calls = []

    def spy(*args, **kw):
        calls.append(kw)
        return "mosaic"

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(attention_tpu, "paged_attention_decode", spy)
    monkeypatch.setattr(attention_tpu, "paged_attention_prefill", spy)
    ks = pallas_kernels.kernel_set("pallas")
    kw = dict(page_rows=8, num_pages=NP, scale=1.0)
    q, pool, bt, n = _inputs()
    assert ks.attention_decode(q, pool, 0, bt, n, **kw) == "mosaic"
    assert calls[-1]["interpret"] is False
    assert pallas_kernels.kernel_set("mosaic", interpret=True).attention_decode(q, pool, 0, bt, n,
                                                                                **kw) == "mosaic"
    assert calls[-1]["interpret"] is True
    qs, kv = jnp.asarray([0, 1, 2], jnp.int32), jnp.asarray([1, 1], jnp.int32)
    assert ks.attention_prefill(q[:2], pool, 0, bt, qs, kv, **kw) == "mosaic"
    assert calls[-1]["interpret"] is False
    ncalls = len(calls)
    with caplog.at_level(logging.WARNING, logger=pallas_kernels.__name__):
        q64, pool64, bt, n = _inputs(hd=64)
        out = ks.attention_decode(q64, pool64, 0, bt, n, **kw)
        assert out.shape == q64.shape and len(calls) == ncalls
        assert "head_dim=64" in caplog.text
        caplog.clear()
        out = ks.attention_prefill(q64[:2], pool64, 0, bt, qs, kv, **kw)
        assert out.shape == (2, 4, 64) and len(calls) == ncalls
        assert "prefill" in caplog.text and "head_dim=64" in caplog.text


def test_kernel_set_pallas_on_tpu_uses_the_mosaic_prefill(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(attention_tpu, "paged_attention_prefill", lambda *a, **kw: "mosaic")
    ks = pallas_kernels.kernel_set("pallas")
    q, pool, bt, _ = _inputs()
    qs, kv = jnp.asarray([0, 1, 2], jnp.int32), jnp.asarray([1, 1], jnp.int32)
    assert ks.attention_prefill(q[:2], pool, 0, bt, qs, kv, page_rows=8, num_pages=NP, scale=1.0) == "mosaic"


# --------------------------------------------------------------------------- prefill
PR = 16  # page_rows: a whole bfloat16 (and float32) tile


def prefill_case(rng, nseq, max_pages, max_chunk, lead=2, tail=3):
    """Per sequence one of: empty (no tokens, no queries), no queries but earlier tokens,
    one query (decode-like), a chunk over earlier pages, a whole prompt. Returns chunk
    sizes, kv lengths and q_starts (`lead` padding rows before, `tail` after)."""
    max_kv = max_pages * PR
    sizes, kvs = [], []
    for b in range(nseq):
        kind = (b + int(rng.integers(0, 5))) % 5
        big = int(rng.integers(2, max_chunk + 1))
        n = [0, 0, 1, big, big][kind]
        prefix = [0, int(rng.integers(1, max_kv)), int(rng.integers(0, max_kv)),
                  int(rng.integers(1, max_kv - n + 1)), 0][kind]
        sizes.append(n)
        kvs.append(prefix + n)
    sizes, kvs = np.array(sizes, np.int32), np.array(kvs, np.int32)
    q_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32) + lead
    return sizes, kvs, q_starts, int(q_starts[-1]) + tail


def _prefill(q, pool, layer, bt, q_starts, kvs, **kw):
    return attention_tpu.paged_attention_prefill(
        q, pool, layer, bt, q_starts, kvs, interpret=pltpu.InterpretParams(), **kw)


PREFILL_CASES = [
    # hq, hkv, nseq, max_pages, max_chunk, dtype, tunables
    pytest.param(2, 2, 5, 19, 70, jnp.float32, dict(pages_per_block=4), id="mha-f32-ppb4"),
    pytest.param(4, 1, 4, 12, 40, jnp.float32, dict(block_q=16, pages_per_block=3),
                 id="mqa4-f32-bq16-ppb3"),
    pytest.param(6, 2, 3, 8, 30, jnp.float32, dict(pages_per_block=2), id="gqa3-f32-ppb2"),
    pytest.param(4, 2, 5, 19, 70, jnp.bfloat16, {}, id="gqa2-bf16"),
    pytest.param(2, 2, 4, 10, 33, jnp.bfloat16, dict(block_q=32, pages_per_block=2),
                 id="mha-bf16-bq32-ppb2"),
]


@pytest.mark.parametrize("hq,hkv,nseq,max_pages,max_chunk,dtype,tun", PREFILL_CASES)
def test_prefill_matches_reference(hq, hkv, nseq, max_pages, max_chunk, dtype, tun):
    num_layers, layer = 2, 1
    for seed in (0, 1):  # same shapes: T is fixed per case by padding to a bound
        rng = np.random.default_rng(200 + seed)
        sizes, kvs, q_starts, used = prefill_case(rng, nseq, max_pages, max_chunk)
        tokens = nseq * max_chunk + 5
        needed = [cdiv(int(n), PR) for n in kvs]
        num_pages = sum(needed) + 2
        pool = make_pool(rng, num_layers, nseq * max_pages + 2, PR, hkv * HD, dtype)
        bt = make_tables(rng, needed, max_pages, num_pages,
                         pad="garbage" if seed % 2 else "minus_one")
        q = jnp.asarray(rng.standard_normal((tokens, hq, HD), dtype=np.float32), dtype)
        kw = dict(page_rows=PR, num_pages=nseq * max_pages + 2, scale=HD ** -0.5)
        args = (q, pool, jnp.int32(layer), bt, jnp.asarray(q_starts), jnp.asarray(kvs))
        out = _prefill(*args, **kw, **tun)
        ref = reference.paged_attention_prefill(*args, **kw)
        assert_close(out, ref, dtype)
        out = np.asarray(out, np.float32)
        assert np.all(out[: q_starts[0]] == 0) and np.all(out[q_starts[-1]:] == 0)


def test_prefill_chunked_equals_whole_and_reads_only_the_context():
    """A prompt prefilled in chunks (later ones over pages of earlier ones) equals one pass
    and its last row equals decode; rows past each context, foreign pages and other layers
    hold NaN, which the kernel never lets through."""
    rng = np.random.default_rng(13)
    hq, hkv, n = 4, 2, 77
    needed = [cdiv(n, PR), 2]
    num_pages = sum(needed) + 2
    pool = np.asarray(make_pool(rng, 2, num_pages, PR, hkv * HD, jnp.float32)).copy()
    bt = make_tables(rng, needed, 6, num_pages, pad="minus_one")
    live = np.zeros(num_pages * PR, bool)
    for b, m in enumerate([n, 20]):
        for i in range(m):
            live[int(bt[b, i // PR]) * PR + i % PR] = True
    pool[0] = np.nan
    pool[1, : live.size][~live] = np.nan
    pool[1, live.size:][~live] = np.nan
    pool = jnp.asarray(pool)
    q = jnp.asarray(rng.standard_normal((n, hq, HD), dtype=np.float32))
    q2 = jnp.asarray(rng.standard_normal((3, hq, HD), dtype=np.float32))
    kw = dict(page_rows=PR, num_pages=num_pages, scale=HD ** -0.5)
    # the whole prompt of sequence 0, and 3 queries of sequence 1 at positions 17..19
    whole = _prefill(jnp.concatenate([q, q2]), pool, 1, bt, jnp.asarray([0, n, n + 3]),
                     jnp.asarray([n, 20], jnp.int32), **kw)
    assert np.all(np.isfinite(np.asarray(whole)))
    parts, start = [], 0
    for end in (30, 31, n):  # chunks of 30, 1 and 46 tokens, padded to 48 rows
        qc = jnp.zeros((48, hq, HD), jnp.float32).at[: end - start].set(q[start:end])
        out = _prefill(qc, pool, 1, bt[:1], jnp.array([0, end - start], jnp.int32),
                       jnp.array([end], jnp.int32), **kw)
        assert np.all(np.asarray(out)[end - start:] == 0)
        parts.append(out[: end - start])
        start = end
    np.testing.assert_allclose(np.concatenate(parts), whole[:n], rtol=1e-5, atol=2e-5)
    dec = _run(q[-1:], pool, 1, bt[:1], jnp.array([n], jnp.int32), **kw)
    np.testing.assert_allclose(dec[0], whole[n - 1], rtol=1e-5, atol=2e-5)
    ref_pool = jnp.nan_to_num(pool)
    ref = reference.paged_attention_prefill(jnp.concatenate([q, q2]), ref_pool, 1,
                                            jnp.maximum(bt, 0), jnp.asarray([0, n, n + 3]),
                                            jnp.asarray([n, 20], jnp.int32), **kw)
    assert_close(whole, ref, jnp.float32)


def test_prefill_empty_sequences_and_traced_layer():
    """Only empty sequences (length 0, or queries 0), and a q with padding rows only:
    zeros, no NaN; under an outer jit with a traced layer."""
    rng = np.random.default_rng(4)
    hq, hkv = 4, 2
    pool = make_pool(rng, 2, 4, PR, hkv * HD, jnp.float32)
    bt = jnp.asarray([[0, 1], [2, 3], [-1, -1]], jnp.int32)
    q = jnp.asarray(rng.standard_normal((16, hq, HD), dtype=np.float32))
    kw = dict(page_rows=PR, num_pages=4, scale=0.1)
    f = jax.jit(lambda q, layer, qs, kv: _prefill(q, pool, layer, bt, qs, kv, **kw))
    for qs, kv in (([3, 3, 3, 3], [0, 20, 0]), ([0, 0, 0, 0], [0, 0, 0])):
        out = f(q, jnp.int32(1), jnp.asarray(qs, jnp.int32),
                jnp.asarray(kv, jnp.int32)).block_until_ready()
        assert np.all(np.asarray(out) == 0)
    # one live sequence between two empty ones, traced layer 0 and 1
    qs, kv = jnp.asarray([2, 2, 9, 9], jnp.int32), jnp.asarray([0, 25, 0], jnp.int32)
    for layer in (0, 1):
        out = f(q, jnp.int32(layer), qs, kv).block_until_ready()
        ref = reference.paged_attention_prefill(q, pool, layer, bt, qs, kv, **kw)
        assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("hd,page_rows,dtype,match", [
    (64, 8, jnp.float32, r"head_dim=64 is not a multiple of 128"),
    (128, 8, jnp.bfloat16, r"page_rows=8 is not a multiple of 16: .*bfloat16"),
])
def test_prefill_unsupported_shapes_raise(hd, page_rows, dtype, match):
    q, pool, bt, _ = _inputs(hd, page_rows, dtype)
    qs, kv = jnp.asarray([0, 1, 2], jnp.int32), jnp.asarray([1, 1], jnp.int32)
    kw = dict(page_rows=page_rows, num_pages=NP, scale=1.0)
    with pytest.raises(ValueError, match=match):
        attention_tpu.paged_attention_prefill(q, pool, 0, bt, qs, kv, **kw)
    # the mosaic backend routes these shapes to the reference instead
    out = pallas_kernels.kernel_set("mosaic").attention_prefill(q, pool, 0, bt, qs, kv, **kw)
    np.testing.assert_array_equal(out, reference.paged_attention_prefill(q, pool, 0, bt, qs, kv, **kw))


def test_prefill_bad_arguments_raise():
    q, pool, bt, _ = _inputs()
    qs, kv = jnp.asarray([0, 1, 2], jnp.int32), jnp.asarray([1, 1], jnp.int32)
    kw = dict(page_rows=8, num_pages=NP, scale=1.0)
    for bad in (8, 24, 0):
        with pytest.raises(ValueError, match="block_q"):
            attention_tpu.paged_attention_prefill(q, pool, 0, bt, qs, kv, **kw, block_q=bad)
    with pytest.raises(ValueError, match="pages_per_block"):
        attention_tpu.paged_attention_prefill(q, pool, 0, bt, qs, kv, **kw, pages_per_block=0)
    with pytest.raises(ValueError, match="q_starts must have shape"):
        attention_tpu.paged_attention_prefill(q, pool, 0, bt, qs[:2], kv, **kw)


def test_prefill_dispatch_pallas_tpu_on_cpu_runs_the_kernel(monkeypatch):
    rng = np.random.default_rng(9)
    pool = make_pool(rng, 1, 4, 8, 2 * HD, jnp.float32)
    bt = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
    q = jnp.asarray(rng.standard_normal((5, 4, HD), dtype=np.float32))
    qs, kv = jnp.asarray([0, 3, 5], jnp.int32), jnp.asarray([10, 2], jnp.int32)
    kw = dict(page_rows=8, num_pages=4, scale=0.1)
    ran = []
    real = attention_tpu.paged_attention_prefill
    monkeypatch.setattr(attention_tpu, "paged_attention_prefill",
                        lambda *a, **k: ran.append(1) or real(*a, **k))
    out = pallas_kernels.kernel_set("mosaic").attention_prefill(q, pool, 0, bt, qs, kv, **kw)
    ref = reference.paged_attention_prefill(q, pool, 0, bt, qs, kv, **kw)
    assert ran and out.shape == ref.shape
    assert_close(out, ref, jnp.float32)
