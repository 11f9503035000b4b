"""Decode steps with and without XLA command buffers (CUDA graphs), each setting in its own process.

Each setting of EngineConfig.command_buffers (slora_jax.config.COMMAND_BUFFERS: XLA options of the step
programs) runs bench_decode.py in a subprocess of its own, so that no setting inherits another's compiled
programs or device state (default: default and on; Llama-3.1-8B, batch 32, no adapter / one / 32 distinct
rank-8 adapters). Rows go to <out>/decode_cmdbuf.json, each with its `command_buffers` setting and XLA options;
the table printed last compares each setting's step time with the first's.

    python benchmarks/bench_cmdbuf.py --out $OUT [--models llama3-8b] [--batches 32] [--settings default,on,off]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from slora_jax.config import COMMAND_BUFFERS  # noqa: E402


def run_setting(setting: str, args) -> list:
    """bench_decode.py under one command-buffer setting; its rows, or one row saying why there are none."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_decode.py"),
               "--out", tmp, "--models", args.models, "--batches", args.batches, "--ranks", args.ranks,
               "--steps", str(args.steps), "--skip-peft", "--command-buffers", setting]
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        print(f"== {setting}: exit {proc.returncode}\n{proc.stdout[-2500:]}\n{proc.stderr[-1500:]}", flush=True)
        path = os.path.join(tmp, "decode.json")
        if proc.returncode != 0 or not os.path.exists(path):
            return [{"command_buffers": setting, "error": f"exit {proc.returncode}: {proc.stderr[-300:]}"}]
        with open(path) as f:
            return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--models", default="llama3-8b")
    ap.add_argument("--batches", default="32")
    ap.add_argument("--ranks", default="8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--settings", default="default,on", help="of " + ", ".join(COMMAND_BUFFERS))
    ap.add_argument("--timeout", type=int, default=240, help="seconds for each setting's process")
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU: checks the script runs")
    args = ap.parse_args()
    if args.quick:  # bench_decode's --quick runs the tiny model at batch 4 and 8
        args.batches = "4"
    rows = []
    for setting in args.settings.split(","):
        rows += run_setting(setting, args)
        common.write_json(os.path.join(args.out, "decode_cmdbuf.json"), rows)  # partial results survive
    first = args.settings.split(",")[0]
    base = {(r["model"], r["batch"], r["adapters"], r["rank"]): r["step_ms"] for r in rows
            if r.get("command_buffers") == first and "step_ms" in r}
    print(f"\nsetting  model         batch adapters rank  step_ms  vs {first:7s} read_roof")
    for r in rows:
        if "error" in r:
            print(f"{r['command_buffers']:8s} failed: {r['error'][:200]}")
            continue
        ref = base.get((r["model"], r["batch"], r["adapters"], r["rank"]))
        print(f"{r['command_buffers']:8s} {r['model']:13s} {r['batch']:5d} {r['adapters']:8s} {r['rank']:4d} "
              f"{r['step_ms']:8.2f} {ref / r['step_ms'] if ref else float('nan'):9.3f}x "
              f"{r['read_roofline_fraction']:9.3f}")


if __name__ == "__main__":
    main()
