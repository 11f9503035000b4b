"""Host/device overlap of the engine loop: synchronous steps vs one step behind (EngineConfig.async_steps).

Runs the same greedy workload through the engine in both modes (CPU is fine) and
reports, per mode: wall time, steps, the time the host spent blocked reading
sampled tokens (`wait`), the host's own time (wall - wait: scheduling, batch
building, stop checks) and how many steps were dispatched before the previous
step's tokens were read. Synchronous: wall ~ device + host. One step behind:
the host works while the device runs the step already queued, so wall ~ max.

    JAX_PLATFORMS=cpu python benchmarks/bench_async_loop.py [--hidden 512 --layers 4 --requests 32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from slora_jax import LLM, SamplingParams  # noqa: E402
from slora_jax.config import CONFIGS_DIR  # noqa: E402


class Timed:
    """A step's device tokens that time the host's read of them."""

    def __init__(self, arr, k: int, log: dict):
        self.arr, self.k, self.log = arr, k, log

    def __array__(self, dtype=None, copy=None):
        t = time.perf_counter()
        out = np.asarray(self.arr, dtype)
        self.log["wait"] += time.perf_counter() - t
        self.log["reads"].append(self.k)
        self.log["ahead"] += self.log["dispatched"] > self.k + 1  # step k+1 was already queued
        return out


def instrument(eng, log: dict) -> None:
    real = eng.runner.step

    def step(pool, inp, samp, prev=None):
        toks, pool = real(pool, inp, samp, prev.arr if isinstance(prev, Timed) else prev)
        log["dispatched"] += 1
        return Timed(toks, log["dispatched"] - 1, log), pool

    eng.runner.step = step


def build(cfg_path: str, args) -> LLM:
    llm = LLM(cfg_path, dtype="float32", kernels="xla", num_pages=1024, page_rows=16, max_model_len=256,
              max_running=args.requests, max_batch_tokens=256, max_rank=16)
    llm.add_synthetic_adapters([f"a{i}" for i in range(args.adapters)], 8)
    llm.engine.warmup()
    return llm


def run(llm: LLM, async_steps: bool, args) -> dict:
    eng = llm.engine
    eng.ecfg = eng.ecfg.replace(async_steps=async_steps)  # one engine, one set of compiled programs
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, args.prompt_len).tolist() for _ in range(args.requests)]
    adapters = [f"a{i % args.adapters}" for i in range(args.requests)]
    sp = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    real = eng.runner.step
    log = {"wait": 0.0, "reads": [], "dispatched": 0, "ahead": 0}
    instrument(eng, log)
    try:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, adapter=adapters, sampling=sp)
        wall = time.perf_counter() - t0
    finally:
        eng.runner.step = real
    assert all(len(o.token_ids) == args.max_tokens for o in outs)
    return {"async_steps": async_steps, "wall_s": round(wall, 3), "steps": log["dispatched"],
            "wait_s": round(log["wait"], 3), "host_s": round(wall - log["wait"], 3),
            "ms_per_step": round(1e3 * wall / log["dispatched"], 2),
            "steps_dispatched_before_previous_read": log["ahead"],
            "tokens": [o.token_ids for o in outs]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with open(os.path.join(CONFIGS_DIR, "tiny.json")) as f:
        cfg = json.load(f)
    cfg.update(hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden), num_hidden_layers=args.layers,
               num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 64, head_dim=32)
    cfg.pop("engine", None)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench-async.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        llm = build(path, args)
    run(llm, True, args)  # first swap-ins and transfers
    rows = [run(llm, mode, args) for _ in range(args.repeats) for mode in (False, True)]
    tokens = [r.pop("tokens") for r in rows]
    assert all(t == tokens[0] for t in tokens), "the two modes generated different tokens"
    for r in rows:
        print(json.dumps(r))
    best = {m: min(r["wall_s"] for r in rows if r["async_steps"] == m) for m in (False, True)}
    print(json.dumps({"best_wall_s_sync": best[False], "best_wall_s_async": best[True],
                      "speedup": round(best[False] / best[True], 3)}))

if __name__ == "__main__":
    main()
