"""Tensor parallelism on real GPUs (the device machine's 2-GPU kind): correctness, then decode speed.

1. gpu_engine_check's tiny model (GQA, 4 heads / 2 kv heads, 6 adapters), Pallas kernels inside
   shard_map, float32: a mixed batch's logits and greedy tokens with tp = every GPU equal tp = 1.
2. Llama-7B shape, bf16: engine decode steps (bench_decode.decode_row) at batch 32 and 128 with
   distinct rank-8 adapters and without LoRA, tp = 1 then tp = every GPU: tokens/s, step ms.
Writes <out>/tp_check.json; exits non-zero on a mismatch.

    python benchmarks/gpu_tp_check.py --out $OUT        # [--skip-speed]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bench_decode import decode_row, fill_pool_random  # noqa: E402
from benchmarks.gpu_engine_check import build  # noqa: E402
from slora_jax import LLM, SamplingParams  # noqa: E402


def correctness(tp: int) -> dict:
    rng = np.random.default_rng(1)
    prompts = [[256] + rng.integers(0, 256, rng.integers(1, 120)).tolist() for _ in range(16)]
    adapters = [None if i % 5 == 0 else f"a{i % 4}" for i in range(16)]
    res = {}
    for t in (1, tp):
        llm = build("pallas", "float32", tp=t)
        logits = [llm.logits(p, adapter=a) for p, a in zip(prompts[:4], adapters[:4])]
        outs = llm.generate(prompts, adapter=adapters, sampling=SamplingParams(max_tokens=10, ignore_eos=True))
        res[t] = (logits, [o.token_ids for o in outs], llm.stats()["pages_kv"])
        del llm
        gc.collect()
    err = max(float(np.linalg.norm(a - b) / np.linalg.norm(a)) for a, b in zip(res[1][0], res[tp][0]))
    same = sum(x == y for x, y in zip(res[1][1], res[tp][1]))
    return {"tp": tp, "logits_rel_err_max": err, "greedy_identical": same, "requests": len(prompts),
            "pages_kv_after": res[tp][2], "ok": err < 1e-4 and same == len(prompts) and res[tp][2] == 0}


def speed(tp: int, limits) -> list:
    rows = []
    for t in (1, tp):
        t0 = time.time()
        llm = LLM("llama-7b", tp=t, max_rank=8, max_running=128, max_batch_tokens=512, max_model_len=576,
                  mem_fraction=0.5)
        fill_pool_random(llm.engine.pool)
        print(f"tp={t}: engine ready in {time.time() - t0:.0f}s", flush=True)
        for batch in (32, 128):
            for mode in ("none", "distinct"):
                row = decode_row(llm, batch, 512, mode, 8, 20, limits, "llama-2-7b")
                row["tp"] = t
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("tp", "batch", "adapters", "tokens_per_s", "step_ms")}),
                      flush=True)
        del llm
        gc.collect()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    tp = jax.device_count()
    if tp < 2:
        sys.exit(f"needs at least 2 devices, found {tp}")
    os.makedirs(args.out, exist_ok=True)
    report = {"device": common.device_name(), "devices": tp, "commit": common.git_commit()}
    limits = None if args.skip_speed else common.device_limits()  # first, while the devices are empty
    report["correctness"] = correctness(tp)
    print(json.dumps(report["correctness"]), flush=True)
    if not args.skip_speed:
        report["decode"] = speed(tp, limits)
    common.write_json(os.path.join(args.out, "tp_check.json"), report)
    sys.exit(0 if report["correctness"]["ok"] else 1)


if __name__ == "__main__":
    main()
