"""Engine decode throughput on the GPU: Llama-7B shape, random weights, paged pool, LoRA kernels.

Each row times full engine decode steps (host batch building + the jitted step
+ reading the sampled tokens back), the loop a serving engine runs, at a fixed
context. Prefill is skipped: the sequences' pages are allocated and the pool
is filled with random values, so each step reads exactly what a real decode
step reads (K/V of `context` tokens per sequence, all weights, the distinct
adapters' rows) without spending the lease on prefill compiles.

Roofline = (base weights + distinct adapter rows + K/V read) / HBM copy bandwidth
measured in the same run. The HF PEFT baseline runs in a subprocess (torch
and JAX in one process would fight over device memory).

    python benchmarks/bench_decode.py --out $OUT [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from slora_jax import LLM, SamplingParams  # noqa: E402
from slora_jax.engine.request import Request  # noqa: E402
from slora_jax.engine.scheduler import ScheduledStep  # noqa: E402
from slora_jax.memory import layout  # noqa: E402

ROWS = [  # (batch, context)
    (1, 512), (32, 512), (128, 512), (256, 256),
]


def fill_pool_random(pool) -> None:
    """Random bf16 in every layer of the pool, one donated layer write at a time (never on zeros)."""
    def fill(arr, layer, key):
        val = jax.random.normal(key, arr.shape[1:], jnp.float32).astype(arr.dtype) * 0.5
        return jax.lax.dynamic_update_index_in_dim(arr, val, layer, 0)

    fill = jax.jit(fill, donate_argnums=0)
    for layer in range(pool.shape[0]):
        pool.array = fill(pool.array, layer, jax.random.PRNGKey(layer))
    jax.block_until_ready(pool.array)


@contextlib.contextmanager
def decode_batch(llm, batch, context, mode, rank):
    """A decode batch of `batch` sequences at `context` tokens, adapters none|one|distinct of `rank`,
    with pages allocated (prefill skipped); yields (one engine step as a callable, adapter names)."""
    eng = llm.engine
    names = []
    if mode != "none":
        n = 1 if mode == "one" else batch
        names = [f"r{rank}-{i}" for i in range(n)]
        missing = [x for x in names if x not in eng.store]
        if missing:
            llm.add_synthetic_adapters(missing, rank)
    reqs = []
    for b in range(batch):
        a = names[b % len(names)] if names else None
        r = Request(f"d{b}", 10_000_000 + b, [1] * context, a, SamplingParams(max_tokens=10_000, ignore_eos=True), b)
        assert eng.scheduler.admit_now(r), "the pool cannot hold the batch"
        r.num_computed = context - 1
        reqs.append(r)
    step = ScheduledStep(reqs, [1] * batch, [], [])

    def dispatch():
        """Build and launch one step; returns its sampled tokens, still on the device."""
        inp, samp, _ = eng.builder.build(step)
        toks, eng.pool.array = eng.runner.step(eng.pool.array, inp, samp)
        return toks

    try:
        yield dispatch, names, step
    finally:
        for r in reqs:
            eng.scheduler.release(r)


def pipelined_step_s(dispatch, steps: int) -> float:
    """Seconds per step as the engine's default loop runs them (EngineConfig.async_steps): step N + 1
    is built and launched before step N's tokens are read, so host work overlaps the device."""
    t0 = time.perf_counter()
    prev = dispatch()
    for _ in range(steps - 1):
        cur = dispatch()
        np.asarray(prev)
        prev = cur
    np.asarray(prev)
    return (time.perf_counter() - t0) / steps


def decode_row(llm, batch, context, mode, rank, steps, hbm):
    eng = llm.engine
    cfg = llm.model_cfg
    with decode_batch(llm, batch, context, mode, rank) as (dispatch, names, step):
        tc = time.perf_counter()
        np.asarray(dispatch())  # compile
        np.asarray(dispatch())
        print(f"  batch {batch} {mode}: first steps (compile) {time.perf_counter() - tc:.1f}s", flush=True)
        dt = pipelined_step_s(dispatch, steps)
        # each step read back before the next is built (EngineConfig.async_steps=False)
        t0 = time.perf_counter()
        for _ in range(steps):
            np.asarray(dispatch())
        dt_sync = (time.perf_counter() - t0) / steps
        # host share: the batch building alone
        t1 = time.perf_counter()
        for _ in range(steps):
            eng.builder.build(step)
        host = (time.perf_counter() - t1) / steps
    weight_bytes = cfg.num_params() * 2
    w = layout.row_width(cfg)
    adapter_bytes = sum(eng.store.get(x).n_rows for x in names) * cfg.num_layers * w * 2
    kv_bytes = batch * context * cfg.num_layers * 2 * w * 2
    moved = weight_bytes + adapter_bytes + kv_bytes
    return {
        "batch": batch, "adapters": mode, "rank": rank if mode != "none" else 0, "context": context,
        "tokens_per_s": batch / dt, "step_ms": dt * 1e3, "step_ms_sync": dt_sync * 1e3,
        "host_build_ms": host * 1e3,
        "roofline_fraction": moved / dt / hbm, "bytes_per_step": moved, "device": common.device_name(),
        "kernels": eng.runner.kernels.name, "git_commit": common.git_commit(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ranks", default="8,64")
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU: checks the script runs")
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows_spec = ROWS
    if args.quick:
        args.model, rows_spec, args.steps, args.ranks = "tiny", [(1, 32), (8, 32)], 2, "4"
    ranks = [int(r) for r in args.ranks.split(",")]
    hbm = common.hbm_bandwidth(0.25 if args.quick else 2.0)
    print(f"HBM copy bandwidth: {hbm / 1e12:.3f} TB/s", flush=True)
    max_b = max(b for b, _ in rows_spec)
    max_ctx = max(c for _, c in rows_spec)
    t0 = time.time()
    llm = LLM(args.model, max_rank=max(ranks), max_running=max_b, max_batch_tokens=max(max_b, 512),
              max_model_len=max_ctx + 64, mem_fraction=0.80 if not args.quick else None,
              **({"num_pages": 256, "dtype": "float32"} if args.quick else {}))
    print(f"model + pool ready in {time.time() - t0:.1f}s: {llm.stats()['pages_total']} pages, "
          f"pool {llm.stats()['pool_bytes'] / 2**30:.1f} GiB, kernels={llm.stats()['kernels']}", flush=True)
    fill_pool_random(llm.engine.pool)
    print(f"pool filled at {time.time() - t0:.1f}s", flush=True)
    rows = []
    for batch, ctx in rows_spec:
        specs = [("none", 0), ("one", ranks[0])] + [("distinct", r) for r in ranks]
        for mode, rank in specs:
            row = decode_row(llm, batch, ctx, mode, rank, args.steps, hbm)
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            common.write_json(os.path.join(args.out, "decode.json"), rows)  # partial results survive a timeout
    common.write_json(os.path.join(args.out, "decode.json"), rows)
    del llm
    if not args.skip_peft and not args.quick:
        env = dict(os.environ)
        res = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "peft_decode.py"),
                              "--out", args.out], env=env, capture_output=True, text=True, timeout=420)
        print(res.stdout[-3000:], res.stderr[-3000:], flush=True)
        peft_path = os.path.join(args.out, "peft_decode.json")
        if os.path.exists(peft_path):
            with open(peft_path) as f:
                peft = json.load(f)
            for row in rows:
                ref = peft.get({"none": "none", "one": "one", "distinct": "distinct"}[row["adapters"]])
                if ref and row["batch"] == peft.get("batch"):
                    row["speedup_vs_peft"] = row["tokens_per_s"] / ref
            common.write_json(os.path.join(args.out, "decode.json"), rows)
    print("\nbatch adapters rank ctx  tok/s   step_ms roofline speedup_vs_peft")
    for r in rows:
        print(f"{r['batch']:5d} {r['adapters']:8s} {r['rank']:4d} {r['context']:4d} {r['tokens_per_s']:8.0f} "
              f"{r['step_ms']:7.2f} {r['roofline_fraction']:.3f} {r.get('speedup_vs_peft', float('nan')):.1f}")


if __name__ == "__main__":
    main()
