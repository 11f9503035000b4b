"""Why the engine lowers CPython's switch interval for structured output (engine/structured.py), on any CPU.

The engine computes a step's token masks on a worker thread while its own thread does the step's Python
work. llguidance computes outside the GIL, but the worker needs the GIL to start and to return; under the
default 5 ms switch interval it gets it only when the busy thread blocks. This probe submits the masks of
16 JSON-schema matchers to a worker, does `--work-ms` of Python work, then waits for them, and prints the
mean wait under the default interval and under the engine's:

    python benchmarks/probe_mask_gil.py [--work-ms 1.5] [--rounds 50]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.bench_structured import schema, train_tokenizer  # noqa: E402
from slora_jax.engine.structured import JSON_DEFAULTS, SWITCH_INTERVAL_S  # noqa: E402


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-ms", type=float, default=1.5, help="Python work between submitting and waiting")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=8000)
    args = ap.parse_args()
    import llguidance
    from llguidance.numpy import fill_next_token_bitmask_par

    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(args.vocab, 1_500_000, tmp, 1, 2)
    ll_tok = tok.guidance_tokenizer(args.vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema(4)), defaults=JSON_DEFAULTS)
    matchers = [llguidance.LLMatcher(ll_tok, grammar, log_level=0) for _ in range(16)]
    for m in matchers:  # inside a string: the costliest masks of the schema
        for t in ll_tok.tokenize_str('[{"id":12,"kind":"alpha","ok":true,"label":"ab'):
            assert m.consume_token(t)
    executor, rows = llguidance.LLExecutor(), [(m, i) for i, m in enumerate(matchers)]
    out = np.full((len(rows), (args.vocab + 31) // 32), -1, np.int32)

    def masks():
        fill_next_token_bitmask_par(executor, rows, out)

    t = time.perf_counter()
    for _ in range(args.rounds):
        masks()
    alone = (time.perf_counter() - t) / args.rounds
    worker = concurrent.futures.ThreadPoolExecutor(1)
    print(f"masks of {len(rows)} rows alone: {alone * 1e3:.3f} ms; then {args.work_ms} ms of Python work beside them:")
    for interval in (0.005, SWITCH_INTERVAL_S):
        sys.setswitchinterval(interval)
        waits = []
        for _ in range(args.rounds):
            f = worker.submit(masks)
            busy(args.work_ms / 1e3)
            t = time.perf_counter()
            f.result()
            waits.append(time.perf_counter() - t)
        print(f"  switch interval {interval * 1e3:.1f} ms: waited {np.mean(waits) * 1e3:.3f} ms on average "
              f"(max {np.max(waits) * 1e3:.3f})")


if __name__ == "__main__":
    main()
