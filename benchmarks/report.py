"""Write the kernel / decode / swap sections of BENCHMARKS.md (tables + plots) from benchmarks/results/*.json.

    python benchmarks/report.py [--results benchmarks/results] [--md BENCHMARKS.md]

The S-LoRA workload section is written by `python -m slora_jax.bench.report`; each generator
replaces only its own marked section.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

START, END = "<!-- gpu-micro:start -->", "<!-- gpu-micro:end -->"
# Punica-style BGMV Triton kernels (vLLM V0 / LoRAX), CUDA-graph timed on this H200 (ANCHORS.md), us
PUNICA = {(8, 32): 12.4, (8, 128): 37.6, (8, 512): 138.7, (16, 32): 10.6, (16, 128): 29.9, (16, 512): 107.4,
          (64, 32): 21.6, (64, 128): 75.5, (64, 512): 283.5}
# HF transformers + PEFT on this H200 (ANCHORS.md): batch 32, input 256, output 128, tokens/s
PEFT = {"none": 1394.0, "one": 658.0, "distinct": 45.5}


def _save(fig, ax, path, xlabel, ylabel, title):
    """Batch on a log2 x axis, labels, legend; written to `path`."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _load(path):
    with open(path) as f:
        return json.load(f)


def lora_section(rows, plots):
    dec = [r for r in rows if r["phase"] == "decode" and r["kernel"] in ("pallas", "xla")]
    by = {(r["kernel"], r["rank"], r["batch"]): r for r in dec}
    out = ["### Segmented LoRA kernels (shrink + expand of one 4096-wide projection, all-distinct adapters)", "",
           "| rank | batch | Pallas us | Pallas device us (shrink + expand) | XLA us | XLA device us | Punica BGMV us (peer) | "
           "roofline | device roofline | vs XLA | vs XLA, device | vs Punica, device |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for rank in (8, 16, 64):
        xs, ys, ps = [], [], []
        for b in (32, 128, 512):
            p, x = by.get(("pallas", rank, b)), by.get(("xla", rank, b))
            if not p:
                continue
            peer = PUNICA.get((rank, b))
            pd, xd = p.get("device_us"), x.get("device_us")
            split = (f" ({p['device_us_shrink']:.1f} + {p['device_us_expand']:.1f})"
                     if "device_us_shrink" in p else "")
            out.append(f"| {rank} | {b} | {p['time_us']:.1f} | {_fmt(pd, '.1f')}{split} | {x['time_us']:.1f} | "
                       f"{_fmt(xd, '.1f')} | {peer} | {p['roofline_fraction']:.2f} | "
                       f"{_fmt(p.get('device_roofline_fraction'), '.2f')} | {x['time_us'] / p['time_us']:.2f}x | "
                       f"{_fmt(xd / pd if pd and xd else None, '.2f')}x | {_fmt(peer / pd if pd else None, '.2f')}x |")
            xs.append(b)
            ys.append(pd or p["time_us"])
            ps.append(peer)
        ax.plot(xs, ys, "o-", label=f"ours r{rank} (device)")
        ax.plot(xs, ps, "x--", label=f"Punica r{rank}")
    _save(fig, ax, os.path.join(plots, "lora_decode.png"), "batch (tokens, each its own adapter)", "us",
          "LoRA decode shrink+expand, H200")
    pre = [r for r in rows if r["phase"] == "prefill" and r["kernel"] == "pallas"]
    if pre:
        out += ["", "Prefill, 4 segments x 512 tokens: " + ", ".join(
            f"rank {r['rank']}: {r['time_us']:.1f} us ({r['speedup_vs_xla']:.1f}x XLA)" for r in pre) + "."]
    out += ["", "`us`: per call of 20 calls unrolled inside one jit, the calls rotating among sets of adapter "
            "rows larger than the L2 cache (host launch gaps included). `device us`: every kernel of a call "
            "(the LoRA kernels and XLA's y + delta add; the reference's gathers and products) from a profiler "
            "trace of the same program: the figure comparable to Punica's CUDA-graph timing. `roofline`: "
            "bytes (x, each distinct A and B row once, y read and written) over the time, divided by the HBM "
            "copy bandwidth measured in the same run.",
            "", "![LoRA decode](benchmarks/plots/lora_decode.png)", ""]
    return out


def lora_sweep_section(rows):
    """Per sweep shape and kernel: the defaults' device time and the best variant's (kernels_lora_sweep.json)."""
    shapes = {}
    for r in rows:
        if "-sweep-" in r["phase"] and r.get("device_us_shrink") is not None:
            kind = r["phase"].rsplit("-", 1)[1]
            shapes.setdefault((r["phase"].split("-")[0], r["batch"], r["rank"], kind), []).append(r)
    if not shapes:
        return []
    commit = rows[0].get("git_commit") or "see kernels_lora_sweep.log"
    out = [f"Tunables sweep (`kernels_lora_sweep.json`, {commit}): each kernel's device time with its defaults "
           "and with the best variant tried (each variant changes one tunable; the other kernel keeps its defaults).",
           "", "| phase | batch | rank | kernel | defaults us | best variant | its us |", "|---|---|---|---|---|---|---|"]
    for (phase, b, rank, kind), part in sorted(shapes.items()):
        key = f"device_us_{kind}"
        base = next((r[key] for r in part if r["kernel"] == kind), None)
        best = min(part, key=lambda r: r[key])
        out.append(f"| {phase} | {b} | {rank} | {kind} | {_fmt(base, '.1f')} | "
                   f"{best['kernel'].partition(':')[2] or 'the defaults'} | {best[key]:.1f} |")
    return out + [""]


def attention_section(rows, plots):
    dec = [r for r in rows if r["phase"].startswith("decode") and "sweep" not in r["phase"]
           and r["kernel"] in ("pallas", "upstream")]
    by = {(r["kernel"], r["batch"], r["context"], r.get("heads", "")): r for r in dec}
    out = ["### Paged decode attention (Llama-7B MHA: 32 heads x 128, page 16; GQA: 32/8 heads)", "",
           "| heads | batch | context | ours us | ours GB/s | roofline | jax upstream us | vs upstream |",
           "|---|---|---|---|---|---|---|---|"]
    for (k, b, c, h), r in sorted(by.items(), key=lambda kv: (str(kv[0][3]), kv[0][1], kv[0][2])):
        if k != "pallas":
            continue
        up = by.get(("upstream", b, c, h))
        out.append(f"| {h or 'mha'} | {b} | {c} | {r['time_us']:.0f} | {r['gbps']:.0f} | {r['roofline_fraction']:.2f} | "
                   f"{up['time_us']:.0f} | {up['time_us'] / r['time_us']:.2f}x |" if up else
                   f"| {h or 'mha'} | {b} | {c} | {r['time_us']:.0f} | {r['gbps']:.0f} | {r['roofline_fraction']:.2f} | - | - |")
    return out + [""]


def _peft_elsewhere(rows, peft) -> str:
    """The ratio to PEFT as measured on this GPU by bench_decode.py in another call (peft_decode.json)."""
    ours = [r for r in rows if r["batch"] == peft["batch"] and r["adapters"] == "distinct" and r["rank"] == peft["rank"]]
    if not ours:
        return ""
    how = ("decode steps only" if "none_with_prefill" in peft else
           f"a {peft['output']}-token generate after a {peft['input']}-token prompt, prefill included")
    return (f" HF PEFT as measured on this GPU by the same script in an earlier call (benchmarks/results/"
            f"peft_decode.json; {how}): {peft['distinct']:.1f} tokens/s with {peft['batch']} distinct "
            f"rank-{peft['rank']} adapters, against which batch {peft['batch']} distinct rank {peft['rank']} here is "
            f"{ours[0]['tokens_per_s'] / peft['distinct']:.0f}x.")


def decode_section(rows, plots, peft=None):
    out = ["### Engine decode steps (Llama-7B shape, random bf16 weights, paged pool, Pallas kernels)", "",
           "| batch | adapters | rank | context | tokens/s | step ms | step ms, synchronous | host build ms | roofline "
           "| vs HF PEFT |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {}
    for r in rows:
        if r.get("speedup_vs_peft"):  # HF PEFT measured in the same run (bench_decode.py's subprocess)
            ratio = f"{r['speedup_vs_peft']:.1f}x"
        else:
            anchor = PEFT[r["adapters"]] if r["batch"] == 32 else None
            ratio = f"{r['tokens_per_s'] / anchor:.1f}x (ANCHORS)" if anchor else "-"
        out.append(f"| {r['batch']} | {r['adapters']} | {r['rank']} | {r['context']} | {r['tokens_per_s']:.0f} | "
                   f"{r['step_ms']:.2f} | {_fmt(r.get('step_ms_sync'), '.2f')} | {r['host_build_ms']:.2f} | "
                   f"{r['roofline_fraction']:.2f} | {ratio} |")
        key = f"{r['adapters']}" + (f" r{r['rank']}" if r["rank"] else "")
        series.setdefault(key, []).append((r["batch"], r["tokens_per_s"]))
    for key, pts in series.items():
        ax.plot(*zip(*pts), "o-", label=key)
    ax.set_yscale("log")
    _save(fig, ax, os.path.join(plots, "decode.png"), "batch", "tokens/s", "Llama-7B decode, H200")
    same_run = any(r.get("speedup_vs_peft") for r in rows)
    out += ["", "Engine rows time decode steps at a fixed context as the engine's default loop runs them: step "
            "N + 1 is built and launched before step N's sampled tokens are read back (`step ms`); `step ms, "
            "synchronous` reads each step's tokens before building the next (`--sync-steps`). Roofline: (base "
            "weights + the distinct adapters' rows + the K/V read) per step over the measured HBM copy bandwidth; "
            "a decode step only reads, so it can pass 1.0. " + (
                "The HF PEFT column divides by PEFT's generate tokens/s (batch 32, input 256, random bf16 weights, "
                "rank-8 q,k,v,o adapters, mixed batches through adapter_names) measured in the same script on the "
                "same GPU (benchmarks/results/peft_decode.json" + (
                    f": {peft['none']:.0f} / {peft['one']:.0f} / {peft['distinct']:.1f} tokens/s without LoRA / one "
                    f"adapter / {peft['batch']} distinct adapters, " + (
                        f"decode steps only: the difference of generate calls of 2 + {peft['output']} and 2 new tokens"
                        if "none_with_prefill" in peft else
                        f"{peft['output']} output tokens per request, prefill included") if peft else "")
                + ")." if same_run else
                "The HF PEFT column divides by PEFT's generate tokens/s at batch 32 from ANCHORS.md (1,394 / 658 / "
                "45.5 tokens/s without LoRA / one adapter / 32 distinct adapters), not by a run in the same script."
                + (_peft_elsewhere(rows, peft) if peft else "")),
            "", "![decode](benchmarks/plots/decode.png)", ""]
    return out


def swap_section(d, host=None):
    out = ["### Adapter swap-in (Llama-7B q,k,v,o adapters, pinned host -> pool pages)", "",
           f"Pinned host->device bandwidth measured in the same run: {d['pinned_h2d_gbps']:.1f} GB/s.", "",
           "| rank | adapters at once | MB each | seconds | GB/s | fraction of pinned bandwidth |", "|---|---|---|---|---|---|"]
    for r in d["swaps"]:
        out.append(f"| {r['rank']} | {r['count']} | {r['bytes'] / r['count'] / 2**20:.0f} | {r['seconds']:.4f} | "
                   f"{r['gbps']:.1f} | {r['bandwidth_fraction']:.2f} |")
    h = d.get("host_memory") or host
    out += ["", "Overlap of adapter transfers with compute: a ~30 ms HBM-bound step alone, the transfers alone, and "
                "both dispatched together (after a step: the transfers follow one step; between two steps: they "
                "follow one and precede the next, as a prefetch does in the engine's loop); hidden fraction = time "
                "saved over running them back to back / the shorter of the two (1 = fully hidden).", "",
            "| transfer path | pattern | adapters | MB | step alone ms | transfers alone ms | both ms | hidden fraction |",
            "|---|---|---|---|---|---|---|---|"]
    for o in d["overlap"] if isinstance(d["overlap"], list) else []:
        if "error" in o:
            out.append(f"| {o['how']} | | refused: {o['error']} | | | | | |")
            continue
        out.append(f"| {o['how']} | {o.get('pattern', 'after a step')} | {o['adapters']} | {o['bytes'] / 2**20:.0f} | "
                   f"{o['step_alone_s'] * 1e3:.1f} | "
                   f"{o['transfers_alone_s'] * 1e3:.1f} | {o['both_s'] * 1e3:.1f} | {o['hidden_fraction']:.2f} |")
    out += ["", f"Host store: {h['adapters']} Llama-7B rank-8 adapters registered in {h['seconds']:.0f} s, "
                f"{h['store_bytes'] / 1e9:.1f} GB of pinned buffers ({h['bytes_per_adapter'] / 2**20:.0f} MiB each); "
                f"process RSS grew {h['rss_growth_gb']:.1f} GB.", ""]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--md", default="BENCHMARKS.md")
    ap.add_argument("--plots", default="benchmarks/plots")
    args = ap.parse_args()
    os.makedirs(args.plots, exist_ok=True)
    r = args.results
    lines = [START, "## Kernels, decode and swapping on the H200", ""]
    if os.path.exists(os.path.join(r, "kernels_lora.json")):
        lines += lora_section(_load(os.path.join(r, "kernels_lora.json")), args.plots)
    if os.path.exists(os.path.join(r, "kernels_lora_sweep.json")):
        lines += lora_sweep_section(_load(os.path.join(r, "kernels_lora_sweep.json")))
    if os.path.exists(os.path.join(r, "kernels_attention.json")):
        lines += attention_section(_load(os.path.join(r, "kernels_attention.json")), args.plots)
    if os.path.exists(os.path.join(r, "decode.json")):
        peft = os.path.join(r, "peft_decode.json")
        lines += decode_section(_load(os.path.join(r, "decode.json")), args.plots,
                                _load(peft) if os.path.exists(peft) else None)
    if os.path.exists(os.path.join(r, "swap.json")):
        host = os.path.join(r, "swap_host.json")
        host = _load(host)["host_memory"] if os.path.exists(host) else None
        lines += swap_section(_load(os.path.join(r, "swap.json")), host)
    lines.append(END)
    text = open(args.md).read() if os.path.exists(args.md) else "# Benchmarks\n\n"
    block = "\n".join(lines)
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(args.md, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
