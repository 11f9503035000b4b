"""Engine decode throughput on the GPU: Llama-2-7B and Llama-3.1-8B shapes, random weights, paged pool, LoRA.

Each row times full engine decode steps (host batch building + the jitted step
+ reading the sampled tokens back), the loop a serving engine runs, at a fixed
context, for batch 32 / 64 / 128 / 256 with no adapter, one rank-8 adapter for
every row, and a distinct adapter per row of rank 8 and of rank 64. Prefill is
skipped: the sequences' pages are allocated and the pool is filled with random
values, so each step reads exactly what a real decode step reads (K/V of
`context` tokens per sequence, all weights, the distinct adapters' rows)
without spending the lease on prefill compiles. A row whose K/V and adapters
do not fit the pool of this device is skipped and listed (so an 80 GB card
runs what it can hold and a larger one runs everything).

Roofline: the fewest bytes a step must move (every weight read once but the
embedding table, of which only the batch's rows; the distinct adapters' rows
once; the K/V of every sequence once; activations in and out: the embedding
rows, the new K/V written, the logits written) over the step time, divided by
the device's read limit measured at the start of the run (common.device_limits:
`read_roofline_fraction`) and by its copy bandwidth (`copy_roofline_fraction`).
The HF PEFT baseline (Llama-2-7B only) runs in a subprocess (torch and JAX in
one process would fight over device memory).

    python benchmarks/bench_decode.py --out $OUT [--models llama-7b,llama3-8b] [--batches 32,256]
        [--command-buffers default|off|on] [--skip-peft] [--quick]

Rows go to <out>/decode.json, merged with the rows of other models already there.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
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
from slora_jax.config import COMMAND_BUFFERS  # noqa: E402
from slora_jax.engine.request import Request  # noqa: E402
from slora_jax.engine.scheduler import ScheduledStep  # noqa: E402
from slora_jax.memory import layout  # noqa: E402
from slora_jax.memory.pages import OutOfPages  # noqa: E402

# preset -> (the model's name in result rows, [(batch, context)])
MODELS = {
    "llama-7b": ("llama-2-7b", [(32, 512), (64, 512), (128, 512), (256, 256)]),
    "llama3-8b": ("llama-3.1-8b", [(32, 512), (64, 512), (128, 512), (256, 512)]),
    "tiny": ("tiny", [(4, 32), (8, 32)]),  # --quick: checks the script on a CPU
}


def modes(ranks: list) -> list:
    """(adapters, rank) of a batch's rows: none, one adapter for all, a distinct one per row at each rank."""
    return [("none", 0), ("one", ranks[0])] + [("distinct", r) for r in ranks]


def fill_pool_random(pool) -> None:
    """Random bf16 in every layer of the pool, one donated layer write at a time (never on zeros)."""
    def fill(arr, layer, key):  # drawn in the pool's dtype: a float32 layer would be a large temporary
        val = jax.random.normal(key, arr.shape[1:], arr.dtype) * jnp.asarray(0.5, arr.dtype)
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
        if missing:  # one host buffer aliased by all (a swap-in copies each adapter's bytes all the same)
            llm.add_synthetic_adapters(missing, rank, shared=True)
    reqs = []

    def dispatch():
        """Build and launch one step; returns its sampled tokens, still on the device."""
        inp, samp, _ = eng.builder.build(step)
        toks, eng.pool.array = eng.runner.step(eng.pool.array, inp, samp)
        return toks

    try:
        for b in range(batch):
            a = names[b % len(names)] if names else None
            r = Request(f"d{b}", 10_000_000 + b, [1] * context, a, SamplingParams(max_tokens=10_000, ignore_eos=True),
                        b)
            if not eng.scheduler.admit_now(r):  # changes nothing when it says no (then nothing to free)
                raise OutOfPages(context, eng.pages.free_count, eng.cache.evictable_pages(), "decode batch")
            r.num_computed = context - 1
            reqs.append(r)
            if a and len(reqs) % 16 == 0:  # bound the device memory of swap-ins in flight (each a staged copy)
                jax.block_until_ready(eng.pool.array)
        step = ScheduledStep(reqs, [1] * batch, [], [])
        yield dispatch, names, step
    finally:
        for r in reqs:
            eng.scheduler.release(r, cache=False)  # its K/V pages hold no real prefill: never cache them
        for name in names:  # the next row's K/V pages are allocated directly, without evicting: free them now
            if eng.cache.is_resident(name):
                eng.cache.evict(name)


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


def pages_needed(llm, batch: int, context: int, mode: str, rank: int) -> int:
    """Pool pages a row takes: the K/V of its sequences and its adapters' rows."""
    lay = llm.engine.layout
    n_adapters = {"none": 0, "one": 1}.get(mode, batch)
    rows = lay.adapter_rows({m: rank for m in ("q_proj", "k_proj", "v_proj", "o_proj")}) if n_adapters else 0
    return batch * lay.kv_pages(context) + n_adapters * (lay.adapter_pages(rows) if rows else 0)


def step_bytes(cfg, batch: int, context: int, adapter_rows: int, itemsize: int = 2) -> int:
    """The fewest bytes one decode step moves: weights read once (of the embedding table only the batch's
    rows), the distinct adapters' rows once, every sequence's K/V once, activations in (embedding rows)
    and out (the new K/V, float32 logits)."""
    w = layout.row_width(cfg)
    weights = cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    kv_read = batch * context * cfg.num_layers * 2 * w
    acts = batch * cfg.hidden_size + batch * cfg.num_layers * 2 * w
    return (weights + adapter_rows * cfg.num_layers * w + kv_read + acts) * itemsize + batch * cfg.vocab_size * 4


def decode_row(llm, batch, context, mode, rank, steps, limits, model):
    eng = llm.engine
    cfg = llm.model_cfg
    with decode_batch(llm, batch, context, mode, rank) as (dispatch, names, step):
        tc = time.perf_counter()
        np.asarray(dispatch())  # compile (if warm-up did not) and swap-ins
        np.asarray(dispatch())
        first_s = time.perf_counter() - tc
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
        adapter_rows = sum(eng.store.get(x).n_rows for x in names)
    moved = step_bytes(cfg, batch, context, adapter_rows)
    return {
        "model": model, "batch": batch, "adapters": mode, "rank": rank if mode != "none" else 0,
        "context": context, "tokens_per_s": batch / dt, "step_ms": dt * 1e3, "step_ms_sync": dt_sync * 1e3,
        "host_build_ms": host * 1e3, "first_steps_s": first_s, **limits.fractions(moved, dt),
        "bytes_per_step": moved, **limits.row_fields(), "device": common.device_name(),
        "kernels": eng.runner.kernels.name, "git_commit": common.git_commit(),
        "xla_options": eng.runner.compiler_options,
    }


def build_llm(preset: str, rows_spec, ranks, quick: bool, command_buffers: str = "default"):
    """The model with a pool sized for the batches of `rows_spec`; every decode bucket they use compiled."""
    max_b = max(b for b, _ in rows_spec)
    max_ctx = max(c for _, c in rows_spec)
    extra = {"num_pages": 256, "dtype": "float32"} if quick else {"mem_fraction": 0.90}
    llm = LLM(preset, max_rank=max(ranks), max_running=max_b, max_batch_tokens=max(max_b, 512),
              max_model_len=max_ctx + 64, command_buffers=command_buffers, **extra)
    eng = llm.engine
    fill_pool_random(eng.pool)
    for rank in ranks:  # registered before the compiles: the adapters' target modules shape the LoRA programs
        llm.add_synthetic_adapters([f"r{rank}-{i}" for i in range(max_b)], rank, shared=True)
    t = time.time()
    examples = [eng.builder.dummy(True, b, lora) for b in sorted({b for b, _ in rows_spec}) for lora in (False, True)]
    n = eng.runner.precompile(eng.pool.array, examples)
    print(f"{preset}: {eng.pages.num_pages} pages, pool {llm.stats()['pool_bytes'] / 2**30:.1f} GiB, "
          f"kernels={llm.stats()['kernels']}; {n} step programs compiled in {time.time() - t:.1f}s", flush=True)
    return llm


def bench_model(preset, args, limits, ranks) -> tuple[list, list]:
    """(rows, skipped rows) of one model preset."""
    model, rows_spec = MODELS[preset]
    if args.batches:
        keep = {int(b) for b in args.batches.split(",")}
        rows_spec = [(b, c) for b, c in rows_spec if b in keep]
    llm = build_llm(preset, rows_spec, ranks, args.quick, args.command_buffers)
    rows, skipped = [], []
    for batch, ctx in rows_spec:
        for mode, rank in modes(ranks):
            need = pages_needed(llm, batch, ctx, mode, rank)
            if need > llm.engine.pages.num_pages:
                skipped.append(f"{model} batch {batch} {mode} rank {rank}: {need} pages, the pool has "
                               f"{llm.engine.pages.num_pages}")
                print("SKIP", skipped[-1], flush=True)
                continue
            row = decode_row(llm, batch, ctx, mode, rank, args.steps, limits, model)
            row["command_buffers"] = args.command_buffers
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            save(args.out, rows)  # partial results survive a timeout
    del llm
    gc.collect()
    return rows, skipped


def save(out: str, rows: list) -> None:
    """Write decode.json: these rows, and the rows of other models already in the file."""
    path = os.path.join(out, "decode.json")
    models = {r["model"] for r in rows}
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            try:
                kept = [r for r in json.load(f) if r.get("model") not in models]
            except (json.JSONDecodeError, AttributeError):
                kept = []
    common.write_json(path, kept + common.rebase_read_limit(rows))


def peft_baseline(args, rows) -> None:
    """HF PEFT decode (Llama-2-7B, batch 32) in a subprocess; its ratio goes into the matching rows."""
    res = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "peft_decode.py"),
                          "--out", args.out], env=dict(os.environ), capture_output=True, text=True, timeout=420)
    print(res.stdout[-3000:], res.stderr[-3000:], flush=True)
    peft_path = os.path.join(args.out, "peft_decode.json")
    if not os.path.exists(peft_path):
        return
    with open(peft_path) as f:
        peft = json.load(f)
    for row in rows:
        ref = peft.get(row["adapters"])
        if ref and row["model"] == "llama-2-7b" and row["batch"] == peft.get("batch"):
            row["speedup_vs_peft"] = row["tokens_per_s"] / ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--models", default="llama-7b,llama3-8b", help="presets, of " + ", ".join(MODELS))
    ap.add_argument("--batches", default=None, help="only these batches (comma-separated)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ranks", default="8,64")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU: checks the script runs")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--command-buffers", default="default", choices=sorted(COMMAND_BUFFERS),
                    help="XLA command buffers (CUDA graphs) for the step programs (slora_jax.config.COMMAND_BUFFERS)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    presets = args.models.split(",")
    if args.quick:
        presets, args.steps, args.ranks = ["tiny"], 2, "4"
    ranks = [int(r) for r in args.ranks.split(",")]
    limits = common.device_limits(smoke=args.quick)  # first, while the device is empty
    all_rows, skipped = [], []
    for preset in presets:
        rows, skip = bench_model(preset, args, limits, ranks)
        all_rows += rows
        skipped += skip
    if not args.skip_peft and not args.quick and "llama-7b" in presets:
        peft_baseline(args, all_rows)
        save(args.out, all_rows)
    print("\nmodel         batch adapters rank ctx    tok/s  step_ms  read_roof copy_roof speedup_vs_peft")
    for r in all_rows:
        print(f"{r['model']:13s} {r['batch']:5d} {r['adapters']:8s} {r['rank']:4d} {r['context']:4d} "
              f"{r['tokens_per_s']:8.0f} {r['step_ms']:7.2f} {r['read_roofline_fraction']:9.3f} "
              f"{r['copy_roofline_fraction']:9.3f} {r.get('speedup_vs_peft', float('nan')):.1f}")
    for s in skipped:
        print("skipped (does not fit this device's pool):", s)


if __name__ == "__main__":
    main()
