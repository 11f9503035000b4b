"""The one-step-behind host loop (EngineConfig.async_steps): same tokens as the synchronous loop and the
dense reference, stops and aborts that land on a token already in flight, no page leaks, and proof that
step N+1 is dispatched before step N's tokens are read."""
from __future__ import annotations

import numpy as np
import pytest

from slora_jax import SamplingParams
from tests import dense_reference as ref
from tests.test_engine import add_adapters, make_llm, workload

N_REF = 10  # reference tokens per prompt
MAX_MODEL_LEN = 96


def mixed_sampling(i: int, toks: list, eos: int) -> tuple[SamplingParams, list]:
    """Request i's sampling and the greedy tokens it must return, from its reference tokens `toks`."""
    kind = i % 5
    if kind == 0:  # max_tokens anywhere from 1 to N_REF
        m = 1 + i % N_REF
        return SamplingParams(max_tokens=m, ignore_eos=True), toks[:m]
    if kind == 1:  # a stop token id that occurs early
        t = toks[i % 4]
        return SamplingParams(max_tokens=N_REF, stop_token_ids=(t,), ignore_eos=True), toks[: toks.index(t) + 1]
    if kind == 2:  # eos (stops only if the eos id comes up)
        cut = toks.index(eos) + 1 if eos in toks else N_REF
        return SamplingParams(max_tokens=N_REF), toks[:cut]
    if kind == 3:  # a stop string: checked against the synchronous loop, not the reference
        text = bytes(t for t in toks if t < 256).decode("utf-8", errors="replace")
        return SamplingParams(max_tokens=N_REF, stop=[text[2:4] or "x"], ignore_eos=True), None
    return SamplingParams(max_tokens=N_REF, ignore_eos=True), toks


@pytest.fixture(scope="module")
def mixed():
    """40 prompts over 12 adapters (one hits max_model_len), their reference tokens and per-request sampling."""
    llm = make_llm()
    weights = add_adapters(llm, 12)
    params = ref.params_of(llm)
    prompts, adapters = workload(40, 12, seed=3)
    prompts[7] = [256] + list(range(1, MAX_MODEL_LEN - 4))  # 92 tokens: max_model_len leaves room for 4
    toks = [ref.greedy(llm.model_cfg, params, p, N_REF, weights[a] if a else None) for p, a in zip(prompts, adapters)]
    eos = toks[2][2]
    cases = [mixed_sampling(i, t, eos) for i, t in enumerate(toks)]
    cases[7] = (SamplingParams(max_tokens=N_REF, ignore_eos=True), toks[7][: MAX_MODEL_LEN - len(prompts[7])])
    return prompts, adapters, cases, eos


def run(prompts, adapters, cases, eos, async_steps: bool, **kw):
    llm = make_llm(async_steps=async_steps, **kw)
    add_adapters(llm, 12)
    eng = llm.engine
    eng.tokenizer.eos_ids = (eos,)
    reqs = [eng.add_request(p, a, sp) for p, a, (sp, _) in zip(prompts, adapters, cases)]
    eng.run_until_done(reqs)
    st = llm.stats()
    assert st["pages_kv"] == 0 and eng._inflight is None, st
    assert all(r.pending == 0 and r.finished for r in reqs)
    # tokens dropped after a stop were never counted
    assert st["tokens_generated"] == sum(len(r.output_ids) for r in reqs)
    eng.pages.check_invariants()
    return [r.output() for r in reqs], st


@pytest.mark.parametrize("pool", ["roomy", "tiny"])
def test_async_equals_sync_equals_reference(mixed, pool):
    prompts, adapters, cases, eos = mixed
    # tiny: 100 pages of 4 tokens, rank-16 adapters take up to 76: swaps and waiting requests
    kw = dict(num_pages=256) if pool == "roomy" else dict(num_pages=100, max_batch_tokens=32)
    outs_sync, _ = run(prompts, adapters, cases, eos, False, **kw)
    outs_async, st = run(prompts, adapters, cases, eos, True, **kw)
    for i, ((_, expected), a, s) in enumerate(zip(cases, outs_async, outs_sync)):
        assert (a.token_ids, a.text, a.finish_reason) == (s.token_ids, s.text, s.finish_reason), i
        if expected is not None:
            assert a.token_ids == expected, i
    reasons = [o.finish_reason for o in outs_async]
    assert reasons.count("stop") >= 10 and reasons.count("length") >= 10, reasons
    assert any(o.finish_reason == "stop" and i % 5 == 3 for i, o in enumerate(outs_async)), "no stop string hit"
    assert st["steps_overlapped"] > 0
    if pool == "tiny":
        assert st["swaps_out"] > 0, st


def test_seeded_sampling_identical_across_modes_with_preemptions():
    prompts, adapters = workload(40, 12, seed=3)
    sps = [SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=40 * (i % 2), seed=100 + i,
                          ignore_eos=True) for i in range(len(prompts))]
    outs = {}
    for mode in (False, True):
        # 100 pages of 4 tokens: decodes run out of pages and the newest requests are preempted
        llm = make_llm(num_pages=100, max_batch_tokens=64, async_steps=mode)
        add_adapters(llm, 12)
        sched, preempted = llm.engine.scheduler, []
        real = sched.preempt
        sched.preempt = lambda r: (preempted.append(r.pending), real(r))
        reqs = [llm.engine.add_request(p, a, sp) for p, a, sp in zip(prompts, adapters, sps)]
        llm.engine.run_until_done(reqs)
        outs[mode] = [r.output_ids for r in reqs]
        assert llm.stats()["pages_kv"] == 0 and preempted
        # async: preempted with its newest token still on the device; the token is kept when read
        assert any(preempted) == mode, preempted
    assert outs[True] == outs[False]
    assert all(len(o) == 10 for o in outs[True])


class _Probe:
    """A step's sampled tokens that log when the host reads them."""

    is_fully_addressable = True  # what parallel.to_host asks of a step's tokens

    def __init__(self, arr, k: int, log: list):
        self.arr, self.k, self.log = arr, k, log

    def __array__(self, dtype=None, copy=None):
        self.log.append(("read", self.k))
        return np.asarray(self.arr, dtype)


def _probe_runner(eng, log: list, fed: list):
    real = eng.runner.step

    def step(pool, inp, samp, prev=None):
        fed.append(int((inp.feed >= 0).sum()))
        toks, pool = real(pool, inp, samp, prev.arr if isinstance(prev, _Probe) else prev)
        k = sum(1 for e in log if e[0] == "dispatch")
        log.append(("dispatch", k))
        return _Probe(toks, k, log), pool

    eng.runner.step = step


def test_next_step_dispatched_before_tokens_are_read():
    prompts, adapters = workload(6, 3, seed=4)
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    steps, tokens = {}, {}
    for async_steps in (False, True):
        llm = make_llm(async_steps=async_steps)
        add_adapters(llm, 3)
        log, fed = [], []
        _probe_runner(llm.engine, log, fed)
        tokens[async_steps] = [o.token_ids for o in llm.generate(prompts, adapter=adapters, sampling=sp)]
        n = steps[async_steps] = sum(1 for e in log if e[0] == "dispatch")
        if async_steps:  # d0 d1 r0 d2 r1 ... : the device has the next step queued whenever the host reads
            assert log == [("dispatch", 0)] + [e for k in range(1, n) for e in (("dispatch", k), ("read", k - 1))] \
                + [("read", n - 1)]
            assert sum(fed) > 0  # decodes took their input token from the previous step, on the device
        else:
            assert log == [e for k in range(n) for e in (("dispatch", k), ("read", k))]
            assert sum(fed) == 0
        assert llm.stats()["pages_kv"] == 0
    assert tokens[True] == tokens[False] and all(len(t) == 6 for t in tokens[True])
    assert steps[True] == steps[False] >= 6  # stops by length are foreseen: no step is wasted on them


def test_abort_while_in_flight_drops_its_tokens():
    llm = make_llm()
    eng = llm.engine
    sp = SamplingParams(max_tokens=20, ignore_eos=True)
    reqs = [eng.add_request([256, 1 + i, 2, 3], None, sp) for i in range(4)]
    for _ in range(4):
        eng.step()
    victim = reqs[1]
    assert victim.pending == 1 and eng._inflight is not None  # its newest token is still on the device
    seen = len(victim.output_ids)
    eng.abort(victim.id)
    assert not eng.pages.has_seq(victim.id_int)
    eng.run_until_done(reqs)
    assert victim.finish_reason == "abort" and len(victim.output_ids) == seen
    assert [len(r.output_ids) for r in reqs if r is not victim] == [20, 20, 20]
    st = llm.stats()
    assert st["pages_kv"] == 0 and st["tokens_generated"] == 60 + seen


def test_logits_and_warmup_while_a_step_is_in_flight():
    llm = make_llm()
    add_adapters(llm, 2)
    eng = llm.engine
    want = llm.logits([256, 5, 6, 7], "ad0")
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    alone = llm.generate([[256, 1, 2]], adapter="ad1", sampling=sp)[0].token_ids
    req = eng.add_request([256, 1, 2], "ad1", sp)
    eng.step()
    eng.step()
    assert eng._inflight is not None and req.pending == 1
    np.testing.assert_allclose(llm.logits([256, 5, 6, 7], "ad0"), want, rtol=1e-5, atol=1e-5)
    eng.warmup()  # all-padding steps between two real ones: they neither read nor clobber the tokens in flight
    eng.run_until_done([req])
    assert req.output_ids == alone and llm.stats()["pages_kv"] == 0
