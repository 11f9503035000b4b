"""On-device sampling (slora_jax/engine/sampling.py): greedy rows are the argmax, seeded rows repeat,
top-k / top-p never leave their allowed set, temperature draws follow softmax(logits / T), and no
program sorts the vocabulary unless some row filters."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slora_jax.engine import sampling
from slora_jax.engine.batch import SamplingArrays

# chi-square critical values at p = 0.001 (a fixed-seed test then fails by chance once in 1,000 seeds)
CHI2_999 = {3: 16.27, 7: 24.32, 15: 37.70}


def arrays(n, temperature=0.0, top_p=1.0, top_k=0, seed=7, counters=None) -> SamplingArrays:
    def col(v, dtype):
        return np.broadcast_to(np.asarray(v, dtype), (n,)).copy()

    return SamplingArrays(col(temperature, np.float32), col(top_p, np.float32), col(top_k, np.int32),
                          col(seed, np.uint32), np.arange(n, dtype=np.int32) if counters is None
                          else col(counters, np.int32))


def draws(logits_row, n, **kw) -> np.ndarray:
    """n draws for one row of logits: n rows of the same logits and seed, counters 0..n-1 (i.i.d. keys)."""
    logits = jnp.asarray(np.broadcast_to(np.asarray(logits_row, np.float32), (n, len(logits_row))))
    return np.asarray(sampling.sample_all(logits, arrays(n, **kw)))


def test_greedy_rows_are_the_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(9, 1000)).astype(np.float32)
    s = arrays(9)
    assert sampling.plan(s) is None  # nothing beyond the step's own argmax
    np.testing.assert_array_equal(np.asarray(sampling.sample_all(jnp.asarray(logits), s)), logits.argmax(-1))
    # temperature 0 stays greedy in a batch whose other rows sample (with and without filters)
    for top_p in (1.0, 0.5):
        s = arrays(9, temperature=np.r_[0.0, 1.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.5, 0.0], top_p=top_p)
        out = np.asarray(sampling.sample_all(jnp.asarray(logits), s))
        np.testing.assert_array_equal(out[::2], logits[::2].argmax(-1))


def test_plan_picks_the_cheapest_program():
    assert sampling.plan(arrays(4)) is None
    assert sampling.plan(arrays(4, temperature=0.8)) == 0
    # filters of greedy rows do not count: they never sample
    assert sampling.plan(arrays(4, temperature=0.0, top_p=0.5, top_k=3)) is None
    assert sampling.plan(arrays(4, temperature=0.8, top_p=0.9)) == sampling.TOP_P_CANDIDATES
    assert sampling.plan(arrays(4, temperature=0.8, top_k=40)) == sampling.TOP_P_CANDIDATES
    assert sampling.plan(arrays(4, temperature=0.8, top_k=np.r_[0, 1000, 5, 0])) == 1024


def test_seeded_rows_repeat_whatever_the_batch():
    rng = np.random.default_rng(1)
    row = rng.normal(size=600).astype(np.float32) * 3
    one = dict(temperature=0.9, top_p=0.8, top_k=50, seed=1234, counters=5)
    alone = draws(row, 1, **one)[0]
    assert draws(row, 1, **one)[0] == alone
    # the same row in a batch whose other rows ask for other things, a larger K among them
    logits = np.stack([rng.normal(size=600).astype(np.float32), row, row, row])
    s = arrays(4, temperature=np.r_[1.0, 0.9, 0.9, 0.9], top_p=np.r_[1.0, 0.8, 0.8, 0.8],
               top_k=np.r_[700, 50, 50, 50], seed=np.r_[9, 1234, 1234, 1234], counters=np.r_[0, 5, 5, 5])
    assert sampling.plan(s) == 1024
    out = np.asarray(sampling.sample_all(jnp.asarray(logits), s))
    assert list(out[1:]) == [alone] * 3
    # temperature only: the same token from the temperature program as from the filter program
    hot = dict(temperature=1.3, seed=77)
    plain = draws(row, 64, **hot)
    s = arrays(65, temperature=1.3, seed=77, counters=np.r_[np.arange(64), 0], top_k=np.r_[[0] * 64, 5])
    mixed = np.asarray(sampling.sample_all(jnp.asarray(np.broadcast_to(row, (65, 600))), s))
    np.testing.assert_array_equal(mixed[:64], plain)
    # another seed draws other tokens
    assert not np.array_equal(draws(row, 64, temperature=1.3, seed=78), plain)


def _allowed(logits_row, temperature, top_k, top_p):
    """The reference allowed set: top-k, then the top-p nucleus renormalised over it."""
    x = np.asarray(logits_row, np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    k = top_k if top_k > 0 else min(sampling.TOP_P_CANDIDATES, len(x))
    cand = order[:k]
    p = np.exp(x[cand] - x[cand].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    keep = before < top_p
    return cand[keep], p[keep] / p[keep].sum()


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (12, 0.7), (1, 1.0)])
def test_filters_never_sample_outside_the_allowed_set(top_k, top_p):
    rng = np.random.default_rng(2)
    row = (rng.normal(size=64) * 2).astype(np.float32)
    allowed, probs = _allowed(row, 0.8, top_k, top_p)
    got = draws(row, 4000, temperature=0.8, top_k=top_k, top_p=top_p, seed=11)
    assert set(got.tolist()) <= set(allowed.tolist())
    # and within the set, the renormalised probabilities (chi-square over the set, its rarest tokens merged)
    if len(allowed) > 1:
        counts = np.array([(got == t).sum() for t in allowed])
        _chi_square_ok(counts, probs)


def test_top_p_without_top_k_cuts_within_the_candidates():
    # a flat distribution over 1,000 tokens: the 0.99 nucleus is wider than the candidates, so it is cut to them
    rng = np.random.default_rng(3)
    row = (rng.normal(size=1000) * 0.01).astype(np.float32)
    got = draws(row, 2000, temperature=1.0, top_p=0.99, seed=5)
    top = set(np.argsort(-row, kind="stable")[: sampling.TOP_P_CANDIDATES].tolist())
    assert set(got.tolist()) <= top
    assert len(set(got.tolist())) > 0.8 * sampling.TOP_P_CANDIDATES  # and spread over them


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_draws_follow_the_softmax(temperature):
    row = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3, 1.5], np.float32)
    n = 6000
    got = draws(row, n, temperature=temperature, seed=21)
    p = np.exp(row / temperature - (row / temperature).max())
    p /= p.sum()
    _chi_square_ok(np.bincount(got, minlength=len(row)), p)


def _chi_square_ok(counts, probs):
    """Pearson's chi-square of `counts` against `probs`, bins with an expected count under 5 merged."""
    n = counts.sum()
    order = np.argsort(-probs)
    counts, expected = counts[order].astype(float), probs[order] * n
    keep = expected >= 5
    if (~keep).any():
        counts = np.r_[counts[keep], counts[~keep].sum()]
        expected = np.r_[expected[keep], expected[~keep].sum()]
    df = len(counts) - 1
    if df < 1:
        return
    stat = float(((counts - expected) ** 2 / expected).sum())
    crit = CHI2_999.get(df, df + 3.3 * np.sqrt(2 * df))  # else ~ the 0.999 quantile (normal approximation)
    assert stat < crit, (stat, crit, counts, expected)


def test_no_program_sorts_the_vocabulary_unless_a_row_filters():
    logits = jax.ShapeDtypeStruct((8, 4096), jnp.float32)
    tokens = jax.ShapeDtypeStruct((8,), jnp.int32)
    s = arrays(8, temperature=1.0)
    plain = jax.jit(sampling.sample, static_argnames="k").lower(logits, s, tokens, k=0).as_text()
    greedy = jax.jit(sampling.greedy).lower(logits).as_text()
    for text in (plain, greedy):
        assert "stablehlo.sort" not in text and "top_k" not in text
    filtered = jax.jit(sampling.sample, static_argnames="k").lower(logits, s, tokens, k=256).as_text()
    assert "top_k" in filtered and "stablehlo.sort" not in filtered


# -- masks (structured output) and log-probabilities ----------------------------------------------------------------
def pack(allowed: np.ndarray) -> np.ndarray:
    """[B, V] bool -> llguidance's [B, ceil(V / 32)] int32 bitmask."""
    b, v = allowed.shape
    bits = np.zeros((b, (v + 31) // 32 * 32), bool)
    bits[:, :v] = allowed
    return np.packbits(bits, axis=-1, bitorder="little").view(np.int32)


def test_masked_rows_sample_only_allowed_tokens_and_the_others_are_untouched():
    rng = np.random.default_rng(4)
    b, v = 8, 300
    logits = jnp.asarray(rng.normal(size=(b, v)).astype(np.float32) * 3)
    allowed = np.ones((b, v), bool)
    for r in (1, 2, 5, 6):  # constrained rows: a few random tokens allowed each
        allowed[r] = False
        allowed[r, rng.choice(v, 5, replace=False)] = True
    mask = jnp.asarray(pack(allowed))
    assert (np.asarray(sampling.unpack_mask(mask, v)) == allowed).all()
    for kw in (dict(), dict(temperature=np.r_[0, 1.0, 0, 1.0, 1.0, 0.7, 0.7, 0][:b]),
               dict(temperature=1.0, top_k=3), dict(temperature=0.9, top_p=0.5)):
        s = arrays(b, **kw)
        plain = np.asarray(sampling.sample_all(logits, s))
        masked = np.asarray(sampling.sample_all(logits, s, mask))
        assert all(allowed[r, t] for r, t in enumerate(masked)), (kw, masked)
        free = [0, 3, 4, 7]
        np.testing.assert_array_equal(masked[free], plain[free])  # unconstrained rows: bit for bit the same
        if not kw:  # greedy constrained rows take the most likely allowed token
            want = np.where(allowed, np.asarray(logits), -np.inf).argmax(-1)
            np.testing.assert_array_equal(masked, want)


def test_logprobs_are_the_raw_log_softmax_and_its_top_tokens():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, 100)).astype(np.float32) * 2
    tokens = np.array([3, 50, 99, 0], np.int32)
    chosen, top, ids = (np.asarray(x) for x in sampling.logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(chosen, ref[np.arange(4), tokens], atol=1e-5)
    assert top.shape == ids.shape == (4, sampling.MAX_LOGPROBS)
    np.testing.assert_array_equal(ids, np.argsort(-ref, axis=-1, kind="stable")[:, :sampling.MAX_LOGPROBS])
    np.testing.assert_allclose(top, np.take_along_axis(ref, ids, -1), atol=1e-5)
    # a masked row: renormalised over its allowed tokens, the others -inf
    allowed = np.zeros((4, 100), bool)
    allowed[:, [3, 50, 99, 0]] = True
    chosen, top, _ = (np.asarray(x) for x in sampling.logprobs(jnp.asarray(logits), jnp.asarray(tokens),
                                                               jnp.asarray(pack(allowed))))
    sub = logits[:, [3, 50, 99, 0]]
    np.testing.assert_allclose(np.exp(chosen), np.exp(logits[np.arange(4), tokens]) / np.exp(sub).sum(-1), rtol=1e-5)
    assert np.isinf(top[:, 4:]).all() and np.isfinite(top[:, :4]).all()


def test_a_masked_or_logprobs_program_sorts_nothing_but_its_top_k():
    logits = jax.ShapeDtypeStruct((8, 4096), jnp.float32)
    tokens = jax.ShapeDtypeStruct((8,), jnp.int32)
    mask = jax.ShapeDtypeStruct((8, 128), jnp.int32)
    s = arrays(8, temperature=1.0)
    fn = jax.jit(sampling.finish, static_argnames=("k", "want_logprobs"))
    masked = fn.lower(logits, s, tokens, mask, k=None).as_text()
    assert "stablehlo.sort" not in masked and "top_k" not in masked
    lp = fn.lower(logits, s, tokens, None, k=None, want_logprobs=True).as_text()
    assert "top_k" in lp and "stablehlo.sort" not in lp
