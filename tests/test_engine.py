"""The paged continuous-batching engine against the dense reference, under pressure, and its contracts."""
from __future__ import annotations

import numpy as np
import pytest

from slora_jax import LLM, AdapterError, RequestError, SamplingParams
from slora_jax.adapters.lora import from_pytree
from slora_jax.config import LORA_MODULES, ConfigError
from tests import dense_reference as ref

TARGET_SETS = [("q_proj", "v_proj"), LORA_MODULES, ("o_proj", "down_proj"), ("k_proj", "gate_proj", "up_proj")]


def make_llm(num_pages=256, **kw):
    opts = dict(dtype="float32", kernels="xla", max_rank=16, page_rows=4, max_model_len=96, max_running=16,
                max_batch_tokens=64)
    opts.update(kw)
    return LLM("tiny", num_pages=num_pages, **opts)


def add_adapters(llm, n=20, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        rank = [1, 2, 4, 8, 16, 3, 5][i % 7]
        params = ref.random_lora(llm.model_cfg, rng, rank, TARGET_SETS[i % len(TARGET_SETS)], std=0.08)
        name = f"ad{i}"
        llm.add_adapter(name, params, alpha=2.0 * rank)
        out[name] = from_pytree(name, params, llm.model_cfg, 2.0 * rank).modules
    return out


def workload(n, n_adapters, seed=1, max_prompt=40):
    rng = np.random.default_rng(seed)
    prompts = [[256] + rng.integers(0, 256, rng.integers(1, max_prompt)).tolist() for _ in range(n)]
    adapters = [None if i % 5 == 0 else f"ad{rng.integers(0, n_adapters)}" for i in range(n)]
    return prompts, adapters


@pytest.fixture(scope="module")
def reference_tokens():
    """Greedy tokens of the 50-request workload from the dense reference (computed once)."""
    llm = make_llm()
    weights = add_adapters(llm)
    params = ref.params_of(llm)
    prompts, adapters = workload(50, 20)
    toks = [ref.greedy(llm.model_cfg, params, p, 8, weights[a] if a else None) for p, a in zip(prompts, adapters)]
    return prompts, adapters, toks


def test_mixed_batch_equals_reference(reference_tokens):
    prompts, adapters, expected = reference_tokens
    llm = make_llm()
    add_adapters(llm)
    outs = llm.generate(prompts, adapter=adapters, sampling=SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    st = llm.stats()
    assert st["pages_kv"] == 0 and st["requests_finished"] == 50 and st["tokens_generated"] == 400
    llm.engine.pages.check_invariants()


def test_tiny_pool_swaps_and_preempts_but_equals_reference(reference_tokens):
    prompts, adapters, expected = reference_tokens
    # 110 pages of 4 tokens: a rank-16 adapter on all modules alone takes 76; adapters must swap and requests wait
    llm = make_llm(num_pages=110, max_batch_tokens=32)
    add_adapters(llm)
    outs = llm.generate(prompts, adapter=adapters, sampling=SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    st = llm.stats()
    assert st["pages_kv"] == 0
    assert st["swaps_out"] > 0 and st["swaps_in"] > 20, st
    assert st["preemptions"] > 0, st
    llm.engine.pages.check_invariants()


def test_seeded_sampling_reproducible_across_batches():
    llm = make_llm()
    add_adapters(llm, 3)
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate([[256, 10, 20, 30]], adapter="ad1", sampling=sp)[0].token_ids
    prompts, adapters = workload(6, 3, seed=5)
    batch = llm.generate([[256, 10, 20, 30]] + prompts, adapter=["ad1"] + adapters, sampling=sp)
    assert batch[0].token_ids == alone
    other = llm.generate([[256, 10, 20, 30]], adapter="ad1",
                         sampling=SamplingParams(max_tokens=10, temperature=0.9, seed=99, ignore_eos=True))
    greedy = llm.generate([[256, 10, 20, 30]], adapter="ad1", sampling=SamplingParams(max_tokens=10, ignore_eos=True))
    assert other[0].token_ids != alone or greedy[0].token_ids != alone


def test_stop_conditions():
    llm = make_llm(seed=0)
    base = llm.generate([[256, 1, 2, 3]], sampling=SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert len(base.token_ids) == 12 and base.finish_reason == "length"
    stop_tok = base.token_ids[4]
    first = base.token_ids.index(stop_tok)
    out = llm.generate([[256, 1, 2, 3]], sampling=SamplingParams(max_tokens=12, stop_token_ids=(stop_tok,)))[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    # eos: make the model's own next token the eos id and check generation stops there
    llm.tokenizer.eos_ids = (stop_tok,)
    llm.engine.tokenizer.eos_ids = (stop_tok,)
    out = llm.generate([[256, 1, 2, 3]], sampling=SamplingParams(max_tokens=12))[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    out = llm.generate([[256, 1, 2, 3]], sampling=SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == base.token_ids
    # a stop string spanning two tokens: the text ends right before it, streamed or not
    text = base.text
    stop = next(text[i: i + 2] for i in range(1, len(text) - 1) if text[i: i + 2].isalnum())
    sp = SamplingParams(max_tokens=12, stop=[stop, "never-seen"], ignore_eos=True)
    out = llm.generate([[256, 1, 2, 3]], sampling=sp)[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert "".join(llm.stream([256, 1, 2, 3], sampling=sp)) == out.text
    assert llm.stats()["pages_kv"] == 0


def test_unknown_adapter_fails_alone():
    llm = make_llm()
    add_adapters(llm, 2)
    outs = llm.generate([[256, 1], [256, 2], [256, 3]], adapter=["ad0", "nope", None],
                        sampling=SamplingParams(max_tokens=3, ignore_eos=True))
    assert outs[1].finish_reason == "error" and "adapter 'nope' is not registered" in outs[1].error
    assert len(outs[0].token_ids) == 3 and len(outs[2].token_ids) == 3
    too_long = llm.generate([[256] + [1] * 200], sampling=SamplingParams(max_tokens=3))[0]
    assert too_long.finish_reason == "error" and "max_model_len is 96" in too_long.error
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)
    assert llm.stats()["pages_kv"] == 0


def test_remove_adapter_in_use_refused_then_allowed():
    llm = make_llm()
    add_adapters(llm, 2)
    req = llm.engine.add_request([256, 1, 2], "ad0", SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(AdapterError, match="in use by 1 request"):
        llm.remove_adapter("ad0")
    llm.engine.run_until_done([req])
    llm.remove_adapter("ad0")
    assert [a["name"] for a in llm.adapters()] == ["ad1"]
    assert llm.stats()["pages_adapter"] == 0  # ad0 was the only resident adapter; its pages are free again


def test_stream_yields_the_generated_text():
    llm = make_llm()
    add_adapters(llm, 1)
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    full = llm.generate(["hi there"], adapter="ad0", sampling=sp)[0].text
    assert "".join(llm.stream("hi there", adapter="ad0", sampling=sp)) == full


def test_no_recompilation_after_warmup():
    llm = make_llm(num_pages=200)
    add_adapters(llm, 20)
    rng = np.random.default_rng(7)

    def run(n, seed):
        prompts, adapters = workload(n, 20, seed=seed, max_prompt=60)
        sps = rng.integers(1, 6)
        llm.generate(prompts, adapter=adapters, sampling=SamplingParams(max_tokens=int(sps), ignore_eos=True))

    compiled = llm.engine.warmup()
    assert compiled == 2 * (len(llm.engine.builder.decode_sizes()) + len(llm.engine.builder.prefill_sizes()))
    warm = llm.engine.runner.cache_size()
    run(500, seed=200)
    assert llm.engine.runner.cache_size() == warm
    assert llm.stats()["pages_kv"] == 0


def test_stop_string_helpers():
    from slora_jax.engine.engine import _split_at_stop, _stop_prefix_len

    assert _split_at_stop("abcSTOPdef", ["STOP"]) == ("abc", True)
    assert _split_at_stop("abcdef", ["STOP", "x"]) == ("abcdef", False)
    assert _split_at_stop("aXbY", ["Y", "X"]) == ("a", True)
    assert _stop_prefix_len("abcST", ["STOP"]) == 2
    assert _stop_prefix_len("abcS", ["xx", "STOP", "cS!"]) == 2
    assert _stop_prefix_len("abc", ["STOP"]) == 0


def test_early_abort_drops_requests_past_their_slo():
    llm = make_llm(early_abort_s=60.0, max_running=1)  # far above a CPU compile under load
    eng = llm.engine
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    reqs = [eng.add_request([256, i + 1, 2], None, sp) for i in range(3)]
    reqs[2].arrival -= 120.0  # waited 120 s already: its first token can no longer come within 60 s
    eng.run_until_done(reqs)
    assert [r.finish_reason for r in reqs] == ["length", "length", "abort"]
    assert len(reqs[2].output_ids) == 0
    assert llm.stats()["pages_kv"] == 0 and llm.stats()["requests_aborted"] == 1


def test_cli_generate_runs_the_tiny_default(capsys):
    import json

    from slora_jax.cli import main

    assert main(["generate", "--prompt", "Hi", "--use", "demo-coder", "--max-tokens", "4", "--dtype", "float32",
                 "--kernels", "xla"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 4 and out["finish_reason"] == "length" and out["error"] is None


def test_cli_engine_flags_reach_the_engine_config():
    import argparse

    from slora_jax.cli import _common, _engine_kw

    p = argparse.ArgumentParser()
    _common(p)
    kw = _engine_kw(p.parse_args(["--num-pages", "300", "--mem-fraction", "0.5", "--early-abort-s", "2.5",
                                  "--sync-steps"]))
    assert kw == {"num_pages": 300, "mem_fraction": 0.5, "early_abort_s": 2.5, "async_steps": False}
    assert _engine_kw(p.parse_args([])) == {}
    llm = LLM("tiny", kernels="xla", dtype="float32", **kw)
    assert (llm.engine_cfg.num_pages, llm.engine_cfg.early_abort_s, llm.engine_cfg.async_steps) == (300, 2.5, False)


def test_command_buffer_settings_reach_the_step_programs():
    """EngineConfig.command_buffers becomes XLA options of the step programs (ignored off a GPU, where the
    tokens must not change), and an unknown setting is refused before anything is built."""
    prompts, _ = workload(6, 1)
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    default = make_llm(num_pages=64)
    on = make_llm(num_pages=64, command_buffers="on")
    assert "xla_gpu_enable_command_buffer" not in default.engine.runner.compiler_options
    assert on.engine.runner.compiler_options["xla_gpu_enable_command_buffer"].startswith("FUSION")
    assert [o.token_ids for o in on.generate(prompts, sampling=sp)] == \
        [o.token_ids for o in default.generate(prompts, sampling=sp)]
    with pytest.raises(ConfigError, match="command_buffers must be one of"):
        make_llm(command_buffers="always")


def test_add_request_does_not_wait_for_the_engine_lock():
    """The loop holds the engine lock through each step (device wait included); a request added meanwhile
    must not wait for it (a busy loop starved the server's threads for ~1 s before the inbox)."""
    import threading

    llm = make_llm(num_pages=64)
    eng = llm.engine
    held, release = threading.Event(), threading.Event()

    def hold_lock():
        with eng._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    held.wait(10)
    added = []
    adder = threading.Thread(target=lambda: added.append(eng.add_request([5, 6, 7], None, SamplingParams(max_tokens=2))))
    adder.start()
    adder.join(5)
    try:
        assert added and not adder.is_alive(), "add_request blocked on the engine lock"
        assert eng.has_work()
    finally:
        release.set()
        holder.join()
    eng.run_until_done(added)
    assert added[0].finish_reason == "length" and len(added[0].output_ids) == 2
    assert llm.stats()["pages_kv"] == 0


def test_step_timings_split_the_loop_into_host_work_and_device_waits():
    import time

    llm = make_llm()
    before = dict(llm.engine.timings)
    t0 = time.perf_counter()
    llm.generate([[256, 1, 2, 3]] * 3, sampling=SamplingParams(max_tokens=6, ignore_eos=True))
    wall = time.perf_counter() - t0
    s = llm.stats()
    host, wait = s["host_s"] - before["host_s"], s["device_wait_s"] - before["device_wait_s"]
    assert host > 0 and wait >= 0 and s["mask_wait_s"] == 0  # no grammar: the mask worker never ran
    assert host + wait <= wall


def test_extreme_valid_sampling_values_run_without_wrapping(recwarn):
    """A top_k past the vocabulary and a temperature past float32's range are valid: they sample (no cut,
    uniform) like any other request, with no cast wrapping around on the way to the device."""
    llm = make_llm()
    sp = SamplingParams(max_tokens=4, temperature=1e300, top_k=10**15, ignore_eos=True, seed=3)
    out = llm.generate([[256, 5, 6]], sampling=sp)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    assert all(0 <= t < llm.model_cfg.vocab_size for t in out.token_ids)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]
