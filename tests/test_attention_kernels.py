"""Paged attention kernels (pallas_kernels/gpu/attention.py) against the references.

CPU, Pallas interpret mode: the same kernel code the GPU compiles, run on fresh
random inputs of awkward sizes (several seeds per shape; a seed changes data,
lengths, chunking and page tables, never shapes, so each shape compiles once).
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import reference
from pallas_kernels.gpu import attention

SEEDS = (0, 1, 2)


# --------------------------------------------------------------------------- helpers
def make_pool(rng, num_layers, num_pages, page_rows, width, dtype):
    """Every layer holds different random data."""
    shape = (num_layers, 2 * num_pages * page_rows, width)
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)


def make_tables(rng, needed, max_pages, num_pages, pad="garbage"):
    """Block tables over a random permutation of the pages; unused entries are garbage
    (in-range pages of other sequences) or -1."""
    batch = len(needed)
    assert sum(needed) <= num_pages
    perm = rng.permutation(num_pages).astype(np.int32)
    bt = np.empty((batch, max_pages), np.int32)
    used = 0
    for b, n in enumerate(needed):
        bt[b, :n] = perm[used:used + n]
        used += n
        bt[b, n:] = rng.integers(0, num_pages, max_pages - n) if pad == "garbage" else -1
    return jnp.asarray(bt)


def paged_inputs(rng, lengths, page_rows, max_pages, hq, hkv, hd, rows, layers):
    """(pool, block tables, q [rows, hq, hd], kernel geometry) for sequences of `lengths` tokens, f32."""
    needed = [cdiv(int(n), page_rows) for n in lengths]
    num_pages = sum(needed) + 1
    pool = make_pool(rng, layers, num_pages, page_rows, hkv * hd, jnp.float32)
    bt = make_tables(rng, needed, max_pages, num_pages)
    q = jnp.asarray(rng.standard_normal((rows, hq, hd), dtype=np.float32))
    return pool, bt, q, dict(page_rows=page_rows, num_pages=num_pages, scale=hd ** -0.5)


def awkward_lengths(rng, batch, page_rows, max_len):
    """0, 1, a page, a page + 1, the maximum, then random (odd) lengths."""
    special = [0, 1, page_rows, page_rows + 1, max_len, max_len - 1]
    special = [min(x, max_len) for x in special]
    rest = [int(x) | 1 for x in rng.integers(0, max_len, batch)]
    lengths = (special + rest)[:batch]
    rng.shuffle(lengths)
    return np.minimum(np.asarray(lengths, np.int32), max_len)


def assert_close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    if dtype == jnp.float32:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    else:
        rel = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
        assert rel < 1e-2, rel


def cdiv(a, b):
    return -(-a // b)


# --------------------------------------------------------------------------- decode
DECODE_CASES = [
    # hq, hkv, hd, page_rows, batch, max_pages, dtype, tunables
    pytest.param(4, 4, 16, 4, 6, 5, jnp.float32, {}, id="mha-pr4-f32"),
    pytest.param(4, 4, 16, 4, 6, 5, jnp.float32, dict(num_splits=3, block_kv=16),
                 id="mha-pr4-f32-split3"),
    pytest.param(8, 2, 32, 1, 9, 40, jnp.float32, dict(num_splits=4, block_kv=16),
                 id="gqa4-pr1-f32-split4"),
    pytest.param(6, 2, 16, 16, 3, 3, jnp.float32, dict(block_kv=16), id="gqa3-pr16-f32"),
    pytest.param(8, 2, 32, 16, 7, 3, jnp.bfloat16, {}, id="gqa4-pr16-bf16"),
    pytest.param(4, 4, 32, 4, 8, 9, jnp.bfloat16, dict(num_splits=2, block_kv=16),
                 id="mha-pr4-bf16-split2"),
    pytest.param(32, 1, 16, 8, 2, 5, jnp.float32, dict(block_kv=32), id="mqa32-pr8-f32"),
]


@pytest.mark.parametrize("hq,hkv,hd,page_rows,batch,max_pages,dtype,tun", DECODE_CASES)
def test_decode_matches_reference(hq, hkv, hd, page_rows, batch, max_pages, dtype, tun):
    num_layers, layer = 3, 1
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        lengths = awkward_lengths(rng, batch, page_rows, max_pages * page_rows)
        needed = [cdiv(int(n), page_rows) for n in lengths]
        num_pages = sum(needed) + 3
        pool = make_pool(rng, num_layers, num_pages, page_rows, hkv * hd, dtype)
        bt = make_tables(rng, needed, max_pages, num_pages,
                         pad="garbage" if seed % 2 else "minus_one")
        q = jnp.asarray(rng.standard_normal((batch, hq, hd), dtype=np.float32), dtype)
        lengths = jnp.asarray(lengths)
        kw = dict(page_rows=page_rows, num_pages=num_pages, scale=hd ** -0.5)
        out = attention.paged_attention_decode(q, pool, layer, bt, lengths, **kw, **tun)
        ref = reference.paged_attention_decode(q, pool, layer, bt, lengths, **kw)
        assert_close(out, ref, dtype)
        assert np.all(np.asarray(out)[np.asarray(lengths) == 0] == 0)


def test_decode_reads_only_the_context():
    """Rows past each length (the rest of the last page) and pages of no sequence are
    never read: NaN there leaves the output unchanged."""
    rng = np.random.default_rng(7)
    hq, hkv, hd, page_rows, batch, max_pages = 4, 2, 16, 4, 5, 4
    lengths = np.array([0, 1, 5, 16, 7], np.int32)
    needed = [cdiv(int(n), page_rows) for n in lengths]
    num_pages = sum(needed) + 2
    pool = make_pool(rng, 2, num_pages, page_rows, hkv * hd, jnp.float32)
    bt = make_tables(rng, needed, max_pages, num_pages, pad="minus_one")
    q = jnp.asarray(rng.standard_normal((batch, hq, hd), dtype=np.float32))
    live = np.zeros(pool.shape[1] // 2, bool)
    bt_np = np.asarray(bt)
    for b, n in enumerate(lengths):
        for i in range(n):
            live[bt_np[b, i // page_rows] * page_rows + i % page_rows] = True
    dirty = np.asarray(pool).copy()
    dirty[0, : live.size][~live] = np.nan
    dirty[0, live.size:][~live] = np.nan
    kw = dict(page_rows=page_rows, num_pages=num_pages, scale=0.3)
    ref = reference.paged_attention_decode(q, pool, 0, jnp.maximum(bt, 0), lengths, **kw)
    out = attention.paged_attention_decode(q, jnp.asarray(dirty), 0, bt, lengths, **kw,
                                           num_splits=2, block_kv=16)
    assert_close(out, ref, jnp.float32)


def test_decode_traced_layer_under_jit():
    rng = np.random.default_rng(3)
    hq, hkv, hd, page_rows, batch, max_pages = 4, 4, 16, 4, 6, 5
    lengths = awkward_lengths(rng, batch, page_rows, max_pages * page_rows)
    pool, bt, q, kw = paged_inputs(rng, lengths, page_rows, max_pages, hq, hkv, hd, batch, layers=3)
    f = jax.jit(lambda q, pool, layer, bt, n: attention.paged_attention_decode(
        q, pool, layer, bt, n, **kw))
    for layer in (0, 2):
        out = f(q, pool, jnp.int32(layer), bt, jnp.asarray(lengths))
        ref = reference.paged_attention_decode(q, pool, layer, bt, jnp.asarray(lengths), **kw)
        assert_close(out, ref, jnp.float32)


# --------------------------------------------------------------------------- prefill
def random_chunks(rng, nseq, num_tokens, page_rows, max_pages):
    """Per sequence: chunk size n (0, 1 or up to the whole budget, so several query
    blocks) and total kv length (a random earlier prefix + n)."""
    max_kv = max_pages * page_rows
    budget = num_tokens - 2  # keep some padding rows at the end
    sizes, kvs = [], []
    for _ in range(nseq):
        kind = int(rng.integers(0, 4))
        n = [0, 1, int(rng.integers(2, budget + 1)), int(rng.integers(2, budget + 1))][kind]
        n = min(n, budget - sum(sizes), max_kv)
        prefix = int(rng.integers(0, max_kv - n + 1)) if kind != 3 else 0
        sizes.append(n)
        kvs.append(prefix + n)
    return np.array(sizes, np.int32), np.array(kvs, np.int32)


PREFILL_CASES = [
    # hq, hkv, hd, page_rows, tokens, nseq, max_pages, dtype, lead, tunables
    pytest.param(4, 4, 16, 4, 40, 4, 8, jnp.float32, 0, dict(block_q=16, block_kv=16),
                 id="mha-pr4-f32"),
    pytest.param(8, 2, 32, 1, 33, 3, 40, jnp.float32, 0, {}, id="gqa4-pr1-f32"),
    pytest.param(6, 2, 16, 16, 24, 2, 4, jnp.float32, 3, dict(block_q=32, block_kv=16),
                 id="gqa3-pr16-f32-lead"),
    pytest.param(8, 2, 32, 16, 48, 5, 3, jnp.bfloat16, 0, dict(block_kv=32), id="gqa4-pr16-bf16"),
    pytest.param(4, 4, 32, 4, 37, 3, 12, jnp.bfloat16, 0, dict(block_q=16, block_kv=16),
                 id="mha-pr4-bf16"),
]


@pytest.mark.parametrize("hq,hkv,hd,page_rows,tokens,nseq,max_pages,dtype,lead,tun",
                         PREFILL_CASES)
def test_prefill_matches_reference(hq, hkv, hd, page_rows, tokens, nseq, max_pages, dtype,
                                   lead, tun):
    num_layers, layer = 3, 2
    for seed in SEEDS:
        rng = np.random.default_rng(100 + seed)
        sizes, kvs = random_chunks(rng, nseq, tokens - lead, page_rows, max_pages)
        q_starts = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)]) + lead, jnp.int32)
        needed = [cdiv(int(n), page_rows) for n in kvs]
        num_pages = sum(needed) + 2
        pool = make_pool(rng, num_layers, num_pages, page_rows, hkv * hd, dtype)
        bt = make_tables(rng, needed, max_pages, num_pages,
                         pad="garbage" if seed % 2 else "minus_one")
        q = jnp.asarray(rng.standard_normal((tokens, hq, hd), dtype=np.float32), dtype)
        kw = dict(page_rows=page_rows, num_pages=num_pages, scale=hd ** -0.5)
        kvs = jnp.asarray(kvs)
        out = attention.paged_attention_prefill(q, pool, layer, bt, q_starts, kvs, **kw, **tun)
        ref = reference.paged_attention_prefill(q, pool, layer, bt, q_starts, kvs, **kw)
        assert_close(out, ref, dtype)
        qs = np.asarray(q_starts)
        out = np.asarray(out, np.float32)
        assert np.all(out[: qs[0]] == 0) and np.all(out[qs[-1]:] == 0)  # padding rows


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("decode_single_rows", [True, False])
def test_mixed_step_matches_reference(hq, hkv, decode_single_rows):
    """A mixed step as the engine builds it: mostly one-row sequences (running decodes, one at length 1),
    an empty sequence, two prefill chunks over earlier pages, padding rows after: one-row sequences through
    the decode kernel (the default) or all through the prefill kernel, both equal to the reference."""
    hd, page_rows, max_pages, tokens = 16, 4, 10, 48
    for seed in SEEDS:
        rng = np.random.default_rng(300 + seed)
        sizes = np.array([1] * 9 + [0, 7, 1, 13, 1], np.int32)
        rng.shuffle(sizes)
        kvs = np.array([int(rng.integers(max(n, 1), max_pages * page_rows + 1)) for n in sizes], np.int32)
        kvs[np.flatnonzero(sizes == 1)[0]] = 1
        q_starts = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)]), jnp.int32)
        pool, bt, q, kw = paged_inputs(rng, kvs, page_rows, max_pages, hq, hkv, hd, tokens, layers=2)
        out = attention.paged_attention_prefill(q, pool, 1, bt, q_starts, jnp.asarray(kvs), **kw, block_q=16,
                                                block_kv=16, decode_single_rows=decode_single_rows)
        ref = reference.paged_attention_prefill(q, pool, 1, bt, q_starts, jnp.asarray(kvs), **kw)
        assert_close(out, ref, jnp.float32)
        assert np.all(np.asarray(out)[int(q_starts[-1]):] == 0)


def test_prefill_chunked_equals_whole():
    """A prompt prefilled in three chunks (later ones over earlier pages) equals one pass,
    and its last row equals decode at that position."""
    rng = np.random.default_rng(11)
    hq, hkv, hd, page_rows, n = 8, 2, 16, 4, 23
    needed = [cdiv(n, page_rows)]
    num_pages = needed[0] + 2
    pool = make_pool(rng, 2, num_pages, page_rows, hkv * hd, jnp.float32)
    bt = make_tables(rng, needed, 8, num_pages)
    q = jnp.asarray(rng.standard_normal((n, hq, hd), dtype=np.float32))
    kw = dict(page_rows=page_rows, num_pages=num_pages, scale=hd ** -0.5, block_q=16, block_kv=16)
    whole = attention.paged_attention_prefill(
        q, pool, 1, bt, jnp.array([0, n], jnp.int32), jnp.array([n], jnp.int32), **kw)
    parts, start = [], 0
    for end in (9, 10, n):  # chunks of 9, 1 and 13 tokens
        qc = jnp.zeros((16, hq, hd), jnp.float32).at[: end - start].set(q[start:end])
        out = attention.paged_attention_prefill(
            qc, pool, 1, bt, jnp.array([0, end - start], jnp.int32),
            jnp.array([end], jnp.int32), **kw)
        parts.append(out[: end - start])
        start = end
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-5, atol=1e-5)
    dec = attention.paged_attention_decode(q[-1:], pool, 1, bt, jnp.array([n], jnp.int32),
                                           page_rows=page_rows, num_pages=num_pages, scale=hd ** -0.5,
                                           block_kv=16)
    np.testing.assert_allclose(dec[0], whole[-1], rtol=1e-5, atol=1e-5)


def test_xla_backend_is_the_reference():
    rng = np.random.default_rng(5)
    pool = make_pool(rng, 2, 6, 4, 32, jnp.float32)
    bt = make_tables(rng, [2, 3], 3, 6)
    q = jnp.asarray(rng.standard_normal((2, 4, 16), dtype=np.float32))
    n = jnp.array([5, 12], jnp.int32)
    kw = dict(page_rows=4, num_pages=6, scale=0.25)
    ks = pallas_kernels.kernel_set("xla")
    np.testing.assert_array_equal(
        ks.attention_decode(q, pool, 1, bt, n, **kw),
        reference.paged_attention_decode(q, pool, 1, bt, n, **kw))
    qs = jnp.array([0, 1, 2], jnp.int32)
    np.testing.assert_array_equal(
        ks.attention_prefill(q[:, :, :], pool, 1, bt, qs, n, **kw),
        reference.paged_attention_prefill(q, pool, 1, bt, qs, n, **kw))


# --------------------------------------------------------------------------- wrapper errors
def _decode_args(hq=4, hd=16, width=32, rows=48, batch=2, pages=3):
    return (jnp.zeros((batch, hq, hd)), jnp.zeros((2, rows, width)), 0,
            jnp.zeros((batch, pages), jnp.int32), jnp.zeros((batch,), jnp.int32))


@pytest.mark.parametrize("change,message", [
    (dict(q=jnp.zeros((2, 4))), "q must be 3-D"),
    (dict(pool=jnp.zeros((48, 32))), "pool must be 3-D"),
    (dict(bt=jnp.zeros((3, 3), jnp.int32)), "block_tables has 3 rows but q has batch 2"),
    (dict(bt=jnp.zeros((2, 3))), "block_tables must be integer"),
    (dict(lengths=jnp.zeros((3,), jnp.int32)), r"lengths must have shape \(2,\)"),
    (dict(pool=jnp.zeros((2, 48, 24))), "W=24 must be a multiple of head_dim=16"),
    (dict(q=jnp.zeros((2, 3, 16))), "Hq=3 query heads must be a multiple of the 2 kv heads"),
    (dict(pool=jnp.zeros((2, 44, 32))), "S=44 must be a multiple of 2 \\* page_rows = 8"),
    (dict(layer=jnp.zeros((2,), jnp.int32)), "layer must be a scalar"),
    (dict(q=jnp.zeros((2, 4, 12)), pool=jnp.zeros((2, 48, 24))),
     "head_dim a power of two >= 16, got 12"),
    (dict(tun=dict(block_kv=48)), "block_kv must be a power of two >= 16"),
    (dict(tun=dict(num_splits=0)), "num_splits must be None or an int >= 1"),
    (dict(tun=dict(num_pages=5)), r"pool rows S=48 must be 2 \* num_pages \* page_rows = 2 \* 5 \* 4 = 40"),
    (dict(tun=dict(page_rows=0)), "page_rows must be a positive int"),
])
def test_decode_errors(change, message):
    q, pool, layer, bt, lengths = _decode_args()
    q = change.get("q", q)
    pool = change.get("pool", pool)
    layer = change.get("layer", layer)
    bt = change.get("bt", bt)
    lengths = change.get("lengths", lengths)
    kw = dict(page_rows=4, num_pages=6, scale=0.25)
    kw.update(change.get("tun", {}))
    with pytest.raises(ValueError, match=message):
        attention.paged_attention_decode(q, pool, layer, bt, lengths, **kw)


@pytest.mark.parametrize("change,message", [
    (dict(q_starts=jnp.zeros((2,), jnp.int32)),
     r"q_starts must have shape \(3,\) \(block_tables has 2 rows\)"),
    (dict(kv_lens=jnp.zeros((3,), jnp.int32)), r"kv_lens must have shape \(2,\)"),
    (dict(tun=dict(block_q=24)), "block_q must be a power of two"),
    (dict(q=jnp.zeros((5, 4, 8)), pool=jnp.zeros((2, 48, 16))),
     "head_dim a power of two >= 16, got 8"),
])
def test_prefill_errors(change, message):
    q = change.get("q", jnp.zeros((5, 4, 16)))
    pool = change.get("pool", jnp.zeros((2, 48, 32)))
    bt = jnp.zeros((2, 3), jnp.int32)
    q_starts = change.get("q_starts", jnp.array([0, 2, 5], jnp.int32))
    kv_lens = change.get("kv_lens", jnp.array([2, 3], jnp.int32))
    kw = dict(page_rows=4, num_pages=6, scale=0.25)
    kw.update(change.get("tun", {}))
    with pytest.raises(ValueError, match=message):
        attention.paged_attention_prefill(q, pool, 0, bt, q_starts, kv_lens, **kw)


def test_lowers_for_a_gpu_target():
    """The compiled (non-interpret) kernels pass Pallas' Triton lowering for a CUDA target (on CPU: the
    lowering to Triton IR only; Triton's own compiler runs on the GPU)."""
    sds, i32, bf16 = jax.ShapeDtypeStruct, jnp.int32, jnp.bfloat16
    hq, hkv, hd, page_rows, num_pages = 8, 2, 64, 16, 12
    pool = sds((2, 2 * num_pages * page_rows, hkv * hd), bf16)
    kw = dict(page_rows=page_rows, num_pages=num_pages, scale=hd ** -0.5, interpret=False)
    dec = jax.jit(lambda q, pool, layer, bt, n: attention.paged_attention_decode(q, pool, layer, bt, n, **kw))
    txt = dec.trace(sds((4, hq, hd), bf16), pool, sds((), i32), sds((4, 3), i32), sds((4,), i32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in txt.lower()
    pre = jax.jit(lambda q, pool, layer, bt, qs, kv: attention.paged_attention_prefill(
        q, pool, layer, bt, qs, kv, **kw))
    txt = pre.trace(sds((40, hq, hd), bf16), pool, sds((), i32), sds((4, 3), i32), sds((5,), i32),
                    sds((4,), i32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in txt.lower()
