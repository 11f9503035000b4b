"""Adapter churn through a small pool: residency bookkeeping stays exact and serving never recompiles."""
from __future__ import annotations

import numpy as np
import pytest

from slora_jax import LLM, SamplingParams
from tests import dense_reference as ref

RANKS = (4, 8, 16)


def churn_llm(n_adapters, num_pages=60, **kw):
    llm = LLM("tiny", dtype="float32", kernels="xla", num_pages=num_pages, max_model_len=256, max_rank=16,
              max_running=16, max_batch_tokens=128, **kw)
    rng = np.random.default_rng(0)
    for i in range(n_adapters):
        r = RANKS[i % len(RANKS)]
        llm.add_adapter(f"a{i}", ref.random_lora(llm.model_cfg, rng, r, ("q_proj", "v_proj", "down_proj"), std=0.05),
                        alpha=r)
    return llm


def wave(llm, rng, n_adapters, n=32, max_tokens=4):
    """n greedy requests over power-law-random adapters (a few hot, a long tail), some on the base model."""
    ids = np.minimum((n_adapters * rng.power(0.3, n)).astype(int), n_adapters - 1)
    adapters = [None if i % 8 == 0 else f"a{k}" for i, k in enumerate(ids)]
    prompts = [rng.integers(0, 256, rng.integers(4, 60)).tolist() for _ in range(n)]
    return llm.generate(prompts, adapter=adapters, sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def check_idle(llm):
    st = llm.stats()
    assert st["swaps_in"] - st["swaps_out"] == st["adapters_resident"], st
    assert st["adapters_resident"] <= st["adapter_entries"]
    assert st["pages_kv"] == 0, st
    llm.engine.pages.check_invariants()
    llm.engine.cache.check_invariants()
    return st


def test_churn_keeps_residency_exact_and_never_recompiles():
    llm = churn_llm(120)
    llm.engine.warmup()
    compiled = llm.engine.runner.cache_size()
    rng = np.random.default_rng(1)
    swaps = 0
    for _ in range(8):
        outs = wave(llm, rng, 120)
        assert all(len(o.token_ids) == 4 for o in outs)
        st = check_idle(llm)
        assert llm.engine.runner.cache_size() == compiled, "a wave compiled a new step program"
        swaps = st["swaps_in"]
    assert swaps > 120, "the pool is meant to be too small for the adapters: they must churn"


def test_table_bound_reached_waits_instead_of_growing():
    """With 3 table entries and 40 adapters, requests wait for an entry; all finish, the tables keep their size."""
    llm = churn_llm(40, num_pages=200, max_resident_adapters=3)
    rng = np.random.default_rng(2)
    outs = wave(llm, rng, 40)
    assert all(o.finish_reason == "length" for o in outs)
    st = check_idle(llm)
    assert st["adapter_entries"] == 3 and st["adapters_resident"] <= 3
    assert len(llm.engine.cache.tables.ranks) == 3


def test_small_table_gives_the_same_tokens():
    """Waiting for a table entry changes when a request runs, never what it computes."""
    small = churn_llm(12, num_pages=200, max_resident_adapters=2)
    big = churn_llm(12, num_pages=400)
    prompts = [[1 + i, 2 * i % 250, 7] for i in range(12)]
    adapters = [f"a{i}" for i in range(12)]
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    assert [o.token_ids for o in small.generate(prompts, adapter=adapters, sampling=sp)] == \
        [o.token_ids for o in big.generate(prompts, adapter=adapters, sampling=sp)]


@pytest.mark.slow
def test_soak_10k_requests_500_adapters(capsys):
    """Hours of serving compressed: 10,000 requests over 500 adapters through a small pool. Reports RSS growth
    and compiles after warm-up; both must stay flat."""
    import resource

    llm = churn_llm(500, num_pages=80)
    llm.engine.warmup()
    rng = np.random.default_rng(3)
    for _ in range(4):  # warm-up waves: allocator pools, host tables, numpy caches reach their steady size
        wave(llm, rng, 500, n=64, max_tokens=2)
    compiled = llm.engine.runner.cache_size()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    done = 0
    while done < 10_000:
        done += len(wave(llm, rng, 500, n=128, max_tokens=2))
        check_idle(llm)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    st = llm.stats()
    with capsys.disabled():
        print(f"\nsoak: {done} requests, swaps_in {st['swaps_in']}, peak RSS {rss0 / 1024:.0f} -> "
              f"{rss1 / 1024:.0f} MiB, compiles after warm-up {llm.engine.runner.cache_size() - compiled}")
    assert llm.engine.runner.cache_size() == compiled
    assert rss1 - rss0 < 200 * 1024, "peak RSS grew by more than 200 MiB over the soak"
