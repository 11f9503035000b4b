"""Adapter memory per device and LoRA collective traffic of the two tensor-parallel adapter layouts
(EngineConfig.lora_tp), computed from the pool layout the engine uses (slora_jax/memory/layout.py); no
accelerator needed. docs/tensor_parallel.md quotes its output.

    python benchmarks/tp_layout_table.py [--ranks 8 64] [--tp 2 4 8] [--dtype-bytes 2] [--segments 32]

Per model, rank and tp, for one adapter on all seven modules:
- adapter MiB per device: the adapter's pool rows (padding included) times the device's W/tp columns,
  over all layers. A step's LoRA kernels read all of them once per layer for every adapter in the
  batch, so this is also the HBM bytes a step reads per adapter it serves.
- as KV tokens: that memory in tokens of KV cache per device (2 * L * W/tp elements per token), i.e. how
  many tokens of context a resident adapter displaces from the pool they share.
- LoRA all-reduces per step and their payload per token: "sharded" psums every shrink's float32
  [M, T, R] result (q,k,v together, o, gate/up together, down: 4 per layer, 7 * R floats per token per
  layer); "replicated" adds none. The base model's own (2 per layer, [T, hidden] in the model dtype) are
  given for scale: they are the same in both layouts.
- host MiB: the adapter's buffer in the host store, packed for the pool (every device's columns, so
  tp times the MiB per device): what a registered adapter costs in host memory, resident or not.
- index KiB/step: the int32 pool-row tables of one step's LoRA kernels ([NS, R, K] per module and half,
  R = the rank as max_rank) for `--segments` adapters in the batch; every device receives them whole.
  They grow with K, so with the replicated halves' many pool rows per matrix row.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slora_jax.config import LORA_MODULES, load_model_config  # noqa: E402
from slora_jax.memory import layout  # noqa: E402

MODELS = (("Llama-2-7B", "llama-7b"), ("Llama-3.1-8B", "llama3-8b"), ("Llama-3.1-70B", "llama-70b"))
MIB = 2 ** 20
SHRINK_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def adapter_bytes_per_device(cfg, rank: int, tp: int, lora_tp: str, dtype_bytes: int) -> int:
    rows = layout.num_rows(cfg, {m: rank for m in LORA_MODULES}, tp, lora_tp)
    return rows * cfg.num_layers * (layout.row_width(cfg) // tp) * dtype_bytes


def kv_bytes_per_token_per_device(cfg, tp: int, dtype_bytes: int) -> int:
    return 2 * cfg.num_layers * (layout.row_width(cfg) // tp) * dtype_bytes


def lora_collectives(cfg, rank: int, lora_tp: str, tp: int) -> tuple[int, int]:
    """(all-reduces per step, payload bytes per token) that LoRA on all seven modules adds."""
    if lora_tp == "replicated" or tp == 1:
        return 0, 0
    return len(SHRINK_GROUPS) * cfg.num_layers, sum(len(g) for g in SHRINK_GROUPS) * rank * 4 * cfg.num_layers


def index_table_bytes(cfg, rank: int, tp: int, lora_tp: str, segments: int) -> int:
    return sum(segments * rank * (k_in + k_out) * 4 for k_in, k_out in layout.all_module_rows(cfg, tp, lora_tp))


def rows(ranks, tps, dtype_bytes: int, segments: int):
    for label, preset in MODELS:
        cfg, _ = load_model_config(preset)
        for rank in ranks:
            one = adapter_bytes_per_device(cfg, rank, 1, "sharded", dtype_bytes)
            for tp in tps:
                out = {"model": label, "rank": rank, "tp": tp, "single_device_mib": one / MIB}
                for lt in ("sharded", "replicated"):
                    b = adapter_bytes_per_device(cfg, rank, tp, lt, dtype_bytes)
                    n, payload = lora_collectives(cfg, rank, lt, tp)
                    out[lt] = {"mib": b / MIB, "host_mib": tp * b / MIB, "kv_tokens": b / kv_bytes_per_token_per_device(cfg, tp, dtype_bytes),
                               "all_reduces": n, "kib_per_token": payload / 1024,
                               "index_kib": index_table_bytes(cfg, rank, tp, lt, segments) / 1024}
                out["base_all_reduces"] = 2 * cfg.num_layers
                out["base_kib_per_token"] = 2 * cfg.num_layers * cfg.hidden_size * dtype_bytes / 1024
                yield cfg, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--dtype-bytes", type=int, default=2, help="adapter and activation element size (bf16: 2)")
    ap.add_argument("--segments", type=int, default=32, help="distinct adapters in a step (index tables)")
    args = ap.parse_args(argv)
    by_model: dict = {}
    for cfg, r in rows(args.ranks, args.tp, args.dtype_bytes, args.segments):
        by_model.setdefault(r["model"], (cfg, []))[1].append(r)
    for label, (cfg, rs) in by_model.items():
        print(f"\n### {label}: hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, {cfg.num_layers} "
              f"layers, {cfg.num_heads}/{cfg.num_kv_heads} heads, pool row W = {layout.row_width(cfg)}\n")
        print("Memory per adapter (sharded / replicated):\n")
        print("| rank | tp | one device MiB | MiB per device | replicated / sharded | as KV tokens per device | "
              "host MiB |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in rs:
            s_, p_ = r["sharded"], r["replicated"]
            print(f"| {r['rank']} | {r['tp']} | {r['single_device_mib']:.1f} | {s_['mib']:.1f} / {p_['mib']:.1f} | "
                  f"{p_['mib'] / s_['mib']:.2f}x | {s_['kv_tokens']:.0f} / {p_['kv_tokens']:.0f} | "
                  f"{s_['host_mib']:.0f} / {p_['host_mib']:.0f} |")
        print(f"\nPer step (sharded / replicated); the base model's own: {rs[0]['base_all_reduces']} all-reduces, "
              f"{rs[0]['base_kib_per_token']:.0f} KiB per token:\n")
        print(f"| rank | tp | LoRA all-reduces | LoRA all-reduce KiB per token | adapter HBM MiB read per device "
              f"({args.segments} adapters) | index table KiB ({args.segments} adapters) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in rs:
            s_, p_ = r["sharded"], r["replicated"]
            n = args.segments
            print(f"| {r['rank']} | {r['tp']} | {s_['all_reduces']} / {p_['all_reduces']} | "
                  f"{s_['kib_per_token']:.1f} / {p_['kib_per_token']:.1f} | {n * s_['mib']:.0f} / {n * p_['mib']:.0f} | "
                  f"{s_['index_kib']:.0f} / {p_['index_kib']:.0f} |")


if __name__ == "__main__":
    main()
