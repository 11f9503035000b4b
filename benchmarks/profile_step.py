"""Where a decode step's device time goes: a jax.profiler trace of engine decode steps, summed per kernel.

Llama-2-7B shape (or `--model llama3-8b`, Llama-3.1-8B; random bf16 weights), one decode batch per
`--batches` entry (bench_decode.decode_batch) with and without LoRA; `--steps` steps are traced after
warm-up. `--command-buffers off|on` profiles the step with XLA command buffers (CUDA graphs) set so
(EngineConfig.command_buffers, slora_jax.config.COMMAND_BUFFERS); XLA captures them from its thunks,
after the HLO passes, so the HLO counts do not show them: the launch gaps in the trace do. The Perfetto trace's device-side events are summed by
name and by kind (GEMM, Pallas LoRA, attention, other fusions, copies), per step. The kernel counts
say how many launches LoRA adds per layer; their times say what each costs.

    python benchmarks/profile_step.py --out $OUT [--model llama3-8b] [--batches 32,256] [--mode distinct]
        [--rank 8] [--tp 2] [--command-buffers on]

Writes <out>/profile_step[_<model>][_tp<N>][_cb-<setting>].json: {device, model, tp, rows}.

With --tp N (N GPUs), every device's events are summed: launches and us per step are over all N
devices, and the collectives (NCCL all-reduces) get a kind of their own.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bench_decode import decode_batch, fill_pool_random, pipelined_step_s  # noqa: E402
from slora_jax import LLM  # noqa: E402
from slora_jax.config import COMMAND_BUFFERS  # noqa: E402
from slora_jax.engine.runner import step_compiler_options  # noqa: E402

# XLA's GPU trace names a psum's all-reduce after the op ("psum_917_0_fusion_1")
KINDS = (("collective", ("all-reduce", "allreduce", "all_reduce", "nccl", "psum")),
         ("lora", ("lora", "shrink", "expand")), ("attention", ("attention", "paged")),
         ("gemm", ("gemm", "cublas", "cutlass", "sm90", "dot", "matmul")),
         ("copy", ("copy", "memcpy", "memset", "transpose")))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(x in low for x in keys)), "other")


def kernel_table(events, steps: int, top_n: int = 30) -> dict:
    """Device events summed per kernel kind and per kernel name, per step: {"kinds": ..., "top": ...}."""
    by_name: dict = collections.defaultdict(lambda: [0, 0.0])
    for name, _, dur in events:
        by_name[name][0] += 1
        by_name[name][1] += dur
    kinds: dict = collections.defaultdict(lambda: [0, 0.0])
    for name, (n, us) in by_name.items():
        kinds[kind_of(name)][0] += n
        kinds[kind_of(name)][1] += us
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top_n]
    return {"kinds": {k: {"launches_per_step": n / steps, "us_per_step": us / steps} for k, (n, us) in kinds.items()},
            "top": [{"name": k, "launches_per_step": n / steps, "us_per_step": us / steps} for k, (n, us) in top]}


def print_kernels(table: dict, top_n: int) -> None:
    for k, v in sorted(table["kinds"].items(), key=lambda kv: -kv[1]["us_per_step"]):
        print(f"  {k:10s} {v['launches_per_step']:7.1f} launches {v['us_per_step']:9.1f} us")
    for t in table["top"][:top_n]:
        print(f"    {t['us_per_step']:9.1f} us  x{t['launches_per_step']:5.1f}  {t['name'][:90]}")


def hlo_counts(llm, step) -> dict:
    """What the compiled step is made of: its optimized HLO's fusions, custom calls (the Pallas
    kernels, cuBLAS) and command buffers (CUDA graphs: launches the host does not pay one by one)."""
    eng = llm.engine
    inp, samp, _ = eng.builder.build(step)
    text = eng.runner.lower(eng.pool.array, inp, samp).compile().as_text()
    ops = re.findall(r"= \S+ (fusion|custom-call|call|command-buffer)\(", text)
    return {"fusions": ops.count("fusion"), "custom_calls": ops.count("custom-call"), "calls": ops.count("call"),
            "command_buffer_mentions": len(re.findall(r"command.buffer", text))}


def profile(llm, batch, context, mode, rank, steps) -> dict:
    """One decode batch's traced steps, summed per kernel name and per kind."""
    with decode_batch(llm, batch, context, mode, rank) as (dispatch, _, step):
        for _ in range(3):
            np.asarray(dispatch())  # compile, warm
        tmp = tempfile.mkdtemp()
        with jax.profiler.trace(tmp, create_perfetto_trace=True, profiler_options=common.device_only_profile()):
            wall = pipelined_step_s(dispatch, steps)
        hlo = hlo_counts(llm, step)
    events = common.device_events(tmp)
    busy, span = common.busy_and_span(events)
    return {"batch": batch, "context": context, "adapters": mode, "rank": rank if mode != "none" else 0,
            "steps": steps, "device_us_per_step": sum(dur for _, _, dur in events) / steps,
            # wall: the engine's one-step-behind loop, under the profiler; idle: device gaps inside it
            "wall_us_per_step": wall * 1e6, "busy_us_per_step": busy / steps,
            "idle_us_per_step": (span - busy) / steps, "hlo": hlo, **kernel_table(events, steps)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--batches", default="32", help="decode batches to profile (comma-separated)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--mode", default="distinct", choices=("one", "distinct"))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (that many devices)")
    ap.add_argument("--command-buffers", default="default", choices=sorted(COMMAND_BUFFERS))
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU: checks the script runs")
    args = ap.parse_args()
    extra = {"num_pages": 256, "dtype": "float32"} if args.quick else {"mem_fraction": 0.5}
    preset = args.model
    if args.quick:
        args.model, args.batches, args.context, args.rank = "tiny", "4", 32, 4
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(args.model, max_rank=args.rank, max_running=max(batches), max_batch_tokens=max(max(batches), 256),
              max_model_len=args.context + 64, tp=args.tp,
              command_buffers=args.command_buffers, **extra)
    fill_pool_random(llm.engine.pool)
    rows = [profile(llm, batch, args.context, mode, args.rank, args.steps)
            for batch in batches for mode in ("none", args.mode)]
    os.makedirs(args.out, exist_ok=True)
    name = ("profile_step" + ("" if preset == "llama-7b" else f"_{preset}") + (f"_tp{args.tp}" if args.tp > 1 else "")
            + ("" if args.command_buffers == "default" else f"_cb-{args.command_buffers}")
            + "".join(f"_{k.removeprefix('xla_gpu_enable_').replace('_', '-')}-{'on' if v else 'off'}"
                      for k, v in step_compiler_options().items()) + ".json")
    common.write_json(os.path.join(args.out, name), {
        "device": common.device_name(), "model": llm.model_cfg.name, "tp": args.tp,
        "command_buffers": args.command_buffers, "xla_options": llm.engine.runner.compiler_options,
        "git_commit": common.git_commit(),
        "step_compiler_options": step_compiler_options(),
        "rows": rows})
    print(f"wrote {name}")
    for r in rows:
        print(f"\nbatch {r['batch']} adapters {r['adapters']} rank {r['rank']}: "
              f"{r['device_us_per_step']:.0f} us of device events per step, wall {r['wall_us_per_step']:.0f} us, "
              f"device idle {r['idle_us_per_step']:.0f} us; HLO {r['hlo']}")
        print_kernels(r, 12)


if __name__ == "__main__":
    main()
