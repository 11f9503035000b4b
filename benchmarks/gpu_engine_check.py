"""End-to-end check on the GPU: the engine with Pallas kernels equals the engine with the XLA references.

Tiny model, mixed adapters of different ranks and targets: logits (float32 and bfloat16) and greedy
tokens of a mixed batch through prefill chunks and decode steps. Exits non-zero on a mismatch.
    python benchmarks/gpu_engine_check.py
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from slora_jax import LLM, SamplingParams  # noqa: E402
from slora_jax.config import LORA_MODULES  # noqa: E402

TARGETS = [("q_proj", "v_proj"), LORA_MODULES, ("o_proj", "down_proj"), ("k_proj", "gate_proj", "up_proj")]


def build(kernels, dtype, tp=1):
    """The tiny model with 6 adapters of ranks 1-64 over 4 target sets (the same weights for any tp)."""
    llm = LLM("tiny", tp=tp, kernels=kernels, dtype=dtype, max_rank=64, num_pages=2048, page_rows=16, max_model_len=256,
              max_running=32, max_batch_tokens=256)
    rng = np.random.default_rng(0)
    cfg = llm.model_cfg
    for i, rank in enumerate([1, 3, 8, 16, 33, 64]):
        params = {f"{layer}.{m}": (rng.normal(0, 0.05, cfg.module_shape(m)[:1] + (rank,)),
                                   rng.normal(0, 0.05, (rank, cfg.module_shape(m)[1])))
                  for layer in range(cfg.num_layers) for m in TARGETS[i % 4]}
        llm.add_adapter(f"a{i}", params, alpha=2.0 * rank)
    return llm


def main():
    ok = True
    rng = np.random.default_rng(1)
    prompts = [[256] + rng.integers(0, 256, rng.integers(1, 200)).tolist() for _ in range(40)]
    adapters = [None if i % 5 == 0 else f"a{i % 6}" for i in range(40)]
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 2e-2)):  # float32 runs at "highest" precision
        t0 = time.time()
        res = {}
        for kernels in ("xla", "pallas"):
            llm = build(kernels, dtype)
            lg = [llm.logits(p, adapter=a) for p, a in zip(prompts[:6], adapters[:6])]
            outs = llm.generate(prompts, adapter=adapters, sampling=SamplingParams(max_tokens=12, ignore_eos=True))
            res[kernels] = (lg, [o.token_ids for o in outs], llm.stats())
        errs = [np.linalg.norm(a - b) / np.linalg.norm(a) for a, b in zip(res["xla"][0], res["pallas"][0])]
        same = sum(x == y for x, y in zip(res["xla"][1], res["pallas"][1]))
        good = max(errs) < tol and (dtype != "float32" or same == len(prompts))
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} {dtype}: logits rel err max {max(errs):.2e} (tol {tol}); "
              f"greedy sequences identical {same}/{len(prompts)}; pages_kv after: {res['pallas'][2]['pages_kv']}; "
              f"{time.time() - t0:.0f}s", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
