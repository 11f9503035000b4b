"""The GPU benchmark scripts on a CPU: the kernel bench runs end to end (--smoke, interpret mode), the
device_run.sh stages of issue #16 run with their smoke options (SMOKE=1) and the one report generator
renders what they wrote and the stored GPU results. Nothing is timed here; they catch a script that would
fail on the device machine, where a call costs minutes of device time."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _run(args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", GIT_COMMIT="test-commit")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_lora_bench_smoke_rows_split_device_time_by_kernel(tmp_path):
    proc = _run(["benchmarks/bench_lora.py", "--smoke", "--no-sweep", "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all checks PASS" in proc.stdout
    rows = json.load(open(tmp_path / "kernels_lora.json"))
    pallas = [r for r in rows if r["kernel"] == "pallas"]
    assert pallas and {r["phase"] for r in pallas} == {"decode", "prefill"}
    assert {r["model"] for r in pallas} == {"llama-2-7b", "llama-3.1-8b"}  # the 8B rows: a narrower pool
    for r in pallas:
        assert r["git_commit"] == "test-commit"
        assert r["read_roofline_fraction"] > 0 and r["copy_roofline_fraction"] > 0 and r["read_limit_tbps"] > 0
        # a CPU trace names XLA's thunks, not the kernels: the split is only checked for its shape here
        assert 0 <= r["device_us_shrink"] + r["device_us_expand"] <= r["device_us"], r
    decode = next(r for r in pallas if r["phase"] == "decode")
    assert decode["tunables"]["shrink"]["block_t"] == 1  # the decode default: one token per program


def _device_run_smoke(tmp_path, stages: list, budget_s: int = 600) -> tuple:
    """`SMOKE=1 bash benchmarks/device_run.sh STAGE...` on the CPU -> (process, summary.txt, $OUT, $WORK)."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu", GIT_COMMIT="test-commit", SMOKE="1", OUT=str(out), WORK=str(work),
               BUDGET_S=str(budget_s), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", "benchmarks/device_run.sh", *stages], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=budget_s)
    return proc, (out / "summary.txt").read_text(), out, work


def test_device_run_stages_smoke(tmp_path):
    """The stages of the three GPU calls that the kernel smoke test does not cover, as device_run.sh runs
    them, then the report over what they wrote."""
    stages = ["decode-7b", "decode-8b", "cmdbuf", "profile-8b", "s1-sat", "rate-s1"]
    proc, summary, out, work = _device_run_smoke(tmp_path, stages, budget_s=1500)
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-2000:]
    for stage in stages:
        assert f"== {stage} rc=0" in summary, summary
    with tarfile.open(out / "results.tar.gz") as tar:  # the one file that comes back holds everything
        names = set(tar.getnames())
    for name in ("r/decode.json", "r/decode_cmdbuf.json", "r/profile_step_llama3-8b.json", "r/S1-sat-5.json",
                 "r/S1-sat-2000.json", "r/S1-2000.json", "s1-sat.log"):
        assert "./" + name in names, names
    res = work / "r"
    decode = json.loads((res / "decode.json").read_text())
    assert decode and all(r["read_roofline_fraction"] > 0 and "copy_roofline_fraction" in r for r in decode)
    assert {r["command_buffers"] for r in json.loads((res / "decode_cmdbuf.json").read_text())} == {"default", "on"}
    sat = json.loads((res / "S1-sat-2000.json").read_text())
    assert sat["saturated"] and sat["lora_vs_base"] > 0 and sat["git_commit"] == "test-commit"
    # the one report generator, over these results: the headline leads with them
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nhand-written text\n")
    proc = _run(["-m", "slora_jax.bench.report", "--results", str(res), "--md", str(md), "--plots",
                 str(tmp_path / "plots")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = md.read_text()
    assert text.index("<!-- headline:start -->") < text.index("hand-written text")
    head = text[: text.index("<!-- headline:end -->")]
    assert "| S1 | 2000 |" in head and "Not measured yet" not in head.split("Read-roofline")[0]
    assert "decode, tiny, distinct" not in head  # rank 8 rows only: the tiny smoke used rank 4
    assert "### S1: Llama-7B, rank 8: saturated" in text and "### S1: Llama-7B, rank 8: offered load" in text
    assert "| default | tiny |" in text  # the command-buffer table
    assert (tmp_path / "plots" / "saturated.png").stat().st_size > 0


def test_report_renders_the_stored_results(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    shutil.copy(os.path.join(ROOT, "BENCHMARKS.md"), md)
    proc = _run(["-m", "slora_jax.bench.report", "--results", RESULTS, "--md", str(md), "--plots", str(tmp_path)],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = md.read_text()
    rows = json.load(open(os.path.join(RESULTS, "kernels_lora.json")))
    p = next(r for r in rows if r["kernel"] == "pallas" and r["phase"] == "decode" and r["batch"] == 128
             and r["rank"] == 16)
    # the table row carries the JSON's figures, split by kernel
    assert (f"| 16 | 128 | {p['time_us']:.1f} | {p['device_us']:.1f} ({p['device_us_shrink']:.1f} + "
            f"{p['device_us_expand']:.1f}) |") in text
    assert "Tunables sweep (`kernels_lora_sweep.json`" in text
    assert (tmp_path / "lora_decode.png").stat().st_size > 0
    # every generated section once, the headline first; the hand-written prose outside them survives
    for marker in ("headline", "gpu-micro", "slora-bench"):
        assert text.count(f"<!-- {marker}:start -->") == 1 and text.count(f"<!-- {marker}:end -->") == 1
    assert text.index("<!-- headline:start -->") < text.index("<!-- gpu-micro:start -->")
    assert "## S-LoRA workload (S1 / S2 / S4)" in text
    # the offered-load tables say so
    assert "### S1: Llama-7B, rank 8: offered load (10 req/s)" in text
    # a second run changes nothing
    before = md.read_text()
    assert _run(["-m", "slora_jax.bench.report", "--results", RESULTS, "--md", str(md), "--plots", str(tmp_path)],
                tmp_path).returncode == 0
    assert md.read_text() == before


def test_structured_stage_smoke(tmp_path):
    """device_run.sh's `structured` stage (bench_structured.py --smoke): every mode's rows generate their tokens
    (the constrained ones through llguidance masks) and structured.json holds the ratios of issue #19's goals."""
    proc, summary, out, work = _device_run_smoke(tmp_path, ["structured"])
    assert proc.returncode == 0 and "== structured rc=0" in summary, summary + proc.stderr[-2000:]
    row = json.loads((work / "r" / "structured.json").read_text())
    assert set(row["modes"]) == {"none", "all", "half"} and row["git_commit"] == "test-commit"
    assert row["modes"]["all"]["mask_ms"] > 0 and row["modes"]["none"]["mask_ms"] == 0
    assert row["all_vs_none"] > 0 and row["half_free_row_loss"] < 1
    assert set(row["profile"]) == {"none", "all", "half"}  # --profile: the traced run of each mode
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    proc = _run(["-m", "slora_jax.bench.report", "--results", str(work / "r"), "--md", str(md), "--plots",
                 str(tmp_path / "plots")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### Structured output: batch 4 decode, tiny-llama" in md.read_text()


def test_chat_stage_smoke(tmp_path):
    """device_run.sh's `chat` and `s1-prefix` stages (the prefix cache on / off, issue #18) on the tiny model:
    the chat's system prompts scaled to the smoke's max_model_len, chat-prefix.json and S1-prefix.json
    written, and the report's tables from them."""
    proc, summary, out, work = _device_run_smoke(tmp_path, ["chat", "s1-prefix", "profile-chat", "profile-s1-sat-base",
                                                              "profile-s1-sat-host"])
    assert proc.returncode == 0 and "== chat rc=0" in summary and "== s1-prefix rc=0" in summary, \
        summary + proc.stderr[-2000:]
    # the chat traffic traced for a moment: its steps, split into host work and device waits
    assert "== profile-chat rc=0" in summary, summary
    prof = json.loads((work / "r" / "profile_serve_chat.json").read_text())
    assert prof["steps"] > 0 and prof["host_ms_per_step"] > 0 and prof["kinds"], prof
    # S1 saturated through the base model alone (the LoRA profile's counterpart): no LoRA kernel ran
    assert "== profile-s1-sat-base rc=0" in summary, summary
    base = json.loads((work / "r" / "profile_serve_S1_sat_base.json").read_text())
    assert base["base_only"] and base["steps"] > 0 and "lora" not in base["kinds"], base["kinds"]
    # and with the engine thread's Python profiled: the step's own functions are among the top
    host = json.loads((work / "r" / "profile_serve_S1_sat_host.json").read_text())
    assert any("engine.py" in f["function"] for f in host["host_functions"]), host["host_functions"]
    d = json.loads((work / "r" / "chat-prefix.json").read_text())
    assert d["git_commit"] == "test-commit" and d["n_adapters"] == 1000 and d["system_prompt_len"] == 16
    for mode in ("on", "off"):
        assert d[mode]["throughput_req_s"] > 0 and d[mode]["saturated_throughput_req_s"] > 0
    assert d["off"]["hit_rate"] == 0 and d["ttft_p50_speedup"] > 0 and d["saturated_throughput_ratio"] > 0
    # served 1 s of the traffic first: requests of adapters seen then find their system prompt cached
    assert d["prefix_warm_s"] == 1 and d["cached_requests"]["requests"] > 0, d["cached_requests"]
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    proc = _run(["-m", "slora_jax.bench.report", "--results", str(work / "r"), "--md", str(md), "--no-plots"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = md.read_text()
    assert "### Prefix caching (chat): tiny-llama, 1000 adapters, 16-token system prompts" in text
    # S1 with the cache on and off: prompts that share nothing, the cache's own cost (issue #18's no-regression)
    assert "### Prefix caching (S1): tiny-llama, 2000 adapters, prompts that share nothing" in text
    assert f"TTFT p50 off / on: **{d['ttft_p50_speedup']:.2f}x**" in text


def test_a_kernel_faster_than_the_read_probes_becomes_the_read_limit():
    """A read fraction above 1 says the probes fell short, not that the kernel beat the memory: the run's
    fastest read-only row becomes every row's denominator (the rows passed in stay as they were)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import common
    finally:
        sys.path.pop(0)
    rows = [{"read_roofline_fraction": 1.0064, "read_limit_tbps": 4.3694},
            {"read_roofline_fraction": 0.5032, "device_read_roofline_fraction": 0.8, "read_limit_tbps": 4.3694}]
    out = common.rebase_read_limit(rows)
    # the row that set the limit is the limit, not a fraction of it (a 1.0 by construction says nothing)
    assert [r["read_roofline_fraction"] for r in out] == [None, 0.5] and out[1]["device_read_roofline_fraction"] == 0.7949
    assert out[0]["sets_read_limit"] and "sets_read_limit" not in out[1]
    assert out[0]["read_limit_tbps"] == round(4.3694 * 1.0064, 4) and "read_limit_source" in out[0]
    assert rows[0]["read_roofline_fraction"] == 1.0064  # not changed in place
    below = [{"read_roofline_fraction": 0.9, "read_limit_tbps": 4.4}]
    assert common.rebase_read_limit(below) == below and "read_limit_source" not in below[0]


def test_mask_gil_probe_runs(tmp_path):
    """benchmarks/probe_mask_gil.py (why structured output lowers the switch interval) runs and reports both."""
    proc = _run(["benchmarks/probe_mask_gil.py", "--rounds", "3", "--vocab", "1000"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "switch interval 5.0 ms" in proc.stdout and "switch interval 0.5 ms" in proc.stdout


def test_profile_serve_window_leaves_out_the_profiler_calls(monkeypatch):
    """profile_serve.Window's wall and host figures run from the first step after the profiler started to
    the last before it stops: starting the profiler (slow) counts in neither."""
    import time as time_mod
    import types

    import jax

    from benchmarks.profile_serve import Window

    keys = ("steps", "tokens_generated", "prompt_tokens", "host_s", "device_wait_s", "mask_wait_s",
            "prefix_hit_tokens", "swaps_in")
    figures = dict.fromkeys(keys, 0.0)
    engine = types.SimpleNamespace(stats=lambda: dict(figures), drain=lambda: [],
                                   scheduler=types.SimpleNamespace(running=[1, 2]))
    monkeypatch.setattr(jax.profiler, "start_trace", lambda *a, **k: time_mod.sleep(0.3))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: time_mod.sleep(0.3))
    win = Window(engine, "unused", lead_s=0.0, seconds=0.05)
    while not win.done:  # the engine's step: its host time is counted after its callbacks return
        t = time_mod.monotonic()
        figures["steps"] += 1
        win(())
        time_mod.sleep(0.01)
        figures["host_s"] += time_mod.monotonic() - t
    wall = win.end - win.start
    host = win.after["host_s"] - win.before["host_s"]
    assert 0.04 <= wall < 0.2 and 0 < host < 0.2, (wall, host)
