"""How many sequences a saturated setting runs at once for a given pool, on the CPU.

The page accounting (KV pages, adapter pages, cached blocks, preemption) is the real scheduler's and depends
only on the pool's pages and rows, not on the model: so a setting's traffic replayed through the tiny model
with the GPU's `num_pages` shows how full that pool runs and whether a larger `max_running` would add running
sequences or only preemptions. Lengths, adapters and arrivals are the setting's.

    python benchmarks/occupancy.py --config configs/bench-S1.json --pages 6387 --max-running 192,384 \
        [--out DIR] [--set KEY=VALUE ...]

Prints and writes <out>/occupancy_<setting>.json: per max_running, the steps, the mean running sequences
(overall and per tenth of the run), the fewest free pages seen and the preemptions.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from slora_jax.bench import run as bench  # noqa: E402
from slora_jax.bench.workload import adapter_name  # noqa: E402


def occupancy(config: str, pages: int, max_running: int, overrides: dict) -> dict:
    """Replay the setting's saturated trace (its largest n) through the tiny model on `pages` pages."""
    ov = {"model": "configs/tiny.json", "kernels": "xla", "dtype": "float32", "saturate": "true",
          "warmup.duration_s": "0", "peft.enabled": "false", "adapter_host_memory": "shared", "progress": "false",
          "compare_prefix_cache": "false", **overrides,
          "engine.num_pages": str(pages), "engine.max_running": str(max_running)}
    plan = bench.plan_run(config, "/tmp", ov)
    engine = bench.start_engine(plan).engine
    n = plan.ns[-1]
    trace = plan.traces[n]
    seen: list = []
    engine.on_step.append(lambda finished: seen.append((len(engine.scheduler.running), engine.pages.free_count)))
    t0 = time.monotonic()
    bench.replay(engine, trace, lambda i: adapter_name(int(trace.adapter[i])), plan.prompts[n], plan.slo,
                 max_drain_s=3600, progress=False)
    running = [r for r, _ in seen] or [0]
    tenth = max(1, len(running) // 10)
    return {"max_running": engine.scheduler.max_running, "n_adapters": n, "steps": len(seen),
            "mean_running": sum(running) / len(running),
            "mean_running_by_tenth": [sum(running[i:i + tenth]) / len(running[i:i + tenth])
                                      for i in range(0, tenth * 10, tenth) if running[i:i + tenth]],
            "min_free_pages": min((f for _, f in seen), default=pages),
            "preemptions": engine.counters["preemptions"], "tokens_generated": engine.counters["tokens_generated"],
            "wall_s": time.monotonic() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--pages", type=int, required=True, help="the pool's pages (a GPU run's engine.num_pages)")
    ap.add_argument("--max-running", default="192,384", help="comma-separated max_running values to compare")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    commit = common.git_commit()  # the code this process runs (a long run may outlast a commit)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    rows = [occupancy(args.config, args.pages, int(m), overrides) for m in args.max_running.split(",")]
    setting = bench.load_config(args.config, overrides)["setting"]
    for r in rows:
        print(f"{setting} on {args.pages} pages, max_running {r['max_running']}: {r['steps']} steps, "
              f"{r['mean_running']:.1f} running on average (by tenth: "
              f"{', '.join(f'{x:.0f}' for x in r['mean_running_by_tenth'])}), fewest free pages "
              f"{r['min_free_pages']}, {r['preemptions']} preemptions")
    common.write_json(os.path.join(args.out, f"occupancy_{setting}.json"),
                      {"setting": setting, "pages": args.pages, "git_commit": commit,
                       "command": "python benchmarks/occupancy.py " + " ".join(sys.argv[1:]), "runs": rows})


if __name__ == "__main__":
    main()
