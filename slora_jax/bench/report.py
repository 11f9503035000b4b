"""Benchmark results (benchmarks/results/*.json) -> the generated sections of BENCHMARKS.md and PNG plots.

The one report generator: it runs anywhere (CPU, no JAX needed),

    python -m slora_jax.bench.report [--results benchmarks/results] [--md BENCHMARKS.md] [--plots benchmarks/plots]

and replaces three marked sections of BENCHMARKS.md, leaving the hand-written text around them alone:

- headline (at the top): saturated throughput and LoRA / base-only, the read-roofline fractions of decode,
  the LoRA kernels and decode attention, the maximum sustainable rate; a figure not measured yet says so;
- gpu-micro: the kernel, decode, command-buffer, step-profile, swap and structured-output tables (bench_*.py,
  profile_step.py);
- slora-bench: the S-LoRA workload (`slora-jax bench`): saturated runs, then the offered-load runs with
  S-LoRA's published figures (A100-80GB, req/s, its Table 3) beside them, then the prefix cache on / off
  in the chat setting (chat-prefix.json).

Rows written before the read-limit roofline (issue #16) were measured against a copy's bandwidth only:
they carry `copy_roofline_fraction` (which may exceed 1: a copy is below the read limit) and no read fraction.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Optional

HEADLINE = ("<!-- headline:start -->", "<!-- headline:end -->")
MICRO = ("<!-- gpu-micro:start -->", "<!-- gpu-micro:end -->")
START, END = "<!-- slora-bench:start -->", "<!-- slora-bench:end -->"  # the S-LoRA workload section

# S-LoRA (arXiv 2311.03285) Table 3, A100-80GB, throughput in req/s: setting -> n -> (S-LoRA, HF PEFT)
PAPER = {
    "S1": {5: (8.05, 0.88), 100: (7.99, 0.25), 1000: (7.64, None), 2000: (7.61, None)},
    "S2": {5: (7.48, 0.74), 100: (7.29, 0.24), 1000: (6.69, None), 2000: (6.71, None)},
    "S4": {2: (4.49, 0.54), 100: (4.28, 0.13), 1000: (3.96, None)},
}
SETTING_TITLES = {
    "S1": "S1: Llama-7B, rank 8",
    "S2": "S2: Llama-7B, ranks 64/32/16/8",
    "S4": "S4: Llama-13B, ranks 64/32/16",
    "S1-8B": "S1 on Llama-3.1-8B, rank 8",
}
# Punica-style BGMV Triton kernels (vLLM V0 / LoRAX), CUDA-graph timed (ANCHORS.md), us: device -> (rank, batch)
PUNICA = {
    "H200": {(8, 32): 12.4, (8, 128): 37.6, (8, 512): 138.7, (16, 32): 10.6, (16, 128): 29.9, (16, 512): 107.4,
             (64, 32): 21.6, (64, 128): 75.5, (64, 512): 283.5},
    "H100": {(8, 32): 13.4, (8, 128): 38.8, (8, 512): 140.1, (16, 32): 12.5, (16, 128): 31.1, (16, 512): 109.5,
             (64, 32): 24.5, (64, 128): 79.0, (64, 512): 297.7},
}
# HF transformers + PEFT on the H200 (ANCHORS.md): batch 32, input 256, output 128, tokens/s
PEFT = {"none": 1394.0, "one": 658.0, "distinct": 45.5}
LEGACY_MODEL = "llama-2-7b"  # rows from before rows named their model were all Llama-2-7B shapes


# -- loading -------------------------------------------------------------------------------------
def _load(path: str):
    with open(path) as f:
        return json.load(f)


def _maybe(results_dir: str, name: str):
    path = os.path.join(results_dir, name)
    if not os.path.exists(path):
        return None
    try:
        return _load(path)
    except json.JSONDecodeError:
        return None


def load_results(results_dir: str, saturated: Optional[bool] = None) -> list[dict]:
    """Every `slora-jax bench` result under `results_dir` (`saturated`: only those, or only the others),
    sorted by setting and n."""
    out = []
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        try:
            d = _load(path)
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and "setting" in d and "n_adapters" in d and "throughput_req_s" in d:
            if saturated is None or bool(d.get("saturated")) == saturated:
                out.append(d)
    return sorted(out, key=lambda d: (str(d["setting"]), int(d["n_adapters"])))


def _stale(d: dict) -> Optional[str]:
    """Why a saturated result does not measure its setting, or None: its prompts, which share nothing, found KV
    blocks that an earlier run of the same process left in the prefix cache (results from before each timed
    run started from a cold pool, `run.start_cold`)."""
    e = (d.get("run") or {}).get("engine") or {}
    hit, asked = e.get("prefix_hit_tokens") or 0, e.get("prefix_query_tokens") or 0
    if d.get("saturated") and not d.get("system_prompt_len") and hit and asked:
        return (f"{d['setting']} n = {d['n_adapters']} ({_short_device(d.get('device'))}, `{d.get('git_commit', '?')}`): "
                f"{hit / asked:.0%} of its prompt tokens were served from blocks an earlier run had left cached, so "
                "its req/s and LoRA / base are not the setting's")
    return None


def _struck(stale: Optional[str], value: str) -> str:
    """A figure of a stale result (`stale`: what `_stale` said of it), struck through and marked."""
    return f"~~{value}~~ †" if stale else value


def _stale_notes(rows: list) -> list[str]:
    notes = [n for n in map(_stale, rows) if n]
    return ["", *(f"† {n}." for n in notes)] if notes else []


def _model(row: dict) -> str:
    return row.get("model") or LEGACY_MODEL


def _fractions(row: dict, prefix: str = "") -> tuple:
    """(read, copy) roofline fractions of a row (rows from before the read limit have the copy one only)."""
    return row.get(prefix + "read_roofline_fraction"), row.get(prefix + "copy_roofline_fraction")


def _short_device(d: Optional[str]) -> str:
    return (d or "?").replace("gpu:", "").replace("NVIDIA ", "")


def _peer_table(device: Optional[str]) -> dict:
    return PUNICA["H100"] if "H100" in (device or "") else PUNICA["H200"]


# -- formatting ----------------------------------------------------------------------------------
def _f(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _rate(d: dict) -> str:
    """The max sustainable rate cell: '>= r' where it is only a lower bound."""
    r = d.get("max_sustainable_rate")
    if r is None:
        return "-"
    lower = d.get("max_sustainable_rate_is_lower_bound")
    if lower is None:  # results from before the rising-order search: a lower bound if it is the highest probed
        points = (d.get("rate_search") or {}).get("points") or {}
        lower = r >= max((float(k) for k in points), default=r)
    return f">= {r:g}" if lower else f"{r:g}"


def _meta(rows: list) -> str:
    """'device, commit' of a table's rows (several where they differ)."""
    pairs = sorted({(_short_device(r.get("device")), r.get("git_commit")) for r in rows}, key=str)
    return "; ".join(f"{d}, commit `{c}`" if c else d for d, c in pairs)


def _span(xs: list, fmt: str = "{:.2f}") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    lo, hi = min(xs), max(xs)
    return fmt.format(lo) if abs(hi - lo) < 5e-3 else f"{fmt.format(lo)}-{fmt.format(hi)}"


# -- the headline ----------------------------------------------------------------------------------
def headline_section(results_dir: str) -> list[str]:
    """What issue #16 measures, first: saturated throughput, LoRA / base, read-roofline fractions."""
    out = [HEADLINE[0], "## Headline figures (generated from benchmarks/results by `python -m slora_jax.bench.report`)",
           ""]
    sat = load_results(results_dir, saturated=True)
    out += ["**Saturated throughput** (every request of the trace offered at once: the capacity; LoRA / base = "
            "the same requests through the base model alone, in the same process):", ""]
    if sat:
        out += ["| setting | n adapters | req/s | tokens/s | base only req/s | LoRA / base | max_running | device, commit |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        for d in sat:
            stale = _stale(d)
            out.append(f"| {d['setting']} | {d['n_adapters']} | {_struck(stale, '**' + _f(d['throughput_req_s']) + '**')} | "
                       f"{_f(d.get('tokens_per_s'), '{:.0f}')} | {_f(d.get('base_only_throughput_req_s'))} | "
                       f"{_struck(stale, _f(d.get('lora_vs_base'), '{:.3f}'))} | {d.get('max_running', '-')} | "
                       f"{_meta([d])} |")
        out += _stale_notes(sat)
    else:
        out.append("Not measured yet: `bash benchmarks/device_run.sh s1-sat s1-8b-sat s2-sat` writes "
                   "`<setting>-sat-<n>.json`.")
    out += [""]

    decode = _maybe(results_dir, "decode.json") or []
    measured = [r for r in decode if r.get("read_roofline_fraction") is not None]
    out += ["**Read-roofline fractions** (the fewest bytes the work must move over its time, divided by the "
            "device's read limit measured in the same run: the best of a read-only reduction and a bf16 GEMV "
            "over 8 GiB (about 2 % apart between processes), or the run's fastest read-only kernel where it "
            "read faster; DESIGN.md section 7):", ""]
    lines = []
    for model in sorted({r["model"] for r in measured}):
        rows = [r for r in measured if r["model"] == model and r["adapters"] == "distinct" and r["rank"] == 8]
        if rows:
            lines.append(f"- decode, {model}, distinct rank-8 adapters, batch "
                         f"{'/'.join(str(r['batch']) for r in rows)}: "
                         f"{' / '.join(_f(r['read_roofline_fraction']) for r in rows)} ({_meta(rows)})")
    lora = _maybe(results_dir, "kernels_lora.json") or []
    lrows = [r for r in lora if r.get("kernel") == "pallas" and r.get("phase") == "decode"
             and r.get("device_read_roofline_fraction") is not None and r["batch"] >= 128 and r["rank"] >= 16]
    if lrows:
        lines.append(f"- LoRA shrink + expand, batch >= 128, rank >= 16 (device time): "
                     f"{_span([r['device_read_roofline_fraction'] for r in lrows])} ({_meta(lrows)})")
    att = _maybe(results_dir, "kernels_attention.json") or []
    arows = [r for r in att if r.get("kernel") == "pallas" and str(r.get("phase", "")).startswith("decode")
             and "sweep" not in r["phase"] and r.get("read_roofline_fraction") is not None and r["context"] >= 2048]
    if arows:
        setters = [r for r in att if r.get("sets_read_limit") and r.get("kernel") == "pallas"
                   and str(r.get("phase", "")).startswith("decode") and r["context"] >= 2048]
        at_limit = "".join(f"; batch {r['batch']}, context {r['context']} read {r['gbps'] / 1e3:.2f} TB/s, faster "
                           "than the probes: its rate is the run's read limit" for r in setters)
        lines.append(f"- paged decode attention, context >= 2048: "
                     f"{_span([r['read_roofline_fraction'] for r in arows])}{at_limit} ({_meta(arows)})")
    prows = [r for r in att if r.get("kernel") == "pallas" and r.get("phase") == "prefill"
             and r.get("flop_fraction") is not None]
    if prows:
        lines.append("- prefill attention against the bf16 matmul rate: " + ", ".join(
            f"{r['tokens'] // r['batch']} tokens x {r['batch']} (context {r['context']}) {r['flop_fraction']:.2f}"
            for r in prows) + f" ({_meta(prows)})")
    out += lines or ["Not measured yet: `bash benchmarks/device_run.sh lora-table attention-table decode-7b "
                     "decode-8b` writes rows with `read_roofline_fraction`."]
    out += [""]

    offered = [d for d in load_results(results_dir, saturated=False) if int(d["n_adapters"]) == 2000]
    out += ["**Maximum sustainable rate** at n = 2,000 (SLO attainment >= 0.9, first token < 6 s; rates probed in "
            "rising order up to the first that fails, so '>=' marks a lower bound):", ""]
    capacity = {d["setting"]: d["throughput_req_s"] for d in sat if int(d["n_adapters"]) == 2000}
    if offered:
        out += [f"- {d['setting']}: {_rate(d)} req/s ({_meta([d])})" + _above_capacity(d, capacity) for d in offered]
    else:
        out.append("Not measured yet.")
    out += ["", "The offered-load tables further down replay a trace at a fixed offered rate (10 req/s): their "
            "throughput is bounded by that rate and says nothing of capacity.", "", HEADLINE[1]]
    return out


def _above_capacity(d: dict, capacity: dict) -> str:
    """The caveat for a max rate above the setting's saturated capacity (results from before the search
    was bounded by it): a probe of a few seconds admits up to max_running requests at once, so first
    tokens stay fast while the backlog grows; such a rate holds for the probe, not for long."""
    rate = d.get("max_sustainable_rate")
    cap = (d.get("rate_search") or {}).get("capacity_req_s") or capacity.get(d["setting"])
    if rate is None or cap is None or rate <= cap:
        return ""
    return (f"; above the saturated capacity of {cap:.1f} req/s, so the probe was too short to show the backlog: "
            f"sustainable for its {d['rate_search'].get('probe_s', '?')} s, not for long")


# -- kernels, decode, profiles, swaps --------------------------------------------------------------
def lora_section(rows: list, plots: Optional[str]) -> list[str]:
    dec = [r for r in rows if r["phase"] == "decode" and r["kernel"] in ("pallas", "xla")]
    models = sorted({_model(r) for r in dec}, key=lambda m: (m != LEGACY_MODEL, m))
    out = ["### Segmented LoRA kernels (shrink + expand of one 4096-wide projection, all-distinct adapters)", "",
           f"{_meta(dec)}.", ""]
    fig = ax = None
    if plots:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
    for model in models:
        by = {(r["kernel"], r["rank"], r["batch"]): r for r in dec if _model(r) == model}
        width = next((r.get("pool_width") for r in by.values() if r.get("pool_width")), None)
        out += [f"**{model}**" + (f" (pool width {width})" if width else ""), "",
                "| rank | batch | Pallas us | Pallas device us (shrink + expand) | XLA us | XLA device us | "
                "Punica BGMV us (peer) | read roofline | device read roofline | device copy roofline | vs XLA, "
                "device | vs Punica, device |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for rank in sorted({k[1] for k in by}):
            xs, ys, ps = [], [], []
            for b in sorted({k[2] for k in by if k[1] == rank}):
                p, x = by.get(("pallas", rank, b)), by.get(("xla", rank, b)) or {}
                if not p:
                    continue
                peer = _peer_table(p.get("device")).get((rank, b)) if model == LEGACY_MODEL else None
                pd, xd = p.get("device_us"), x.get("device_us")
                split = (f" ({p['device_us_shrink']:.1f} + {p['device_us_expand']:.1f})"
                         if "device_us_shrink" in p else "")
                read, _ = _fractions(p)
                dread, dcopy = _fractions(p, "device_")
                out.append(f"| {rank} | {b} | {p['time_us']:.1f} | {_fmt(pd, '.1f')}{split} | "
                           f"{_fmt(x.get('time_us'), '.1f')} | {_fmt(xd, '.1f')} | {_fmt(peer, '.1f')} | "
                           f"{_fmt(read, '.2f')} | {_fmt(dread, '.2f')} | {_fmt(dcopy, '.2f')} | "
                           f"{_fmt(xd / pd if pd and xd else None, '.2f')}x | "
                           f"{_fmt(peer / pd if pd and peer else None, '.2f')}x |")
                xs.append(b)
                ys.append(pd or p["time_us"])
                ps.append(peer)
            if ax is not None and xs:
                ax.plot(xs, ys, "o-", label=f"ours {model} r{rank} (device)")
                if any(ps):
                    ax.plot(xs, ps, "x--", label=f"Punica r{rank}")
        out.append("")
    if ax is not None:
        _save(fig, ax, os.path.join(plots, "lora_decode.png"), "batch (tokens, each its own adapter)", "us",
              "LoRA decode shrink+expand")
    pre = [r for r in rows if r["phase"] == "prefill" and r["kernel"] == "pallas"]
    if pre:
        out += ["Prefill, 4 segments x 512 tokens: " + ", ".join(
            f"rank {r['rank']}: {r['time_us']:.1f} us ({r['speedup_vs_xla']:.1f}x XLA)" for r in pre) + ".", ""]
    out += ["`us`: per call of 20 calls unrolled inside one jit, the calls rotating among sets of adapter rows "
            "larger than the L2 cache (host launch gaps included). `device us`: every kernel of a call (the LoRA "
            "kernels and XLA's y + delta add; the reference's gathers and products) from a profiler trace of the "
            "same program: the figure comparable to Punica's CUDA-graph timing (the peer column: ANCHORS.md, on "
            "the same kind of GPU). Rooflines: bytes (x, each distinct A and B row once, y read and written) over "
            "the time, divided by the read limit (read) or the copy bandwidth (copy) measured in the same run; "
            "rows from before the read limit carry the copy figure only.",
            "", "![LoRA decode](benchmarks/plots/lora_decode.png)", ""]
    return out


def lora_sweep_section(rows: list) -> list[str]:
    """Per sweep shape and kernel: the defaults' device time and the best variant's (kernels_lora_sweep.json)."""
    shapes: dict = {}
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


def attention_section(rows: list) -> list[str]:
    dec = [r for r in rows if str(r["phase"]).startswith("decode") and "sweep" not in r["phase"]
           and r["kernel"] in ("pallas", "upstream")]
    by = {(r["kernel"], r["batch"], r["context"], r.get("heads", "")): r for r in dec}
    out = ["### Paged decode attention (Llama-2-7B MHA: 32 heads x 128, page 16; Llama-3.1-8B GQA: 32/8 heads)", "",
           f"{_meta(dec)}.", "",
           "| model | heads | batch | context | ours us | ours GB/s | read roofline | copy roofline | jax upstream us "
           "| vs upstream |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (k, b, c, h), r in sorted(by.items(), key=lambda kv: (str(kv[0][3]), kv[0][1], kv[0][2])):
        if k != "pallas":
            continue
        up = by.get(("upstream", b, c, h))
        read, copy = _fractions(r)
        model = r.get("model") or ("llama-3.1-8b" if h and h.split("/")[0] != h.split("/")[-1] else LEGACY_MODEL)
        out.append(f"| {model} | {h or 'mha'} | {b} | {c} | {r['time_us']:.0f} | {r['gbps']:.0f} | {_fmt(read, '.2f')} "
                   f"| {_fmt(copy, '.2f')} | {_fmt(up and up['time_us'], '.0f')} | "
                   f"{_fmt(up['time_us'] / r['time_us'] if up else None, '.2f')}x |")
    pre = [r for r in rows if r["phase"] == "prefill" and r["kernel"] in ("pallas", "xla")]
    if pre:
        out += ["", "Prefill (causal; FLOPs over the bf16 matmul rate measured in the same run where the row has it):",
                "", "| kernel | sequences x new tokens | context | us | TFLOP/s | FLOP fraction | read roofline |",
                "|---|---|---|---|---|---|---|"]
        for r in pre:
            out.append(f"| {r['kernel']} | {r['batch']} x {r.get('tokens', 0) // max(r['batch'], 1)} | {r['context']} "
                       f"| {r['time_us']:.0f} | {_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('flop_fraction'), '.2f')} "
                       f"| {_fmt(_fractions(r)[0], '.2f')} |")
    mixed = [r for r in rows if r["phase"] == "mixed"]
    if mixed:
        out += ["", "Mixed steps through the prefill op (running decodes beside prompt chunks): its one-row sequences "
                "through the decode kernel (the default) or through the prefill kernel, in the same run:", "",
                "| model | decode rows x context | chunks x tokens | one-row sequences by | us | read roofline |",
                "|---|---|---|---|---|---|"]
        for r in mixed:
            by = "the prefill kernel" if "decode_single_rows=False" in r["kernel"] else "the decode kernel"
            chunks = r["batch"] - r["decode_rows"]
            out.append(f"| {r.get('model', '-')} | {r['decode_rows']} x {r['context']} | {chunks} x {r['chunk']} | {by} "
                       f"| {r['time_us']:.0f} | {_fmt(_fractions(r)[0], '.2f')} |")
    return out + [""]


def _peft_elsewhere(rows: list, peft: dict) -> str:
    """The ratio to PEFT as measured on this GPU by bench_decode.py in another call (peft_decode.json)."""
    ours = [r for r in rows if r["batch"] == peft["batch"] and r["adapters"] == "distinct" and r["rank"] == peft["rank"]
            and _model(r) == LEGACY_MODEL]
    if not ours:
        return ""
    how = ("decode steps only" if "none_with_prefill" in peft else
           f"a {peft['output']}-token generate after a {peft['input']}-token prompt, prefill included")
    return (f" HF PEFT as measured on this GPU by the same script in an earlier call (benchmarks/results/"
            f"peft_decode.json; {how}): {peft['distinct']:.1f} tokens/s with {peft['batch']} distinct "
            f"rank-{peft['rank']} adapters, against which batch {peft['batch']} distinct rank {peft['rank']} here is "
            f"{ours[0]['tokens_per_s'] / peft['distinct']:.0f}x.")


def decode_section(rows: list, plots: Optional[str], peft: Optional[dict] = None) -> list[str]:
    out = ["### Engine decode steps (random bf16 weights, paged pool, Pallas kernels)", ""]
    series: dict = {}
    for model in sorted({_model(r) for r in rows}):
        mrows = [r for r in rows if _model(r) == model]
        out += [f"**{model}** ({_meta(mrows)})", "",
                "| batch | adapters | rank | context | tokens/s | step ms | step ms, synchronous | host build ms "
                "| read roofline | copy roofline | vs HF PEFT |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mrows:
            if r.get("speedup_vs_peft"):  # HF PEFT measured in the same run (bench_decode.py's subprocess)
                ratio = f"{r['speedup_vs_peft']:.1f}x"
            else:
                anchor = PEFT[r["adapters"]] if r["batch"] == 32 and model == LEGACY_MODEL else None
                ratio = f"{r['tokens_per_s'] / anchor:.1f}x (ANCHORS)" if anchor else "-"
            read, copy = _fractions(r)
            out.append(f"| {r['batch']} | {r['adapters']} | {r['rank']} | {r['context']} | {r['tokens_per_s']:.0f} | "
                       f"{r['step_ms']:.2f} | {_fmt(r.get('step_ms_sync'), '.2f')} | {r['host_build_ms']:.2f} | "
                       f"{_fmt(read, '.2f')} | {_fmt(copy, '.2f')} | {ratio} |")
            key = f"{model} {r['adapters']}" + (f" r{r['rank']}" if r["rank"] else "")
            series.setdefault(key, []).append((r["batch"], r["tokens_per_s"]))
        out.append("")
    if plots:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, pts in series.items():
            ax.plot(*zip(*pts), "o-", label=key)
        ax.set_yscale("log")
        _save(fig, ax, os.path.join(plots, "decode.png"), "batch", "tokens/s", "decode steps")
    same_run = any(r.get("speedup_vs_peft") for r in rows)
    out += ["Engine rows time decode steps at a fixed context as the engine's default loop runs them: step "
            "N + 1 is built and launched before step N's sampled tokens are read back (`step ms`); `step ms, "
            "synchronous` reads each step's tokens before building the next (`--sync-steps`). Rooflines: the fewest "
            "bytes a step moves (the weights but the embedding table once, the distinct adapters' rows once, the "
            "K/V read once, the embedding rows, new K/V and logits) over the step time, divided by the read limit "
            "(read) or the copy bandwidth (copy) measured in the same run; rows from before the read limit carry "
            "the copy figure only (and counted the whole embedding table). " + (
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


def cmdbuf_section(rows: list) -> list[str]:
    """decode_cmdbuf.json: the same decode rows under each XLA command-buffer setting."""
    ok = [r for r in rows if "step_ms" in r]
    out = ["### XLA command buffers (CUDA graphs) for the decode step (bench_cmdbuf.py)", "",
           f"{_meta(ok)}. Each setting ran in its own process.", "",
           f"| setting | model | batch | adapters | rank | step ms | speed-up over `{ok[0]['command_buffers'] if ok else '-'}` "
           "| read roofline |",
           "|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["batch"], r["adapters"], r["rank"]): r["step_ms"] for r in ok
            if r["command_buffers"] == ok[0]["command_buffers"]}
    for r in rows:
        if "step_ms" not in r:
            out.append(f"| {r.get('command_buffers')} | failed: {str(r.get('error', ''))[:120]} | | | | | | |")
            continue
        ref = base.get((r["model"], r["batch"], r["adapters"], r["rank"]))
        out.append(f"| {r['command_buffers']} | {r['model']} | {r['batch']} | {r['adapters']} | {r['rank']} | "
                   f"{r['step_ms']:.2f} | {_fmt(ref / r['step_ms'] if ref else None, '.3f')}x | "
                   f"{_fmt(r.get('read_roofline_fraction'), '.2f')} |")
    # rows before the engine option (EngineConfig.command_buffers) set XLA_FLAGS instead
    flags = sorted({(r["command_buffers"], str(r.get("xla_options", r.get("xla_flags", "")))) for r in ok})
    out += [""] + [f"- `{s}`: XLA options `{f or '(none)'}`" for s, f in flags] + [""]
    return out


def profile_section(profiles: list) -> list[str]:
    """profile_step*.json written with a model name: where a step's device time goes, by kind of kernel."""
    out = ["### Where a decode step's time goes (profile_step.py, newest runs)", "",
           "| model | setting | batch | adapters | rank | wall us | device busy us | idle us | LoRA us | attention us "
           "| GEMM us | other us | launches | command buffers in the HLO |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in profiles:
        for r in p["rows"]:
            kinds = r.get("kinds", {})

            def us(k):
                return _fmt(kinds.get(k, {}).get("us_per_step"), ".0f")
            launches = sum(v.get("launches_per_step", 0) for v in kinds.values())
            setting = p.get("command_buffers", "default") + ("" if p.get("tp", 1) == 1 else f", tp {p['tp']}") + "".join(
                f", `{k}={v}`" for k, v in (p.get("step_compiler_options") or {}).items())
            out.append(f"| {p['model']} | {setting} "
                       f"| {r['batch']} | {r['adapters']} | {r['rank']} | {r['wall_us_per_step']:.0f} | "
                       f"{r['busy_us_per_step']:.0f} | {r['idle_us_per_step']:.0f} | {us('lora')} | {us('attention')} | "
                       f"{us('gemm')} | {us('other')} | {launches:.0f} | {r['hlo'].get('command_buffer_mentions', '-')} |")
    return out + ["", f"{'; '.join(f'`{n}`: {_meta([p])}' for n, p in profiles)}.", ""]


def swap_section(d: dict, host: Optional[dict] = None) -> list[str]:
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
    if h:
        out += ["", f"Host store: {h['adapters']} Llama-7B rank-8 adapters registered in {h['seconds']:.0f} s, "
                    f"{h['store_bytes'] / 1e9:.1f} GB of pinned buffers ({h['bytes_per_adapter'] / 2**20:.0f} MiB "
                    f"each); process RSS grew {h['rss_growth_gb']:.1f} GB."]
    return out + [""]


def structured_section(d: dict) -> list[str]:
    """structured.json (bench_structured.py): a decode batch with every row, half the rows or no row constrained
    by a JSON schema."""
    goals = d.get("goals", {})
    out = [f"### Structured output: batch {d['batch']} decode, {d['model']}, JSON-schema masks (bench_structured.py)",
           "", f"{_meta([d])}; a {d['vocab']}-token byte-level BPE; {d['tokens']} tokens per row; masks computed by "
           f"llguidance on {d.get('cpu_count', '?')} CPUs while each step's forward runs.", "",
           "| rows constrained | tokens/s | step ms | mask ms (median, max) |", "|---|---|---|---|"]
    for name, label in (("none", "none"), ("half", "half"), ("all", "all")):
        r = d["modes"][name]
        out.append(f"| {label} | {r['tokens_per_s']:.0f} | {r['step_ms']:.2f} | {r['mask_ms']:.2f}, "
                   f"{r['mask_ms_max']:.1f} |")
    out += ["", f"All rows constrained: {d['all_vs_none']:.3f} of the unconstrained tokens/s (goal >= "
                f"{goals.get('all_vs_none_min', 0.9)}); the free rows of the half-constrained batch lose "
                f"{100 * d['half_free_row_loss']:.1f}% (goal <= {100 * goals.get('half_free_row_loss_max', 0.02):.0f}%).",
            ""]
    return out


def micro_section(results_dir: str, plots: Optional[str]) -> list[str]:
    r = results_dir
    out = [MICRO[0], "## Kernels, decode, command buffers, step profiles and swapping", ""]
    lora = _maybe(r, "kernels_lora.json")
    if lora:
        out += lora_section(lora, plots)
    sweep = _maybe(r, "kernels_lora_sweep.json")
    if sweep:
        out += lora_sweep_section(sweep)
    att = _maybe(r, "kernels_attention.json")
    if att:
        out += attention_section(att)
    decode = _maybe(r, "decode.json")
    if decode:
        out += decode_section(decode, plots, _maybe(r, "peft_decode.json"))
    cmdbuf = _maybe(r, "decode_cmdbuf.json")
    if cmdbuf:
        out += cmdbuf_section(cmdbuf)
    profiles = [(os.path.basename(p), _load(p)) for p in sorted(glob.glob(os.path.join(r, "profile_step*.json")))]
    profiles = [(n, p) for n, p in profiles if isinstance(p, dict) and p.get("model")]
    if profiles:
        out += profile_section(profiles)
    swap = _maybe(r, "swap.json")
    if swap:
        host = _maybe(r, "swap_host.json")
        out += swap_section(swap, host["host_memory"] if host else None)
    structured = _maybe(r, "structured.json")
    if isinstance(structured, dict) and "modes" in structured:
        out += structured_section(structured)
    return out + [MICRO[1]]


# -- the S-LoRA workload -----------------------------------------------------------------------------
def _offered_table(rows: list) -> list[str]:
    setting = rows[0]["setting"]
    paper = PAPER.get(setting, {})
    lines = [
        "| n adapters | S-LoRA paper (A100-80GB) | slora-jax req/s (offered load) | tokens/s | avg latency s | avg first "
        "token s | SLO attainment | max rate at SLO >= 90 % | HF PEFT req/s (paper) | base only req/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in rows:
        n = int(d["n_adapters"])
        p_slora, p_peft = paper.get(n, (None, None))
        peft = d.get("baseline_peft_throughput_req_s")
        peft_cell = f"{_f(peft)} ({_f(p_peft)})" if (peft is not None or p_peft is not None) else "-"
        lines.append(
            f"| {n} | {_f(p_slora)} | **{_f(d['throughput_req_s'])}** | {_f(d.get('tokens_per_s'), '{:.0f}')} "
            f"| {_f(d.get('avg_latency_s'))} | {_f(d.get('avg_ttft_s'))} | {_f(d.get('slo_attainment'))} "
            f"| {_rate(d)} | {peft_cell} | {_f(d.get('base_only_throughput_req_s'))} |")
    return lines


def _run_key(d: dict) -> tuple:
    """The run a result belongs to: its device and commit."""
    return d.get("device"), d.get("git_commit")


def _saturated_table(rows: list) -> list[str]:
    lines = ["| n adapters | requests | req/s | tokens/s | base only req/s | LoRA / base | vs n = "
             f"{rows[0]['n_adapters']} | avg latency s | max_running | unfinished | device, commit |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    # each run against the first n of its own device and commit: figures of two GPUs never divide
    ref_n = rows[0]["n_adapters"]
    ref = {_run_key(d): d["throughput_req_s"] for d in rows if d["n_adapters"] == ref_n}
    for d in rows:
        first, stale = ref.get(_run_key(d)), _stale(d)
        lines.append(f"| {d['n_adapters']} | {d['requests']} | {_struck(stale, '**' + _f(d['throughput_req_s']) + '**')} | "
                     f"{_f(d.get('tokens_per_s'), '{:.0f}')} | {_f(d.get('base_only_throughput_req_s'))} | "
                     f"{_struck(stale, _f(d.get('lora_vs_base'), '{:.3f}'))} | "
                     f"{_struck(stale, _f(d['throughput_req_s'] / first if first else None, '{:.3f}'))} "
                     f"| {_f(d.get('avg_latency_s'))} | {d.get('max_running', '-')} | "
                     f"{(d.get('run') or {}).get('unfinished', '-')} | {_short_device(d.get('device'))}, "
                     f"`{d.get('git_commit', '?')}` |")
    return lines + _stale_notes(rows)


def _by_setting(results: list) -> dict:
    out: dict = {}
    for d in results:
        out.setdefault(d["setting"], []).append(d)
    return out


def _runs_and_notes(rows: list) -> list[str]:
    lines = []
    metas = sorted({(d.get("date", "?"), d.get("device", "?"), d.get("jax_version", "?"), d.get("git_commit", "?"),
                     d.get("command", "?")) for d in rows})
    for date, dev, jv, commit, cmd in metas:
        lines.append(f"- {date}, device `{dev}`, jax {jv}, commit `{commit}`: `{cmd}`")
    notes = list(dict.fromkeys(f"- n={d['n_adapters']}: {note}" for d in rows for note in d.get("notes", [])))
    if notes:
        lines += ["", "<details><summary>notes</summary>", ""] + notes + ["", "</details>"]
    return lines + [""]


def slora_section(results_dir: str, plots: Optional[str]) -> list[str]:
    lines = [START, "## S-LoRA workload (slora-jax bench)", ""]
    lines += [
        "S-LoRA's synthetic workload: adapter of each request floor(n X), X ~ power(alpha); input and output lengths "
        "uniform; greedy, EOS ignored; random weights and synthetic adapters on q,k,v,o. Saturated runs offer every "
        "request at once (the capacity); offered-load runs replay gamma arrivals at the offered rate with "
        "coefficient of variation cv, so their throughput (finished requests / wall time, drain included) is "
        "bounded by that rate. SLO: first token within the stated time. The paper's figures are S-LoRA's Table 3 "
        "on one A100-80GB (120 s traces at 10 req/s, an offered load); ours run on the device named below. HF PEFT "
        "runs PEFT's mixed-adapter batches (`adapter_names`), static batching, on a scaled-down trace (see the "
        "notes); the paper's PEFT column is in brackets.",
        "",
    ]
    sat = _by_setting(load_results(results_dir, saturated=True))
    for setting, rows in sat.items():
        first = rows[0]
        lines += [f"### {SETTING_TITLES.get(setting, setting)}: saturated", "",
                  f"Model {first['model']}, ranks {'/'.join(str(r) for r in first['ranks'])}, {first['requests']} "
                  f"requests offered at once, lengths {first.get('input_range')} in / {first.get('output_range')} out.",
                  ""] + _saturated_table(rows) + [""] + _runs_and_notes(rows)
    offered = _by_setting(load_results(results_dir, saturated=False))
    for setting, rows in offered.items():
        first = rows[0]
        lines += [f"### {SETTING_TITLES.get(setting, setting)}: offered load ({first['rate']:g} req/s)", "",
                  f"Model {first['model']}, ranks {'/'.join(str(r) for r in first['ranks'])}, offered rate "
                  f"{first['rate']:g} req/s, cv {first['cv']:g}, alpha {first.get('alpha', 1):g}, "
                  f"{first['duration_s']:g} s trace ({first['requests']} requests), lengths "
                  f"{first.get('input_range')} in / {first.get('output_range')} out, SLO first token < "
                  f"{first.get('slo_ttft_s', 6):g} s.", ""] + _offered_table(rows) + [""] + _runs_and_notes(rows)
    if plots and (sat or offered):
        rel = plot_workload(sat, offered, plots)
        lines += [f"![{title}](benchmarks/plots/{name})" for title, name in rel.items()] + [""]
    for name in sorted(f for f in os.listdir(results_dir) if f.endswith("-prefix.json")):  # chat, S1, ...
        d = _maybe(results_dir, name)
        if isinstance(d, dict) and "on" in d and "off" in d:
            lines += prefix_section(d)
    lines.append(END)
    return lines


def prefix_section(d: dict) -> list[str]:
    """<setting>-prefix.json (`slora-jax bench --config configs/bench-chat.json`, or any setting with
    `--set compare_prefix_cache=true`): the same requests with the prefix cache on and off."""
    shared = d.get("system_prompt_len") or 0
    lines = [f"### Prefix caching ({d['setting']}): {d['model']}, {d['n_adapters']} adapters, "
             + (f"{shared}-token system prompts" if shared else "prompts that share nothing (the cache's cost)"), "",
             f"{_meta([d])}. "
             + ("Each adapter has its own system prompt; a prompt is it plus a user turn of " if shared else
                "Random prompts of ")
             + f"{d['input_range']} tokens, outputs {d['output_range']}, adapters drawn with alpha {d['alpha']:g}. "
             f"First-token latency at {d['rate']:g} req/s for {d['duration_s']:g} s"
             + (f", after {d['prefix_warm_s']:g} s of the same traffic served untimed (a server that has been up)"
                if d.get("prefix_warm_s") else "")
             + f"; saturated: {d['saturate_requests']} requests at once. Each mode starts with no adapter resident "
             "and nothing cached; hit rate = prompt tokens found cached / prompt tokens looked up.", "",
             "| prefix cache | hit rate | req/s | tokens/s | TTFT mean s | TTFT p50 s | TTFT p99 s | saturated req/s "
             "| saturated hit rate |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in ("on", "off"):
        m = d[mode]
        lines.append(f"| {mode} | {_f(m.get('hit_rate'))} | {_f(m.get('throughput_req_s'))} | "
                     f"{_f(m.get('tokens_per_s'), '{:.0f}')} | {_f(m.get('ttft_mean_s'), '{:.3f}')} | "
                     f"{_f(m.get('ttft_p50_s'), '{:.3f}')} | {_f(m.get('ttft_p99_s'), '{:.3f}')} | "
                     f"**{_f(m.get('saturated_throughput_req_s'))}** | {_f(m.get('saturated_hit_rate'))} |")
    lines += ["", f"TTFT p50 off / on: **{_f(d.get('ttft_p50_speedup'))}x**; saturated throughput on / off: "
                  f"**{_f(d.get('saturated_throughput_ratio'), '{:.3f}')}**.", ""]
    c = d.get("cached_requests") or {}
    if c.get("requests"):
        lines += [f"The {c['requests']} of {c['of']} offered requests whose prefix the cache supplied (on average "
                  f"{c['cached_tokens_mean']:.0f} tokens): TTFT p50 {_f(c['ttft_p50_on_s'], '{:.3f}')} s with the "
                  f"cache, {_f(c['ttft_p50_off_s'], '{:.3f}')} s for the same requests without it "
                  f"(**{_f(c['ttft_p50_speedup'])}x**).", ""]
    more = d.get("more_rates") or []
    if more:
        lines += [f"First-token latency at more offered rates, the same traffic and cache (continuing after the "
                  f"{d['rate']:g} req/s run):", "",
                  "| offered req/s | hit rate | TTFT p50 s on | TTFT p50 s off | off / on | p99 s on | p99 s off | "
                  "requests that hit: off / on |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in [{"rate": d["rate"], "on": d["on"], "off": d["off"], "ttft_p50_speedup": d.get("ttft_p50_speedup"),
                   "cached_requests": c}] + more:
            on, off = m["on"], m["off"]
            lines.append(f"| {m['rate']:g} | {_f(on.get('hit_rate'))} | {_f(on.get('ttft_p50_s'), '{:.3f}')} | "
                         f"{_f(off.get('ttft_p50_s'), '{:.3f}')} | **{_f(m.get('ttft_p50_speedup'))}x** | "
                         f"{_f(on.get('ttft_p99_s'), '{:.3f}')} | {_f(off.get('ttft_p99_s'), '{:.3f}')} | "
                         f"{_f((m.get('cached_requests') or {}).get('ttft_p50_speedup'))}x |")
        lines.append("")
    notes = [f"- {note}" for note in d.get("notes", [])]
    if notes:
        lines += ["<details><summary>notes</summary>", ""] + notes + ["", "</details>", ""]
    return lines


# -- plots ---------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: str, xlabel: str, ylabel: str, title: str, log2: bool = True) -> None:
    """Labels, legend, a log2 x axis (batches); written to `path`."""
    if log2:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def plot_workload(sat: dict, offered: dict, plots_dir: str) -> dict:
    """The workload's PNG plots; returns {title: file name}."""
    plt = _pyplot()
    out = {}
    if sat:
        fig, axes = plt.subplots(1, len(sat), figsize=(5 * len(sat), 4), squeeze=False)
        for ax, (setting, rows) in zip(axes[0], sat.items()):
            runs: dict = {}  # one line per device and commit; stale results (`_stale`) are not drawn
            for d in rows:
                if not _stale(d):
                    runs.setdefault(_run_key(d), []).append(d)
            for (dev, commit), run in runs.items():
                tag = f" ({_short_device(dev)}, {commit})" if len(runs) > 1 else ""
                ns = [int(d["n_adapters"]) for d in run]
                line, = ax.plot(ns, [d["throughput_req_s"] for d in run], "o-", label="LoRA" + tag)
                base = [(n, d["base_only_throughput_req_s"]) for n, d in zip(ns, run)
                        if d.get("base_only_throughput_req_s")]
                if base:
                    ax.plot(*zip(*base), "s--", color=line.get_color(), label="base model only (same run)" + tag)
            ax.set_xscale("log")
            ax.set_ylim(bottom=0)
            _label(ax, setting, "number of adapters", "throughput (req/s), saturated")
        fig.tight_layout()
        fig.savefig(os.path.join(plots_dir, "saturated.png"), dpi=110)
        plt.close(fig)
        out["saturated throughput vs number of adapters"] = "saturated.png"
    if offered:
        fig, axes = plt.subplots(1, len(offered), figsize=(5 * len(offered), 4), squeeze=False)
        for ax, (setting, rows) in zip(axes[0], offered.items()):
            ns = [int(d["n_adapters"]) for d in rows]
            ax.plot(ns, [d["throughput_req_s"] for d in rows], "o-", label="slora-jax")
            base = [(n, d["base_only_throughput_req_s"]) for n, d in zip(ns, rows)
                    if d.get("base_only_throughput_req_s") is not None]
            if base:
                ax.plot(*zip(*base), "s--", label="base model only (ours)")
            peft = [(n, d["baseline_peft_throughput_req_s"]) for n, d in zip(ns, rows)
                    if d.get("baseline_peft_throughput_req_s") is not None]
            if peft:
                ax.plot(*zip(*peft), "v-", label="HF PEFT (ours)")
            paper = PAPER.get(setting, {})
            if paper:
                pn = sorted(paper)
                ax.plot(pn, [paper[n][0] for n in pn], "x:", label="S-LoRA paper (A100-80GB)")
                pp = [(n, paper[n][1]) for n in pn if paper[n][1] is not None]
                ax.plot(*zip(*pp), "+:", label="HF PEFT paper")
            ax.axhline(rows[0]["rate"], color="grey", lw=0.8, ls="-.", label="offered rate")
            ax.set_xscale("log")
            _label(ax, setting, "number of adapters", "throughput (req/s), offered load")
        fig.tight_layout()
        fig.savefig(os.path.join(plots_dir, "throughput_vs_adapters.png"), dpi=110)
        plt.close(fig)
        out["offered-load throughput vs number of adapters"] = "throughput_vs_adapters.png"
        fig, axes = plt.subplots(1, len(offered), figsize=(5 * len(offered), 4), squeeze=False)
        for ax, (setting, rows) in zip(axes[0], offered.items()):
            for d in rows:
                pts = sorted((float(k), v) for k, v in ((d.get("rate_search") or {}).get("points") or {}).items()
                             if v is not None)
                if pts:
                    ax.plot(*zip(*pts), "o-", label=f"n={d['n_adapters']}")
            thr = (rows[0].get("rate_search") or {}).get("threshold", 0.9)
            ax.axhline(thr, color="grey", lw=0.8, ls="--", label=f"{thr:.0%} target")
            ax.set_ylim(-0.02, 1.02)
            _label(ax, setting, "offered rate (req/s)",
                   f"SLO attainment (first token < {rows[0].get('slo_ttft_s', 6):g} s)")
        fig.tight_layout()
        fig.savefig(os.path.join(plots_dir, "slo_vs_rate.png"), dpi=110)
        plt.close(fig)
        out["SLO attainment vs rate"] = "slo_vs_rate.png"
    return out


def _label(ax, setting: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(SETTING_TITLES.get(setting, setting), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


# -- writing -------------------------------------------------------------------------------------------
def update_markdown(md_path: str, section: str, markers: tuple = (START, END), top: bool = False) -> None:
    """Replace the section between `markers` in `md_path`; where there is none, put it after the title
    (`top`) or at the end (creating the file if needed)."""
    start, end = markers
    text = ""
    if os.path.exists(md_path):
        with open(md_path) as f:
            text = f.read()
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + section.rstrip("\n") + text[b:]
    elif not text.strip():
        text = "# Benchmarks\n\n" + section
    elif top and text.startswith("# "):
        title, _, rest = text.partition("\n")
        text = title + "\n\n" + section.rstrip("\n") + "\n\n" + rest.lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    if not text.endswith("\n"):
        text += "\n"
    with open(md_path, "w") as f:
        f.write(text)


def render(results_dir: str, plots_dir: Optional[str] = None) -> dict:
    """{markers: section text} of every generated section (plots written to `plots_dir` when given)."""
    if plots_dir:
        os.makedirs(plots_dir, exist_ok=True)
    return {HEADLINE: "\n".join(headline_section(results_dir)) + "\n",
            MICRO: "\n".join(micro_section(results_dir, plots_dir)) + "\n",
            (START, END): "\n".join(slora_section(results_dir, plots_dir)) + "\n"}


def write_report(results_dir: str, md_path: str = "BENCHMARKS.md", plots_dir: str = "benchmarks/plots",
                 make_plots: bool = True) -> dict:
    """Read the results, write the plots and the generated sections of BENCHMARKS.md. Returns what it wrote."""
    if not glob.glob(os.path.join(results_dir, "*.json")):
        raise FileNotFoundError(f"no benchmark results (*.json) in {results_dir!r}")
    before = set(glob.glob(os.path.join(plots_dir, "*.png"))) if make_plots else set()
    sections = render(results_dir, plots_dir if make_plots else None)
    for markers, text in sections.items():
        update_markdown(md_path, text, markers, top=markers == HEADLINE)
    plots = sorted(set(glob.glob(os.path.join(plots_dir, "*.png"))) - before) if make_plots else []
    return {"markdown": md_path, "plots": plots or sorted(glob.glob(os.path.join(plots_dir, "*.png"))),
            "results": len(load_results(results_dir))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--md", default="BENCHMARKS.md")
    ap.add_argument("--plots", default="benchmarks/plots")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    print(json.dumps(write_report(args.results, args.md, args.plots, not args.no_plots)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
