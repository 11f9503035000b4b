"""Prefix caching in the unified pool: same tokens with the cache on and off, blocks keyed by adapter weights
(never names), cached blocks evicted before anything waits, no page leaks."""
from __future__ import annotations

import numpy as np
import pytest

from slora_jax import SamplingParams
from slora_jax.engine.request import Status
from tests import dense_reference as ref
from tests.test_engine import make_llm

PR = 4  # make_llm's page_rows


def lora(llm, seed, rank=4):
    return ref.random_lora(llm.model_cfg, np.random.default_rng(seed), rank, ("q_proj", "v_proj", "down_proj"),
                           std=0.08)


def with_adapters(n=3, **kw):
    llm = make_llm(**kw)
    weights = {}
    for i in range(n):
        params = lora(llm, 100 + i)
        llm.add_adapter(f"ad{i}", params, alpha=8.0)
        weights[f"ad{i}"] = params
    return llm, weights


def check_idle(llm):
    """Nothing running: every page is free, cached or an adapter's; the books agree."""
    st = llm.stats()
    assert st["pages_kv"] == 0 and st["requests_running"] == 0, st
    assert st["pages_free"] + st["pages_cached"] + st["pages_adapter"] == st["pages_total"], st
    assert st["pages_cached"] == st["prefix_blocks"], st
    llm.engine.pages.check_invariants()
    llm.engine.cache.check_invariants()
    return st


def chat_prompts(seed=0):
    """Prompts sharing long prefixes: 24 tokens (a multiple of page_rows) and 26 (not), suffixes of 0-7 tokens
    (so some prompts are wholly cached, some end exactly at a page boundary), one prompt a prefix of another."""
    rng = np.random.default_rng(seed)
    a = [256] + rng.integers(0, 256, 23).tolist()
    b = [256] + rng.integers(0, 256, 25).tolist()
    prompts, adapters = [], []
    for i in range(16):
        base = a if i % 2 == 0 else b
        prompts.append(base + rng.integers(0, 256, i % 8).tolist())
        adapters.append([None, "ad0", "ad1", "ad2"][i % 4])
    prompts += [a[:8], a[:8], b, b[:13]]  # whole prompts repeated; one ends on a page boundary
    adapters += [None, None, "ad1", "ad1"]
    return prompts, adapters


SP = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def cache_off_tokens():
    llm, _ = with_adapters(prefix_cache=False)
    prompts, adapters = chat_prompts()
    toks = [o.token_ids for o in llm.generate(prompts, adapter=adapters, sampling=SP)]
    turn2 = [p + t + [7, 8, 9] for p, t in zip(prompts[:6], toks[:6])]  # the next turn of a conversation
    toks2 = [o.token_ids for o in llm.generate(turn2, adapter=adapters[:6], sampling=SP)]
    st = llm.stats()
    assert (st["prefix_query_tokens"], st["prefix_hit_tokens"], st["prefix_blocks"], st["pages_cached"]) == (0,) * 4
    return prompts, adapters, toks, turn2, toks2


@pytest.mark.parametrize("async_steps", [True, False])
def test_greedy_tokens_equal_with_cache_on_and_off(cache_off_tokens, async_steps):
    prompts, adapters, expected, turn2, expected2 = cache_off_tokens
    llm, weights = with_adapters(async_steps=async_steps)
    for wave in range(2):  # the second wave finds every prompt's full pages cached
        outs = llm.generate(prompts, adapter=adapters, sampling=SP)
        assert [o.token_ids for o in outs] == expected, f"wave {wave}"
        st = check_idle(llm)
        assert st["prefix_hit_tokens"] > 0
    assert [o.token_ids for o in llm.generate(turn2, adapter=adapters[:6], sampling=SP)] == expected2
    hits = llm.stats()["prefix_hit_tokens"] - st["prefix_hit_tokens"]
    # each next turn reuses at least its whole first turn but the last token, generated tokens included
    assert hits >= sum((len(p) + 5) // PR * PR for p in prompts[:6])
    check_idle(llm)
    if async_steps:
        params = ref.params_of(llm)
        for i in (1, 3, 18):
            lw = weights[adapters[i]] if adapters[i] else None
            mods = None if lw is None else _modules(llm, lw)
            assert ref.greedy(llm.model_cfg, params, prompts[i], 6, mods) == expected[i]


def _modules(llm, params):
    from slora_jax.adapters.lora import from_pytree

    return from_pytree("x", params, llm.model_cfg, 8.0).modules


def test_blocks_are_keyed_by_adapter_weights_never_shared_across_adapters():
    llm, weights = with_adapters(2)
    p = [256] + list(range(1, 22))  # 22 tokens: 5 full pages can be reused (never the token sampling comes from)
    sp = SamplingParams(max_tokens=4, ignore_eos=True)

    def run(adapter, prompt=p):
        before = llm.stats()
        toks = llm.generate([prompt], adapter=adapter, sampling=sp)[0].token_ids
        st = llm.stats()
        return toks, st["prefix_hit_tokens"] - before["prefix_hit_tokens"], \
            st["prefix_query_tokens"] - before["prefix_query_tokens"]

    t0, hit, query = run("ad0")
    assert (hit, query) == (0, 22)
    assert run("ad1")[1:] == (0, 22)  # the same prompt on another adapter: nothing shared
    assert run(None)[1:] == (0, 22)  # nor with the base model
    # 22 prompt + 3 computed generated tokens: 6 full pages per identity, three identities
    assert llm.stats()["prefix_blocks"] == 18
    assert run("ad0") == (t0, 20, 22)
    llm.add_adapter("twin", weights["ad0"], alpha=8.0)  # ad0's weights under another name: its KV is the same
    assert run("twin") == (t0, 20, 22)
    assert run(None, p[:20])[1:] == (16, 20)  # 5 full pages, but the last one is recomputed (privately)
    assert llm.stats()["prefix_blocks"] == 18
    check_idle(llm)


def test_reregistered_name_never_reuses_old_blocks():
    p = [256] + list(range(40, 70))
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    llm = make_llm()
    w1, w2 = lora(llm, 1), lora(llm, 2)
    llm.add_adapter("x", w1, alpha=8.0)
    old = llm.generate([p], adapter="x", sampling=sp)[0].token_ids
    llm.remove_adapter("x")
    llm.add_adapter("x", w2, alpha=8.0)
    hits = llm.stats()["prefix_hit_tokens"]
    new = llm.generate([p], adapter="x", sampling=sp)[0].token_ids
    assert llm.stats()["prefix_hit_tokens"] == hits
    fresh = make_llm()
    fresh.add_adapter("x", w2, alpha=8.0)
    assert new == fresh.generate([p], adapter="x", sampling=sp)[0].token_ids
    assert new != old  # the test can tell the two weights apart
    llm.add_adapter("x", w1, alpha=8.0, replace=True)  # the first weights again: their blocks are valid again
    req = llm.engine.add_request(p, "x", sp)
    llm.engine.run_until_done([req])
    assert req.output_ids == old
    assert llm.stats()["prefix_hit_tokens"] == hits + 28 == hits + req.cached_tokens  # the request knows its hit
    check_idle(llm)


def test_small_pool_evicts_cached_blocks_before_anything_waits(cache_off_tokens):
    prompts, adapters, expected, _, _ = cache_off_tokens
    # 40 pages of 4 tokens: one full-length sequence takes 24, each adapter 8: blocks, adapters and KV compete
    llm, _ = with_adapters(num_pages=40)
    outs = llm.generate(prompts, adapter=adapters, sampling=SP)
    assert [o.token_ids for o in outs] == expected
    st = check_idle(llm)
    assert st["pages_cached"] > 0
    eng = llm.engine
    need = st["pages_free"] + st["pages_cached"] // 2 + 1  # more than free, less than free + cached
    req = eng.add_request(list(range(1, need * PR - 1)), None, SamplingParams(max_tokens=2, ignore_eos=True))
    eng.step()
    assert req.status is Status.RUNNING and not eng.scheduler.waiting
    assert llm.stats()["pages_cached"] < st["pages_cached"]
    eng.run_until_done([req])
    assert len(req.output_ids) == 2
    check_idle(llm)
    # the whole workload again, twice at once, through the small pool: the same tokens, no leak
    outs = llm.generate(prompts * 2, adapter=adapters * 2, sampling=SP)
    assert [o.token_ids for o in outs] == expected * 2
    st = check_idle(llm)
    assert st["prefix_hit_tokens"] > 0


def test_one_engine_runs_with_the_cache_on_and_off_each_from_an_empty_pool_cache(cache_off_tokens):
    """What the chat benchmark does between its runs (bench/run.py): the same tokens either way; hits only with the
    cache on; after clear_cache no adapter is resident and nothing is cached."""
    prompts, adapters, expected, _, _ = cache_off_tokens
    llm, _ = with_adapters()
    for on in (True, False, True):
        llm.set_prefix_cache(on)
        llm.clear_cache()
        before = check_idle(llm)
        assert before["pages_cached"] == before["adapters_resident"] == before["pages_adapter"] == 0
        outs = llm.generate(prompts, adapter=adapters, sampling=SP)
        assert [o.token_ids for o in outs] == expected, f"prefix cache {on}"
        st = check_idle(llm)
        assert (st["prefix_hit_tokens"] > before["prefix_hit_tokens"]) == on and (st["pages_cached"] > 0) == on
        assert llm.engine_cfg.prefix_cache == on
    req = llm.engine.add_request(prompts[1], adapters[1], SP)
    for change in (llm.clear_cache, lambda: llm.set_prefix_cache(False)):  # only while idle
        with pytest.raises(RuntimeError, match="queued or running"):
            change()
    llm.engine.run_until_done([req])
    assert req.output_ids == expected[1] and llm.engine_cfg.prefix_cache
    check_idle(llm)
