"""The benchmark harness: S-LoRA's workload statistics, the metrics, an end-to-end tiny run, the report."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from slora_jax.bench import metrics
from slora_jax.bench.run import load_config
from slora_jax.bench.workload import adapter_ranks, generate_trace, make_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "bench-tiny.json")
REQUIRED_KEYS = {
    "setting", "model", "n_adapters", "ranks", "rate", "cv", "duration_s", "requests", "throughput_req_s",
    "tokens_per_s", "avg_latency_s", "avg_ttft_s", "slo_attainment", "max_sustainable_rate",
    "baseline_peft_throughput_req_s", "base_only_throughput_req_s", "device", "jax_version", "git_commit", "notes",
}


# -- workload -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_interarrival_mean_and_cv(cv):
    rate = 5.0
    tr = generate_trace(10, rate, 6000, cv=cv, seed=1)
    assert len(tr) == int(rate * 6000)
    gaps = np.diff(np.r_[0.0, tr.arrival_s])
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.06)


def test_adapters_follow_the_power_law():
    n, alpha = 50, 0.3
    tr = generate_trace(n, 20.0, 1000, alpha=alpha, seed=2)
    assert tr.adapter.min() >= 0 and tr.adapter.max() < n
    frac = np.bincount(tr.adapter, minlength=n) / len(tr)
    assert frac[0] > frac[-1]
    assert frac[0] == pytest.approx((1 / n) ** alpha, rel=0.05)  # P(floor(n X) = 0) = n^-alpha
    # alpha = 1: uniform over the adapters
    uni = np.bincount(generate_trace(n, 20.0, 1000, alpha=1.0, seed=2).adapter, minlength=n) / len(tr)
    assert np.abs(uni - 1 / n).max() < 0.25 / n


def test_lengths_within_their_ranges():
    tr = generate_trace(4, 50.0, 200, input_range=(8, 512), output_range=(16, 64), seed=3)
    assert tr.prompt_len.min() == 8 and tr.prompt_len.max() == 512
    assert tr.output_len.min() == 16 and tr.output_len.max() == 64
    assert abs(tr.prompt_len.mean() - 260) < 5


def test_same_seed_same_trace_and_same_stream_for_every_n():
    a = generate_trace(100, 10.0, 60, seed=7)
    b = generate_trace(100, 10.0, 60, seed=7)
    for f in ("arrival_s", "adapter", "prompt_len", "output_len"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    c = generate_trace(100, 10.0, 60, seed=8)
    assert not np.array_equal(a.arrival_s, c.arrival_s)
    # n only changes the adapter indices: every n (and the base-only run) replays one request stream
    d = generate_trace(5, 10.0, 60, seed=7)
    np.testing.assert_array_equal(a.arrival_s, d.arrival_s)
    np.testing.assert_array_equal(a.prompt_len, d.prompt_len)
    assert d.adapter.max() < 5
    assert list(a)[0] == (a.arrival_s[0], a.adapter[0], a.prompt_len[0], a.output_len[0])
    head = a.head(30.0)
    assert 0 < len(head) < len(a) and head.arrival_s.max() <= 30.0


def test_system_prompts_are_the_adapters_own():
    """Chat-shaped traces: every request of adapter i starts with adapter i's system prompt, a user turn follows."""
    plain = generate_trace(4, 20.0, 10, input_range=(3, 9), seed=5)
    tr = generate_trace(4, 20.0, 10, input_range=(3, 9), seed=5, system_prompt_len=24)
    np.testing.assert_array_equal(tr.prompt_len, plain.prompt_len + 24)  # the same draws, 24 tokens longer
    np.testing.assert_array_equal(tr.adapter, plain.adapter)
    prompts = make_prompts(tr, 320, seed=5)
    assert [len(p) for p in prompts] == tr.prompt_len.tolist()
    heads = {}
    for a, p in zip(tr.adapter.tolist(), prompts):
        assert heads.setdefault(a, p[:24]) == p[:24]
    assert len(heads) == 4 and len({tuple(h) for h in heads.values()}) == 4  # every adapter its own
    assert len({tuple(p[24:]) for p in prompts}) > len(prompts) // 2  # user turns differ
    assert make_prompts(tr.head(5.0), 320, seed=5) == prompts[: len(tr.head(5.0))]
    # off (the default): the random prompts of S-LoRA's trace, as before
    rng = np.random.default_rng(5 + 7919)
    assert make_prompts(plain, 320, seed=5) == [rng.integers(0, 320, int(n)).tolist() for n in plain.prompt_len]


def test_chat_setting_fits_its_prompts():
    c = load_config(os.path.join(ROOT, "configs", "bench-chat.json"))
    assert c["compare_prefix_cache"] and c["n_adapters"] == [1000] and c["system_prompt_len"] == 1024
    assert c["input_range"] == [32, 256] and c["alpha"] < 1  # power-law popularity: prompts repeat
    assert c["engine"]["max_model_len"] >= c["system_prompt_len"] + c["input_range"][1] + c["output_range"][1]
    assert load_config(TINY)["system_prompt_len"] == 0 and not load_config(TINY)["compare_prefix_cache"]


def test_ranks_round_robin():
    assert adapter_ranks(6, [64, 32, 16, 8]) == [64, 32, 16, 8, 64, 32]


# -- metrics --------------------------------------------------------------------------------------
def test_summarize_counts_misses_and_unfinished():
    recs = [metrics.RequestRecord(0.0, 10, 4, 4, first_token=1.0, finish=2.0),
            metrics.RequestRecord(1.0, 10, 4, 4, first_token=8.0, finish=9.0),  # ttft 7 s: misses a 6 s SLO
            metrics.RequestRecord(2.0, 10, 4, 1, first_token=3.0, finish=None),  # cut off
            metrics.RequestRecord(3.0, 10, 4, 0)]  # never served
    s = metrics.summarize(recs, 10.0, 6.0)
    assert s["requests"] == 4 and s["finished"] == 2
    assert s["throughput_req_s"] == pytest.approx(0.2)
    assert s["tokens_per_s"] == pytest.approx(0.9)
    assert s["avg_latency_s"] == pytest.approx(5.0)
    assert s["avg_ttft_s"] == pytest.approx(4.0)
    assert s["slo_attainment"] == pytest.approx(0.5)


def test_rate_search_stops_at_the_first_failing_rate():
    calls = []

    def probe(rate):
        calls.append(rate)
        return 1.0 if rate <= 20 else 0.5

    rates = [4, 8, 12, 16, 20, 24, 32, 40, 48, 64]
    points = metrics.search_rates(rates, probe, 0.9, known={10.0: 1.0})
    assert calls == [12, 16, 20, 24]  # in rising order from above the known pass, none after the first failure
    assert metrics.max_sustainable_rate(points, 0.9) == 20
    assert not metrics.rate_is_lower_bound(points, 0.9)
    # a known failing rate bounds the scan from above: nothing at or past it is probed
    calls.clear()
    points = metrics.search_rates(rates, probe, 0.9, known={10.0: 1.0, 16.0: 0.2})
    assert calls == [12] and metrics.max_sustainable_rate(points, 0.9) == 12
    # the main run failing: the scan starts from the lowest rate
    calls.clear()
    points = metrics.search_rates(rates, lambda r: calls.append(r) or (1.0 if r <= 4 else 0.0), 0.9, known={10.0: 0.3})
    assert calls == [4, 8] and metrics.max_sustainable_rate(points, 0.9) == 4


def test_rate_search_probes_nothing_above_the_capacity():
    """A rate above the saturated throughput cannot be sustained (its queue grows), whatever a short probe
    says: the search stops below it, and what passed is then no lower bound."""
    calls = []
    points = metrics.search_rates([12, 16, 24, 32, 48], lambda r: calls.append(r) or 1.0, 0.9, known={10.0: 1.0},
                                  capacity=26.2)
    assert calls == [12, 16, 24] and metrics.max_sustainable_rate(points, 0.9) == 24
    assert not metrics.rate_is_lower_bound(points, 0.9, [12, 16, 24, 32, 48], 26.2)
    assert metrics.rate_is_lower_bound(points, 0.9, [12, 16, 24, 32, 48], 40.0)  # 32 could have passed
    assert metrics.rate_is_lower_bound(points, 0.9)  # no capacity known: as before


def test_rate_search_reports_a_lower_bound_only_when_no_rate_failed():
    points = metrics.search_rates([12, 16, 32, 64], lambda r: 1.0, 0.9, known={10.0: 1.0})
    assert metrics.max_sustainable_rate(points, 0.9) == 64 and metrics.rate_is_lower_bound(points, 0.9)
    # out of time before any failure: what passed is a lower bound
    left = iter([1.0, 1.0])
    points = metrics.search_rates([12, 16, 32, 64], lambda r: next(left, None), 0.9, known={10.0: 1.0})
    assert sorted(points) == [10, 12, 16] and metrics.max_sustainable_rate(points, 0.9) == 16
    assert metrics.rate_is_lower_bound(points, 0.9)
    # nothing measured: no figure
    points = metrics.search_rates([2, 4, 8], lambda r: None, 0.9)
    assert metrics.max_sustainable_rate(points, 0.9) is None
    # a rate that passed above a failing one (noise) does not count
    assert metrics.max_sustainable_rate({8.0: 1.0, 12.0: 0.5, 16.0: 0.95}, 0.9) == 8


def test_max_running_defaults_to_what_the_pages_hold():
    from slora_jax.config import MAX_RUNNING_CAP, EngineConfig, default_max_running

    assert default_max_running(6000, 16, 512) == 6000 // 32
    assert default_max_running(10 ** 6, 16, 512) == MAX_RUNNING_CAP  # a bigger device, up to the compiled buckets
    assert default_max_running(10, 16, 4096) == 1
    cfg = EngineConfig(max_model_len=1024).with_pages(6000)  # plans for max_model_len // 2 tokens a sequence
    assert cfg.num_pages == 6000 and cfg.max_running == 6000 // 32
    assert EngineConfig(max_model_len=1024, running_seq_len=256).with_pages(6000).max_running == 6000 // 16
    assert EngineConfig(max_running=64).with_pages(6000).max_running == 64  # given: kept


def test_config_overrides():
    cfg = load_config(TINY, {"n_adapters": "5,100", "rate": "2.5", "peft.enabled": "false", "engine.max_running": "8"})
    assert cfg["n_adapters"] == [5, 100] and cfg["rate"] == 2.5
    assert cfg["peft"]["enabled"] is False and cfg["peft"]["n_cap"] == 100
    assert cfg["engine"]["max_running"] == 8 and cfg["engine"]["max_model_len"] == 16
    for name in ("bench-S1.json", "bench-S2.json", "bench-S4.json", "bench-S1-8B.json"):
        c = load_config(os.path.join(ROOT, "configs", name))
        assert c["slo_ttft_s"] == 6 and c["input_range"] == [8, 512] and c["output_range"] == [8, 512]
        assert c["modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert c["engine"]["max_model_len"] >= 1024
        assert "max_running" not in c["engine"]  # no fixed cap: what the device's KV pages hold
        assert c["saturate"] is False and c["saturate_requests"] >= 1000
    assert load_config(os.path.join(ROOT, "configs", "bench-S1-8B.json"))["setting"] == "S1-8B"
    assert max(load_config(os.path.join(ROOT, "configs", "bench-S1.json"))["rate_search"]["rates"]) == 64
    assert load_config(TINY, {"saturate": "true"})["saturate"] is True


def test_engine_runs_what_its_pages_hold(tmp_path):
    """A preset without max_running: the engine runs as many sequences as its pages hold."""
    from slora_jax import LLM
    from slora_jax.config import default_max_running

    preset = json.loads(open(os.path.join(ROOT, "configs", "tiny.json")).read())
    preset.pop("engine")
    path = tmp_path / "tiny-auto.json"
    path.write_text(json.dumps(preset))
    llm = LLM(str(path), kernels="xla", dtype="float32", num_pages=160, max_model_len=64, max_batch_tokens=64)
    assert llm.engine.scheduler.max_running == default_max_running(160, 16, 32) == 80


# -- end to end on the tiny model ---------------------------------------------------------------
HAVE_PEFT = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    from slora_jax.bench.run import run_from_config

    out = tmp_path_factory.mktemp("bench")
    over = {"kernels": "xla", "peft.enabled": "true" if HAVE_PEFT else "false"}
    return out, run_from_config(TINY, str(out), over)


def test_tiny_run_writes_the_result_json(tiny_results):
    out, results = tiny_results
    assert len(results) == 1
    path = out / "tiny-3.json"
    d = json.loads(path.read_text())
    assert REQUIRED_KEYS <= set(d)
    assert d["setting"] == "tiny" and d["n_adapters"] == 3 and d["ranks"] == [8, 4]
    assert d["requests"] > 0
    assert 0 < d["throughput_req_s"] <= d["requests"] / 0.1
    assert d["tokens_per_s"] > 0
    assert d["avg_latency_s"] >= d["avg_ttft_s"] >= 0
    assert 0 <= d["slo_attainment"] <= 1
    assert d["run"]["finished"] == d["requests"]  # the tiny trace drains completely
    assert d["base_only_throughput_req_s"] > 0
    assert d["max_sustainable_rate"] is None or d["max_sustainable_rate"] > 0
    assert d["rate_search"]["capacity_req_s"] > 0  # measured first: the search's bound
    assert d["device"].startswith("cpu") and d["jax_version"]
    if HAVE_PEFT:
        assert d["baseline_peft_throughput_req_s"] is not None and d["baseline_peft_throughput_req_s"] >= 0
        assert d["peft"]["n_adapters"] == 3
    assert isinstance(d["notes"], list) and d["notes"]


SAT_KEYS = {"setting", "model", "n_adapters", "saturated", "requests", "throughput_req_s", "tokens_per_s",
            "base_only_throughput_req_s", "lora_vs_base", "max_running", "device", "git_commit", "notes"}


@pytest.fixture(scope="module")
def tiny_saturated(tmp_path_factory):
    from slora_jax.bench.run import run_from_config

    out = tmp_path_factory.mktemp("bench-sat")
    return out, run_from_config(TINY, str(out), {"saturate": "true", "saturate_requests": "10", "kernels": "xla"})


def test_saturated_run_offers_everything_at_once(tiny_saturated):
    out, results = tiny_saturated
    assert [r["n_adapters"] for r in results] == [3]
    d = json.loads((out / "tiny-sat-3.json").read_text())
    assert SAT_KEYS <= set(d) and d["saturated"] is True
    assert not (out / "tiny-3.json").exists()  # the offered-load file is another run's
    assert d["requests"] == 10 and d["run"]["finished"] == 10
    assert d["max_running"] == 4  # the engine's own figure
    assert d["throughput_req_s"] > 0 and d["tokens_per_s"] > 0 and d["base_only_throughput_req_s"] > 0
    assert d["lora_vs_base"] == pytest.approx(d["throughput_req_s"] / d["base_only_throughput_req_s"])
    assert d["base_only"]["requests"] == 10
    assert "max_sustainable_rate" not in d and "peft" not in d  # no rate search, no PEFT
    assert any("offered at once" in note for note in d["notes"])


CHAT = os.path.join(ROOT, "configs", "bench-chat.json")
# the chat setting on the tiny model (as device_run.sh's SMOKE=1 runs it), three adapters so that prefixes repeat
CHAT_TINY = {"model": "configs/tiny.json", "kernels": "xla", "dtype": "float32", "engine.num_pages": "256",
             "engine.max_running": "4", "engine.max_batch_tokens": "32", "engine.max_model_len": "32",
             "input_range": "[2,8]", "output_range": "[2,6]", "rate": "4", "duration_s": "2", "saturate_requests": "8",
             "warmup.duration_s": "1", "time_budget_s": "120", "progress": "false", "system_prompt_len": "16",
             "n_adapters": "3", "prefix_warm_s": "1", "prefix_more_rates": "[8]"}


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    from slora_jax.bench.run import run_from_config

    out = tmp_path_factory.mktemp("bench-chat")
    return out, run_from_config(CHAT, str(out), CHAT_TINY)


def test_chat_run_compares_the_prefix_cache_on_and_off(tiny_chat):
    out, results = tiny_chat
    d = json.loads((out / "chat-prefix.json").read_text())
    assert results == [d] and [p.name for p in out.iterdir()] == ["chat-prefix.json"]
    assert {"on", "off", "ttft_p50_speedup", "saturated_throughput_ratio", "device", "model", "n_adapters",
            "git_commit", "date"} <= set(d)
    assert d["n_adapters"] == 3 and d["system_prompt_len"] == 16
    for mode in ("on", "off"):
        m = d[mode]
        assert m["throughput_req_s"] > 0 and m["tokens_per_s"] > 0 and m["saturated_throughput_req_s"] > 0
        assert 0 <= m["ttft_p50_s"] <= m["ttft_p99_s"] and m["ttft_mean_s"] > 0
        for which, n in (("offered", 8), ("saturated", 8)):
            run = m["runs"][which]
            assert run["requests"] == run["finished"] == n and run["compiled_during"] == 0, (mode, which)
        # each mode from an empty pool cache and the same traffic served before: the same swaps each time
        assert m["runs"]["offered"]["engine"]["swaps_in"] == d["on"]["runs"]["offered"]["engine"]["swaps_in"]
    assert d["on"]["hit_rate"] > 0 and d["on"]["saturated_hit_rate"] > 0
    assert d["off"]["hit_rate"] == d["off"]["saturated_hit_rate"] == 0
    # the requests that hit, beside themselves with the cache off
    c = d["cached_requests"]
    assert d["prefix_warm_s"] == 1 and 0 < c["requests"] <= c["of"] == 8 and c["cached_tokens_mean"] >= 16
    assert c["ttft_p50_speedup"] == pytest.approx(c["ttft_p50_off_s"] / c["ttft_p50_on_s"])
    # a heavier offered load after it, on the same cache
    (more,) = d["more_rates"]
    assert more["rate"] == 8 and more["on"]["hit_rate"] > 0 and more["off"]["hit_rate"] == 0
    assert more["ttft_p50_speedup"] == pytest.approx(more["off"]["ttft_p50_s"] / more["on"]["ttft_p50_s"])
    assert d["ttft_p50_speedup"] == pytest.approx(d["off"]["ttft_p50_s"] / d["on"]["ttft_p50_s"])
    assert d["saturated_throughput_ratio"] == pytest.approx(
        d["on"]["saturated_throughput_req_s"] / d["off"]["saturated_throughput_req_s"])


def test_chat_prompts_give_the_same_greedy_tokens_with_the_cache_on_and_off():
    """The chat setting's requests (system prompts and all) on one engine, as the bench switches it: greedy
    tokens equal, hits only with the cache on."""
    from slora_jax import SamplingParams
    from slora_jax.bench.run import plan_run, start_engine
    from slora_jax.bench.workload import adapter_name

    plan = plan_run(CHAT, "unused", {**CHAT_TINY, "saturate_requests": "12"}).requests(saturate=True)
    llm = start_engine(plan).llm
    n = plan.ns[-1]
    prompts, names = plan.prompts[n], [adapter_name(int(a)) for a in plan.traces[n].adapter]
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    tokens = {}
    for on in (True, False):
        llm.set_prefix_cache(on)
        llm.clear_cache()
        before = llm.stats()["prefix_hit_tokens"]
        tokens[on] = [o.token_ids for o in llm.generate(prompts, adapter=names, sampling=sp)]
        assert (llm.stats()["prefix_hit_tokens"] > before) == on
    assert tokens[True] == tokens[False]


def test_report_writes_table_and_plots(tiny_results, tiny_saturated, tmp_path):
    from slora_jax.bench.report import END, HEADLINE, START, write_report

    results = tmp_path / "results"
    results.mkdir()
    for d in (tiny_results[0], tiny_saturated[0]):  # stored results of both modes, as benchmarks/results holds them
        for f in d.glob("*.json"):
            shutil.copy(f, results / f.name)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nkept text\n")
    plots = tmp_path / "plots"
    res = write_report(str(results), str(md), str(plots))
    text = md.read_text()
    assert "kept text" in text and text.count(START) == 1 and text.count(END) == 1
    # the headline first, leading with the saturated run; the offered-load table labelled as such
    assert text.index(HEADLINE[0]) < text.index("kept text") < text.index(START)
    sat = json.loads((results / "tiny-sat-3.json").read_text())
    head = text[: text.index(HEADLINE[1])]
    assert f"| tiny | 3 | **{sat['throughput_req_s']:.2f}** |" in head and f"{sat['lora_vs_base']:.3f}" in head
    assert "Not measured yet" in head  # no decode or kernel rows in these results: said, not invented
    assert "### tiny: saturated" in text and "### tiny: offered load (4 req/s)" in text
    assert "| n adapters |" in text and "| 3 |" in text
    assert "slo_vs_rate.png" in text and "throughput_vs_adapters.png" in text and "saturated.png" in text
    for p in res["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    write_report(str(results), str(md), str(plots))  # a second run replaces the sections
    assert md.read_text() == text


def test_saturated_runs_of_two_devices_are_compared_within_their_own_run():
    """Two GPUs' saturated runs of one setting: each row's "vs n" divides by its own device's smallest n, the
    table names the device, and the notes shared by the runs appear once."""
    from slora_jax.bench.report import _runs_and_notes, _saturated_table

    def run(n, req_s, device):
        return {"setting": "S1", "n_adapters": n, "requests": 10, "throughput_req_s": req_s,
                "device": device, "git_commit": "abc", "notes": ["offered at once"]}

    rows = [run(5, 20.0, "gpu:H200"), run(5, 10.0, "gpu:H100"), run(2000, 19.0, "gpu:H200"),
            run(2000, 9.0, "gpu:H100")]
    table = "\n".join(_saturated_table(rows))
    assert "| 2000 | 10 | **19.00** |" in table and "| 0.950 |" in table  # 19 / 20, the H200's n = 5
    assert "| 0.900 |" in table and "| 0.450 |" not in table  # 9 / 10, never 9 / 20
    assert "H100, `abc` |" in table
    assert "\n".join(_runs_and_notes(rows)).count("n=5: offered at once") == 1


def test_a_max_rate_above_the_saturated_capacity_is_flagged():
    """A short probe can pass above capacity (max_running admits a burst): the headline says so."""
    from slora_jax.bench.report import _above_capacity

    probe = {"setting": "S1", "max_sustainable_rate": 48, "rate_search": {"probe_s": 12.0}}
    assert "above the saturated capacity of 26.2 req/s" in _above_capacity(probe, {"S1": 26.2})
    assert _above_capacity(probe, {"S1": 50.0}) == "" and _above_capacity(probe, {}) == ""


def test_bucket_ladder():
    """Powers of two, and from 192 up the size halfway between: a step takes the smallest that holds it;
    the default max_running fills its bucket when that costs at most an eighth of it."""
    from slora_jax.buckets import bucket, fill_down, ladder
    from slora_jax.config import default_max_running

    assert ladder(4, 512) == [4, 8, 16, 32, 64, 128, 192, 256, 384, 512]
    assert ladder(16, 3000) == [16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072]
    for n in range(1, 5000):
        b = bucket(n, 16)
        assert b >= n and b in ladder(16, n) and not [s for s in ladder(16, n) if n <= s < b]
    assert [fill_down(n, 4) for n in (80, 187, 199, 300, 385, 3)] == [80, 187, 192, 300, 384, 3]
    assert default_max_running(385 * 32, 16, 512) == 384


def test_occupancy_shows_when_the_pool_not_max_running_bounds_the_batch():
    """benchmarks/occupancy.py: on a pool that holds about 3 of the setting's sequences, raising max_running
    from 2 to 8 adds running sequences only up to what the pages hold (the page accounting is the scheduler's)."""
    spec = importlib.util.spec_from_file_location("occupancy", os.path.join(ROOT, "benchmarks", "occupancy.py"))
    occ = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(occ)
    ov = {"engine.max_batch_tokens": "64", "engine.max_model_len": "64", "engine.page_rows": "16",
          "input_range": "[20,40]", "output_range": "[8,16]", "saturate_requests": "12", "n_adapters": "[4]"}
    few, many = (occ.occupancy(os.path.join(ROOT, "configs", "bench-S1.json"), 12, m, ov) for m in (2, 8))
    for r in (few, many):
        assert r["tokens_generated"] > 0 and r["steps"] > 0 and r["min_free_pages"] >= 0
    assert few["max_running"] == 2 and max(few["mean_running_by_tenth"]) <= 2
    # 12 pages of 16 rows: about three sequences of up to 56 tokens (and their adapters) at once, not eight
    assert many["max_running"] == 8 and few["mean_running"] < many["mean_running"] < 4


def test_each_timed_run_starts_from_a_cold_pool(tmp_path):
    """The base-only run and each n's run replay the same prompts: KV one run leaves in the prefix cache (the
    synthetic adapters of a shared host buffer are one identity) must not serve the next, or a later run is
    measured on cached prompts. Prompts of two pages and a pool that keeps every block between runs."""
    from slora_jax.bench.run import run_from_config

    ov = {"saturate": "true", "saturate_requests": "6", "n_adapters": "[2,3]", "adapter_host_memory": "shared",
          "input_range": "[33,40]", "output_range": "[2,4]", "engine.max_model_len": "48",
          "engine.max_batch_tokens": "64", "engine.num_pages": "128", "warmup.duration_s": "0"}
    results = run_from_config(TINY, str(tmp_path), ov)
    assert [r["n_adapters"] for r in results] == [2, 3]
    for r in results:
        assert r["run"]["finished"] == 6 and r["base_only"]["finished"] == 6
        assert r["run"]["engine"]["prefix_hit_tokens"] == 0 and r["base_only"]["engine"]["prefix_hit_tokens"] == 0
        assert r["run"]["engine"]["prefix_query_tokens"] > 0  # the cache was on, and looked
    # a result from before the cold start (its prompts hit an earlier run's blocks) is struck out in the report
    from slora_jax.bench.report import headline_section, slora_section

    stale = json.loads(json.dumps(results[1]))
    stale["run"]["engine"]["prefix_hit_tokens"] = stale["run"]["engine"]["prefix_query_tokens"] // 2
    (tmp_path / "tiny-sat-3.json").write_text(json.dumps(stale))
    text = "\n".join(headline_section(str(tmp_path)) + slora_section(str(tmp_path), None))
    assert f"~~**{stale['throughput_req_s']:.2f}**~~ †" in text
    assert "† tiny n = 3 (" in text and "50% of its prompt tokens were served from blocks" in text
    assert f"**{results[0]['throughput_req_s']:.2f}** |" in text  # the clean result stands as it is
    # where every prompt starts with its adapter's system prompt, hits are the setting's own
    assert results[0]["system_prompt_len"] == 0
    (tmp_path / "tiny-sat-3.json").write_text(json.dumps({**stale, "system_prompt_len": 16}))
    assert "~~" not in "\n".join(headline_section(str(tmp_path)))
