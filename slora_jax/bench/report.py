"""Benchmark results (JSON from run.py) -> a section of BENCHMARKS.md and PNG plots.

Runs anywhere (CPU, no JAX needed): `python -m slora_jax.bench.report
--results benchmarks/results --md BENCHMARKS.md --plots benchmarks/plots`.
The section between the markers below is replaced on every run; the rest of
BENCHMARKS.md is left alone. S-LoRA's published figures (A100-80GB, req/s,
its Table 3) stand beside ours.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Optional

START = "<!-- slora-bench:start -->"
END = "<!-- slora-bench:end -->"

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
}


def load_results(results_dir: str) -> list[dict]:
    """Every `<setting>-<n>.json` under `results_dir`, sorted by setting and n."""
    out = []
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError:
                continue
        if isinstance(d, dict) and "setting" in d and "n_adapters" in d and "throughput_req_s" in d:
            out.append(d)
    return sorted(out, key=lambda d: (str(d["setting"]), int(d["n_adapters"])))


def _f(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _rate(d: dict) -> str:
    r = d.get("max_sustainable_rate")
    if r is None:
        return "-"
    points = (d.get("rate_search") or {}).get("points") or {}
    highest = max((float(k) for k in points), default=r)
    return f">= {r:g}" if r >= highest else f"{r:g}"


def _table(rows: list[dict]) -> list[str]:
    setting = rows[0]["setting"]
    paper = PAPER.get(setting, {})
    lines = [
        "| n adapters | S-LoRA paper (A100-80GB) | slora-jax req/s | tokens/s | avg latency s | avg first token s "
        "| SLO attainment | max rate at SLO >= 90 % | HF PEFT req/s (paper) | base only req/s |",
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


def render(results: list[dict], plots_rel: Optional[dict] = None) -> str:
    """The markdown section (markers included)."""
    lines = [START, "## S-LoRA workload (slora-jax bench)", ""]
    lines += [
        "S-LoRA's synthetic workload: adapter of each request floor(n X), X ~ power(alpha); gamma arrivals at "
        "the offered rate with coefficient of variation cv; input and output lengths uniform; greedy, EOS "
        "ignored; random weights and synthetic adapters on q,k,v,o. Throughput = finished requests / wall time "
        "of the run (drain included), so it is bounded by the offered rate. SLO: first token within the stated "
        "time. The paper's figures are S-LoRA's Table 3 on one A100-80GB (120 s traces at 10 req/s); ours run "
        "on the device named below. HF PEFT runs PEFT's mixed-adapter batches (`adapter_names`), static "
        "batching, on a scaled-down trace (see the notes); the paper's PEFT column is in brackets.",
        "",
    ]
    by_setting: dict = {}
    for d in results:
        by_setting.setdefault(d["setting"], []).append(d)
    for setting, rows in by_setting.items():
        first = rows[0]
        lines.append(f"### {SETTING_TITLES.get(setting, setting)}")
        lines.append("")
        lines.append(
            f"Model {first['model']}, ranks {'/'.join(str(r) for r in first['ranks'])}, offered rate "
            f"{first['rate']:g} req/s, cv {first['cv']:g}, alpha {first.get('alpha', 1):g}, "
            f"{first['duration_s']:g} s trace ({first['requests']} requests), lengths "
            f"{first.get('input_range')} in / {first.get('output_range')} out, SLO first token < "
            f"{first.get('slo_ttft_s', 6):g} s.")
        lines.append("")
        lines += _table(rows)
        lines.append("")
        metas = sorted({(d.get("date", "?"), d.get("device", "?"), d.get("jax_version", "?"), d.get("git_commit", "?"),
                         d.get("command", "?")) for d in rows})
        for date, dev, jv, commit, cmd in metas:
            lines.append(f"- {date}, device `{dev}`, jax {jv}, commit `{commit}`: `{cmd}`")
        notes = []
        for d in rows:
            for note in d.get("notes", []):
                notes.append(f"- n={d['n_adapters']}: {note}")
        if notes:
            lines.append("")
            lines.append("<details><summary>notes</summary>")
            lines.append("")
            lines += notes
            lines.append("")
            lines.append("</details>")
        lines.append("")
    if plots_rel:
        for title, rel in plots_rel.items():
            lines.append(f"![{title}]({rel})")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def update_markdown(md_path: str, section: str) -> None:
    """Replace the marked section of `md_path` (append it, or create the file, where there is none)."""
    text = ""
    if os.path.exists(md_path):
        with open(md_path) as f:
            text = f.read()
    if START in text and END in text:
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + section.rstrip("\n") + text[b:]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "# Benchmarks\n\n") + section
    if not text.endswith("\n"):
        text += "\n"
    with open(md_path, "w") as f:
        f.write(text)


def plot(results: list[dict], plots_dir: str) -> dict:
    """PNG plots; returns {title: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plots_dir, exist_ok=True)
    by_setting: dict = {}
    for d in results:
        by_setting.setdefault(d["setting"], []).append(d)
    out = {}

    # throughput vs number of adapters
    fig, axes = plt.subplots(1, len(by_setting), figsize=(5 * len(by_setting), 4), squeeze=False)
    for ax, (setting, rows) in zip(axes[0], by_setting.items()):
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
        _label(ax, setting, "number of adapters", "throughput (req/s)")
    out["throughput vs number of adapters"] = _save(plt, fig, plots_dir, "throughput_vs_adapters.png")

    # SLO attainment vs offered rate
    fig, axes = plt.subplots(1, len(by_setting), figsize=(5 * len(by_setting), 4), squeeze=False)
    for ax, (setting, rows) in zip(axes[0], by_setting.items()):
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
    out["SLO attainment vs rate"] = _save(plt, fig, plots_dir, "slo_vs_rate.png")
    return out


def _label(ax, setting: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(SETTING_TITLES.get(setting, setting), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt, fig, plots_dir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(plots_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results_dir: str, md_path: str = "BENCHMARKS.md", plots_dir: str = "benchmarks/plots",
                 make_plots: bool = True) -> dict:
    """Read the results, write the plots and the BENCHMARKS.md section. Returns what it wrote."""
    results = load_results(results_dir)
    if not results:
        raise FileNotFoundError(f"no benchmark results (*.json from slora-jax bench) in {results_dir!r}")
    plots = plot(results, plots_dir) if make_plots else {}
    md_dir = os.path.dirname(os.path.abspath(md_path))
    rel = {t: os.path.relpath(os.path.abspath(p), md_dir) for t, p in plots.items()}
    section = render(results, rel)
    update_markdown(md_path, section)
    return {"markdown": md_path, "plots": list(plots.values()), "results": len(results)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--md", default="BENCHMARKS.md")
    ap.add_argument("--plots", default="benchmarks/plots")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    out = write_report(args.results, args.md, args.plots, not args.no_plots)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
