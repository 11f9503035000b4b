"""The unified pool is updated in place: no step, swap-in or warm-up ever holds a second copy of it."""
from __future__ import annotations

import jax
import numpy as np

from slora_jax import LLM, SamplingParams
from slora_jax.memory import layout
from tests import dense_reference as ref


def make(num_pages=4096):
    return LLM("tiny", dtype="float32", kernels="xla", num_pages=num_pages, page_rows=16, max_rank=16)


def test_step_updates_pool_in_place():
    llm = make()
    eng = llm.engine
    pool_bytes = eng.pool.nbytes
    for decode, lora in ((True, False), (False, True)):
        inp, samp = eng.builder.dummy(decode, 16, lora)
        stats = eng.runner._step.lower(eng.runner.params, eng.pool.array, inp, samp,
                                       eng.runner.no_tokens).compile().memory_analysis()
        # the pool comes back in the buffer it came in; the step's scratch is a small fraction of it
        assert stats.alias_size_in_bytes >= pool_bytes
        assert stats.temp_size_in_bytes < 0.5 * pool_bytes  # a copy of the pool would be >= 1x
    before = eng.pool.array
    llm.generate(["hello"], sampling=SamplingParams(max_tokens=3))
    assert before.is_deleted(), "the step must consume (donate) the pool it was given"


def test_swap_in_scatters_in_place_and_lands_in_the_right_rows():
    llm = make()
    eng = llm.engine
    rng = np.random.default_rng(0)
    llm.add_adapter("a", ref.random_lora(llm.model_cfg, rng, 8, ("q_proj", "down_proj")), alpha=8.0)
    before = eng.pool.array
    eng.cache.acquire("a")
    assert before.is_deleted()
    rows = eng.layout.adapter_pool_rows(eng.cache.adapter_pages("a"), eng.store.get("a").n_rows)
    packed = np.asarray(eng.store.get("a").buffer)
    np.testing.assert_array_equal(np.asarray(eng.pool.array)[:, rows], packed)
    assert packed.shape[1] == layout.num_rows(llm.model_cfg, {"q_proj": 8, "down_proj": 8})
    eng.pages.check_invariants()
    eng.cache.check_invariants()


def test_pool_sized_from_pages_and_geometry():
    llm = make(num_pages=100)
    cfg = llm.model_cfg
    assert llm.engine.pool.array.shape == (cfg.num_layers, 2 * 100 * 16, cfg.num_kv_heads * cfg.head_dim)
    assert jax.tree.leaves(llm.engine.pool.array)[0].dtype == np.float32
    assert llm.stats()["pages_total"] == 100 and llm.stats()["pages_free"] == 100


def test_synthetic_adapters_distinct_or_shared():
    llm = make()
    store = llm.engine.store
    llm.add_synthetic_adapters(["d0", "d1"], 4)
    llm.add_synthetic_adapters(["s0", "s1", "s2"], 8, shared=True)
    assert store.get("s0").buffer is store.get("s2").buffer
    assert store.get("d0").buffer is not store.get("d1").buffer
    assert not np.array_equal(np.asarray(store.get("d0").buffer), np.asarray(store.get("d1").buffer))
    out = llm.generate(["a", "b", "c"], adapter=["d1", "s1", "s2"], sampling=SamplingParams(max_tokens=2))
    assert all(o.error is None for o in out) and llm.stats()["swaps_in"] == 3
