"""The GPU benchmark scripts on a CPU: the kernel bench runs end to end (--smoke, interpret mode) and the
micro report renders the stored H200 results. Neither times anything here; they catch a script that
would fail on the device machine, where a call costs minutes of device time."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

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
    for r in pallas:
        assert r["git_commit"] == "test-commit"
        # a CPU trace names XLA's thunks, not the kernels: the split is only checked for its shape here
        assert 0 <= r["device_us_shrink"] + r["device_us_expand"] <= r["device_us"], r
    decode = next(r for r in pallas if r["phase"] == "decode")
    assert decode["tunables"]["shrink"]["block_t"] == 1  # the decode default: one token per program


def test_micro_report_renders_the_stored_results(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    shutil.copy(os.path.join(ROOT, "BENCHMARKS.md"), md)
    proc = _run(["benchmarks/report.py", "--results", RESULTS, "--md", str(md), "--plots", str(tmp_path)],
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
    # the hand-written prose outside the generated section survives
    assert "## S-LoRA workload (S1 / S2 / S4)" in text
