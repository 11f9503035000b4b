"""Structured output on the GPU: what JSON-schema constraints cost a decode batch.

Batch 32 decode on the Llama-2-7B shape (random bf16 weights, a pool of `mem_fraction` of the device's
free memory), through the engine's own loop (async: step N + 1 dispatched before step N is read), in
three modes over the same prompts:
- `none`: no row constrained (the baseline);
- `all`: every row constrained by a JSON schema: the masks of step N + 1 are computed on the host
  (llguidance, in parallel threads) while its forward runs, then applied by the sampling program;
- `half`: half the rows constrained, half free (what free rows lose beside constrained ones).
Goals (issue #19): `all` reaches >= 0.9 of `none`'s tokens/s; the free rows of `half` lose <= 2%.

Every row generates exactly `--tokens` tokens: the schema is an array of at least `min_items` records
(an enum, a boolean, a bounded string, bounded integers) that cannot close sooner, and free rows ignore
EOS. tokens/s counts the steady decode steps only (the prefill and the first and last steps aside). The
tokenizer is a byte-level BPE of Llama-2's 32,000 tokens trained at start on the Python standard
library's source (the grammar engine's work grows with the vocabulary and its tokens' shapes; the model's
weights play no part in it); `mask_ms` is the host's mask time per step, `step_ms` the loop's step time.

    python benchmarks/bench_structured.py --out DIR [--batch 32] [--tokens 256] [--profile] [--smoke]

Writes <out>/structured.json. `--smoke`: the tiny model on a CPU, a small vocabulary: checks the script.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from slora_jax import LLM, SamplingParams, parallel  # noqa: E402
from slora_jax.engine.structured import Grammars  # noqa: E402
from slora_jax.tokenizer import HFTokenizer  # noqa: E402

RECORD = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "kind": {"enum": ["alpha", "beta", "gamma", "delta"]},
        "ok": {"type": "boolean"},
        "label": {"type": "string", "maxLength": 12},
        "score": {"type": "integer", "minimum": -1000, "maximum": 1000},
    },
    "required": ["id", "kind", "ok", "label", "score"],
    "additionalProperties": False,
}
PROMPT_TOKENS = 16


def schema(min_items: int) -> dict:
    return {"type": "array", "items": RECORD, "minItems": min_items}


def train_tokenizer(vocab: int, corpus_bytes: int, out_dir: str, bos: int, eos: int) -> HFTokenizer:
    """A byte-level BPE of `vocab` tokens (specials <unk> <s> </s> first) trained on the standard library's
    source, saved as out_dir/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts, size = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError):
            continue
        size += len(texts[-1])
        if size >= corpus_bytes:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return HFTokenizer(out_dir, bos, (eos,))


def use_tokenizer(llm: LLM, tok) -> None:
    """Serve `llm` with `tok` (the random-weight presets come with the byte tokenizer)."""
    eng = llm.engine
    llm.tokenizer = eng.tokenizer = tok
    eng.grammars = Grammars(tok, llm.model_cfg.vocab_size)


class MaskTimer:
    """Wraps the engine's mask computation: seconds per call."""

    def __init__(self, grammars):
        self.real, self.seconds = grammars.masks, []
        grammars.masks = self

    def __call__(self, rows, b):
        t = time.perf_counter()
        out = self.real(rows, b)
        self.seconds.append(time.perf_counter() - t)
        return out


class Timeline:
    """The host's side of each step, from wrappers around the engine's calls: when the token read returned,
    when the next forward was dispatched (its call's start and end) and when a sampling program was. A step
    whose next forward leaves the host later than the device needs it stalls the batch; `summary` gives the
    medians of each part (ms), so that a mode's slower step points at the part that grew."""

    def __init__(self, engine):
        self.events: list = []  # (name, start, end)
        runner = engine.runner
        for name, owner in (("forward", runner), ("sample", runner), ("to_host", parallel)):
            setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.events.append((name, t, time.perf_counter()))
            return out
        return timed

    def clear(self) -> None:
        self.events.clear()

    def summary(self) -> dict:
        """Medians over the steps: `read_ms` (the token read's wait), `read_to_forward_ms` (from a read's
        return to the next forward's dispatch: the host path a step's device time must cover),
        `forward_dispatch_ms` and `sample_dispatch_ms` (the calls themselves)."""
        reads = [e for e in self.events if e[0] == "to_host"]
        forwards = [e for e in self.events if e[0] == "forward"]
        gaps = []
        for _, _, read_end in reads:
            nxt = next((f for f in forwards if f[1] >= read_end), None)
            if nxt is not None:
                gaps.append(nxt[1] - read_end)
        med = lambda xs: float(np.median(xs)) * 1e3 if xs else 0.0  # noqa: E731
        span = lambda name: [e[2] - e[1] for e in self.events if e[0] == name]  # noqa: E731
        return {"read_ms": med(span("to_host")), "read_to_forward_ms": med(gaps),
                "read_to_forward_ms_p90": float(np.percentile(gaps, 90)) * 1e3 if gaps else 0.0,
                "forward_dispatch_ms": med(span("forward")), "sample_dispatch_ms": med(span("sample"))}


def run_mode(llm, prompts: list, constrained: list, tokens: int, min_items: int, timer: MaskTimer,
             timeline: Timeline) -> dict:
    """One batch through the engine loop; per-step times of its steady decode steps, and the engine's own
    split of them (`Engine.timings`: host work, waits on the device and on the masks) per step."""
    eng = llm.engine
    reqs = []
    for p, c in zip(prompts, constrained):
        sp = (SamplingParams(max_tokens=tokens, json_schema=schema(min_items)) if c
              else SamplingParams(max_tokens=tokens, ignore_eos=True))
        reqs.append(eng.add_request(p, None, sp))
    timer.seconds.clear()
    timeline.clear()
    before = dict(eng.timings)
    steps = []
    while not all(r.finished for r in reqs):
        t = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t)
    eng.step()  # read what is left in flight
    bad = [r.output_ids for r in reqs if r.finish_reason != "length" or len(r.output_ids) != tokens]
    assert not bad, f"{len(bad)} rows did not generate {tokens} tokens (finish: {[r.finish_reason for r in reqs]})"
    steady = steps[2:-2] if len(steps) > 6 else steps
    step_s = float(np.median(steady))
    free = sum(not c for c in constrained)
    per_step = {f"{k[:-2]}_ms_per_step": (eng.timings[k] - before[k]) / len(steps) * 1e3 for k in before}
    masks = np.array(timer.seconds or [0.0]) * 1e3
    return {"steps": len(steps), "step_ms": step_s * 1e3, "step_ms_mean": float(np.mean(steady)) * 1e3,
            "tokens_per_s": len(reqs) / step_s, "free_row_tokens_per_s": (1 / step_s) if free else None,
            "mask_ms": float(np.median(masks)), "mask_ms_p90": float(np.percentile(masks, 90)),
            "mask_ms_max": float(np.max(masks)), **per_step, **timeline.summary()}


def traced_mode(llm, prompts: list, constrained: list, tokens: int, min_items: int, timer: MaskTimer,
                timeline: Timeline) -> dict:
    """One run of a mode under jax.profiler: the device's busy and idle time per step (idle: waiting on the
    host), which says whether a slower constrained step is host-bound or does more device work."""
    import jax

    tmp = tempfile.mkdtemp()
    with jax.profiler.trace(tmp, create_perfetto_trace=True, profiler_options=common.device_only_profile()):
        r = run_mode(llm, prompts, constrained, tokens, min_items, timer, timeline)
    busy, span = common.busy_and_span(common.device_events(tmp))
    return {"step_ms": r["step_ms_mean"], "device_busy_ms": busy / r["steps"] / 1e3,
            "device_idle_ms": (span - busy) / r["steps"] / 1e3, "mask_ms": r["mask_ms"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="the tiny model on a CPU: checks the script runs")
    ap.add_argument("--profile", action="store_true", help="then one traced run per mode: device busy / idle")
    args = ap.parse_args()
    if args.smoke:
        preset, vocab, corpus, args.batch, args.tokens, args.repeats = "tiny", 320, 300_000, 4, 24, 1
        extra = dict(dtype="float32", kernels="xla", num_pages=64, page_rows=16)
    else:
        preset, vocab, corpus = "llama-7b", 32000, 6_000_000
        extra = dict(mem_fraction=0.9)
    t0 = time.time()
    llm = LLM(preset, max_running=args.batch, max_batch_tokens=max(512, args.batch * PROMPT_TOKENS),
              max_model_len=PROMPT_TOKENS + args.tokens + 16, **extra)
    cfg = llm.model_cfg
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(vocab, corpus, tmp, cfg.bos_token_id, cfg.eos_token_ids[0])
    use_tokenizer(llm, tok)
    timer = MaskTimer(llm.engine.grammars)
    timeline = Timeline(llm.engine)
    print(f"{preset}: pool {llm.stats()['pages_total']} pages, tokenizer of {vocab} tokens trained; "
          f"{time.time() - t0:.0f}s", flush=True)
    rng = np.random.default_rng(0)
    prompts = [[cfg.bos_token_id] + rng.integers(3, vocab, PROMPT_TOKENS - 1).tolist() for _ in range(args.batch)]
    min_items = max(2, args.tokens // 8)  # a record takes more than 8 tokens: the array cannot close in time
    modes = {"none": [False] * args.batch, "all": [True] * args.batch,
             "half": [i % 2 == 0 for i in range(args.batch)]}
    t = time.time()
    for flags in modes.values():  # compile every program the modes use (steps, sampling), warm the grammar
        run_mode(llm, prompts, flags, 8, min_items, timer, timeline)
    print(f"warm-up {time.time() - t:.0f}s", flush=True)
    results = {name: [] for name in modes}
    for _ in range(args.repeats):  # interleaved, so that a drift of the device hits every mode alike
        for name, flags in modes.items():
            results[name].append(run_mode(llm, prompts, flags, args.tokens, min_items, timer, timeline))
    best = {name: max(rs, key=lambda r: r["tokens_per_s"]) for name, rs in results.items()}
    none, allc, half = best["none"], best["all"], best["half"]
    row = {
        "model": cfg.name, "batch": args.batch, "tokens": args.tokens, "vocab": vocab, "min_items": min_items,
        "modes": best, "runs": results,
        "all_vs_none": allc["tokens_per_s"] / none["tokens_per_s"],
        "half_free_row_loss": 1 - half["free_row_tokens_per_s"] / none["free_row_tokens_per_s"],
        "goals": {"all_vs_none_min": 0.9, "half_free_row_loss_max": 0.02},
        "device": common.device_name(), "kernels": llm.stats()["kernels"], "cpu_count": os.cpu_count(),
        "git_commit": common.git_commit(),
    }
    if args.profile:
        row["profile"] = {name: traced_mode(llm, prompts, flags, min(args.tokens, 64), min_items, timer, timeline)
                          for name, flags in modes.items()}
    common.write_json(os.path.join(args.out, "structured.json"), row)
    print("mode  tokens/s  step_ms  mask_ms (p90, max)  host  device wait  mask wait  read->forward (p90)  dispatch fwd / sample")
    for name, r in best.items():
        print(f"{name:5s} {r['tokens_per_s']:8.0f} {r['step_ms']:8.2f} {r['mask_ms']:7.2f} ({r['mask_ms_p90']:.1f}, "
              f"{r['mask_ms_max']:.1f}) {r['host_ms_per_step']:5.2f} {r['device_wait_ms_per_step']:6.2f} "
              f"{r['mask_wait_ms_per_step']:9.2f} {r['read_to_forward_ms']:9.2f} ({r['read_to_forward_ms_p90']:.2f}) "
              f"{r['forward_dispatch_ms']:8.2f} / {r['sample_dispatch_ms']:.2f}")
    print(f"all constrained / none: {row['all_vs_none']:.3f} (goal >= 0.9); free rows of the half batch lose "
          f"{100 * row['half_free_row_loss']:.1f}% (goal <= 2%)", flush=True)
    for name, p in row.get("profile", {}).items():
        print(f"traced {name:5s}: step {p['step_ms']:.2f} ms, device busy {p['device_busy_ms']:.2f} ms, idle "
              f"{p['device_idle_ms']:.2f} ms, masks {p['mask_ms']:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
