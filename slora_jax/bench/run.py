"""`slora-jax bench`: replay S-LoRA's workload in real time against the engine.

One invocation serves one setting (configs/bench-*.json) for each n in its
`n_adapters` list, all in this process, in this order:

1. HF PEFT baseline (peft_baseline.py) for each n up to `peft.n_cap`, on the
   head of the trace (`peft.duration_s`), stopped at `peft.time_limit_s`. It
   runs first, before JAX touches the device, and gives its GPU memory back
   when done, so that the engine's pool can then take most of the device.
2. The engine: random weights of the model preset, max(n) synthetic adapters
   (q,k,v,o; ranks round-robin), a warm-up replay (compiles the step programs
   the workload hits), then
3. the base model alone (every request adapter=None) on the same trace: the
   ceiling LoRA serving is measured against;
4. the S-LoRA run for each n (the same arrivals and lengths; only the adapter
   indices depend on n);
5. a short bisection over `rate_search.rates` per n (largest n first) for the
   highest rate whose SLO attainment is >= `rate_search.threshold`, with
   whatever is left of `time_budget_s` (probes stop as soon as every request's
   first-token outcome is known).

Every phase is time-bounded (see `DEFAULTS`). Results go to
`<out>/<setting>-<n>.json`; report.py turns them into BENCHMARKS.md and plots.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import os
import subprocess
import time
from typing import Callable, Optional, Sequence

import numpy as np

from ..config import CONFIGS_DIR, load_model_config
from ..engine.request import SamplingParams
from . import metrics
from .workload import Trace, adapter_name, adapter_ranks, generate_trace

log = logging.getLogger(__name__)

DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

DEFAULTS: dict = {
    "setting": "custom",
    "model": "tiny",
    "ranks": [8],
    "modules": list(DEFAULT_MODULES),
    "n_adapters": [5],
    "rate": 10.0,  # requests/s offered (S-LoRA's Table 3 runs: 10)
    "cv": 1.0,
    "alpha": 1.0,
    "duration_s": 30.0,  # the trace holds int(rate * duration_s) requests
    "input_range": [8, 512],
    "output_range": [8, 512],
    "seed": 42,
    "slo_ttft_s": 6.0,
    "max_drain_s": 60.0,  # a run stops this long after its last arrival; unfinished requests count as such
    "time_budget_s": 540.0,  # optional phases (PEFT, warm-up, rate search) stop at this many seconds
    "time_budget_grace_s": 30.0,  # main runs are cut at time_budget_s + this (results are written as they come)
    "kernels": "auto",
    "dtype": "bfloat16",
    "engine": {},  # EngineConfig overrides: max_running, max_batch_tokens, num_pages | mem_fraction, ...
    "warmup": {"rate": 10.0, "duration_s": 20.0, "max_drain_s": 40.0},  # per pass (LoRA, then base-only)
    "base_only": True,
    "rate_search": {"enabled": True, "rates": [2, 4, 6, 8, 10, 12, 16, 20, 24], "probe_s": 15.0, "threshold": 0.9,
                    "max_probes": 4},
    "peft": {"enabled": True, "n_cap": 100, "duration_s": 30.0, "time_limit_s": 60.0, "max_batch": 32,
             "device": None, "subprocess": False},  # subprocess: run it in a child process (torch apart from JAX)
    "adapter_host_memory": "auto",  # distinct | shared | auto (shared above adapter_host_budget_gb)
    "adapter_host_budget_gb": 24.0,
    "compile_cache_dir": None,  # JAX persistent compilation cache (reused across runs on one machine)
    "progress": True,
}


# -- configuration ------------------------------------------------------------------------
def _parse_value(text: str):
    """'5' -> 5, 'true' -> True, '[1,2]' -> [1, 2], '5,100' -> [5, 100], 'null' -> None, else the string."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        pass
    if "," in text:
        return [_parse_value(t.strip()) for t in text.split(",") if t.strip()]
    return text


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(path: str, overrides: Optional[dict] = None) -> dict:
    """DEFAULTS <- the JSON file <- overrides ({"key" or "a.b": value or string})."""
    with open(path) as f:
        cfg = _merge(DEFAULTS, json.load(f))
    for key, value in (overrides or {}).items():
        value = _parse_value(value) if isinstance(value, str) else value
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {p!r} is not a section")
        node[parts[-1]] = value
    if not isinstance(cfg["n_adapters"], list):
        cfg["n_adapters"] = [cfg["n_adapters"]]
    if not isinstance(cfg["ranks"], list):
        cfg["ranks"] = [cfg["ranks"]]
    return cfg


def _resolve_model(model: str, config_path: str) -> str:
    """A model given as 'configs/x.json' works from any working directory."""
    for cand in (model, os.path.join(os.path.dirname(os.path.abspath(config_path)), os.path.basename(model)),
                 os.path.join(CONFIGS_DIR, os.path.basename(model))):
        if os.path.exists(cand):
            return cand
    return model  # a preset name: resolve_preset takes it from here


# -- environment ----------------------------------------------------------------------------
def git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.check_output(["git", "-C", here, "rev-parse", "--short", "HEAD"], text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                        text=True, stderr=subprocess.DEVNULL).strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:  # the device machine's copy may carry no .git
        return "unknown"


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def _jax_backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:
        return False


# -- the replay loop ------------------------------------------------------------------------
@dataclasses.dataclass
class Replay:
    records: list  # metrics.RequestRecord of every request that arrived
    elapsed_s: float
    stopped: str  # "done" | "slo_known" | "drain_cap" | "deadline"


def make_prompts(trace: Trace, vocab_size: int, seed: int) -> list:
    """Random prompt token ids of the trace's lengths (made before timing)."""
    rng = np.random.default_rng(seed + 7919)
    return [rng.integers(0, vocab_size, int(n)).tolist() for n in trace.prompt_len]


def replay(engine, trace: Trace, adapter_of: Callable[[int], Optional[str]], prompts: Sequence[list],
           slo_ttft_s: float, max_drain_s: float, stop_when_slo_known: bool = False,
           deadline: Optional[float] = None, desc: str = "replay", progress: bool = True) -> Replay:
    """Feed requests to `engine` as their arrival times pass, stepping it otherwise.

    Each request's arrival is its scheduled time (so time spent inside a step
    before the loop gets to add it counts as queueing, as a client would see
    it). Stops when everything finished, or `max_drain_s` after the last
    arrival, or at `deadline` (time.monotonic()), or (with
    `stop_when_slo_known`) once every request has its first token or has
    waited `slo_ttft_s` without one; requests left then are aborted.
    """
    from tqdm import tqdm

    n = len(trace)
    reqs: list = []
    t0 = time.monotonic()
    last_arrival = t0 + (float(trace.arrival_s[-1]) if n else 0.0)
    stopped, next_check = "done", 0.0
    bar = tqdm(total=n, desc=desc, unit="req", mininterval=5, disable=not progress)
    try:
        while True:
            now = time.monotonic()
            rel = now - t0
            while len(reqs) < n and trace.arrival_s[len(reqs)] <= rel:
                i = len(reqs)
                sp = SamplingParams(max_tokens=int(trace.output_len[i]), temperature=0.0, ignore_eos=True, seed=i)
                r = engine.add_request(prompts[i], adapter_of(i), sp)
                r.arrival = t0 + float(trace.arrival_s[i])
                reqs.append(r)
            if deadline is not None and now > deadline:
                stopped = "deadline"
                break
            if len(reqs) == n:
                if now - last_arrival > max_drain_s:
                    stopped = "drain_cap"
                    break
                if stop_when_slo_known and now >= next_check:
                    next_check = now + 0.05
                    if all(r.first_token_time is not None or now - r.arrival >= slo_ttft_s for r in reqs):
                        stopped = "slo_known"
                        break
            if engine.has_work():
                bar.update(len(engine.step()))
            elif len(reqs) < n:
                time.sleep(min(0.002, max(0.0, float(trace.arrival_s[len(reqs)]) - (time.monotonic() - t0))))
            else:
                break
    finally:
        bar.close()
        end = time.monotonic()
        for r in reqs:
            if not r.finished:
                engine.abort(r.id)
    records = []
    for r in reqs:
        ok = r.finish_reason in ("length", "stop")
        records.append(metrics.RequestRecord(
            arrival=r.arrival - t0, prompt_len=len(r.prompt_ids), output_len=r.sampling.max_tokens,
            generated=len(r.output_ids),
            first_token=None if r.first_token_time is None else r.first_token_time - t0,
            finish=(r.finish_time - t0) if ok else None))
    if stopped == "done" and records:
        elapsed = max(rec.finish for rec in records if rec.finish is not None) if any(
            rec.finish is not None for rec in records) else end - t0
    else:
        elapsed = end - t0
    return Replay(records, elapsed, stopped)


# -- adapters -------------------------------------------------------------------------------
def register_adapters(llm, n: int, ranks: Sequence[int], modules: Sequence[str], mode: str, budget_gb: float,
                      seed: int) -> dict:
    """Register synthetic adapters 0..n-1 (ranks round-robin) that are not registered yet.

    "distinct": every adapter has its own host buffer (add_synthetic_adapters).
    "shared": one host buffer per rank, aliased by every adapter of that rank.
    A swap-in copies the same bytes host->device either way; sharing only
    saves host memory, which S2/S4 at n = 1000-2000 would otherwise exceed
    (e.g. S2, n = 2000: ~126 GB). "auto" shares above `budget_gb`.
    """
    from ..memory import layout

    cfg, store = llm.model_cfg, llm.engine.store
    rank_of = adapter_ranks(n, ranks)
    per = {r: cfg.num_layers * layout.num_rows(cfg, {m: r for m in modules}) * layout.row_width(cfg)
           * store.dtype.itemsize for r in set(rank_of)}
    total = sum(per[r] for r in rank_of)
    shared = mode == "shared" or (mode == "auto" and total > budget_gb * 1e9)
    t = time.monotonic()
    for r in sorted(set(rank_of)):
        names = [adapter_name(i) for i in range(n) if rank_of[i] == r and adapter_name(i) not in store]
        if not names:
            continue
        llm.add_synthetic_adapters(names, r, tuple(modules), seed=seed + r, shared=shared)
    info = {"adapters_registered": len(store), "adapter_host_bytes_logical": total,
            "adapter_host_memory": "shared" if shared else "distinct", "register_s": time.monotonic() - t}
    log.info("registered %d adapters (%s host buffers, %.1f GB logical) in %.1f s", n, info["adapter_host_memory"],
             total / 1e9, info["register_s"])
    return info


# -- the benchmark --------------------------------------------------------------------------
def _stats_delta(before: dict, after: dict) -> dict:
    keys = ("swaps_in", "swaps_out", "preemptions", "requests_aborted", "steps", "tokens_generated")
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def _peft_phase(cfg: dict, model_path: str, model_cfg, ns: list, traces: dict, prompts: list,
                deadline: float) -> dict:
    """n -> (PEFT summary or None, note), for every n. One PEFT model (the largest n within the cap) serves all."""
    pc = cfg["peft"]
    out: dict = {}
    if not pc.get("enabled", True):
        return {n: (None, "HF PEFT baseline disabled (peft.enabled=false)") for n in ns}
    todo = [n for n in ns if n <= int(pc["n_cap"])]
    for n in ns:
        if n not in todo:
            out[n] = (None, f"HF PEFT not run at n={n} (above peft.n_cap={pc['n_cap']}; S-LoRA's Table 3 also "
                            "leaves PEFT out at n >= 1000)")
    if not todo:
        return out
    runs = []
    for n in todo:
        trace = traces[n].head(float(pc["duration_s"]))
        runs.append({"n": n, "trace": trace, "prompts": prompts[: len(trace)], "slo_ttft_s": float(cfg["slo_ttft_s"]),
                     "max_batch": int(pc["max_batch"]), "time_limit_s": float(pc["time_limit_s"])})
    ranks = adapter_ranks(max(todo), cfg["ranks"])
    budget = deadline - time.monotonic()
    try:
        if pc.get("subprocess"):
            import sys
            import tempfile

            from .peft_baseline import write_job

            with tempfile.TemporaryDirectory() as tmp:
                job, res = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
                write_job(job, model_path, ranks, cfg["modules"], runs, budget, pc.get("device"), cfg["dtype"],
                          int(cfg["seed"]), bool(cfg["progress"]))
                proc = subprocess.run([sys.executable, "-m", "slora_jax.bench.peft_baseline", "--job", job, "--out",
                                       res], timeout=budget + 120)
                if proc.returncode != 0 or not os.path.exists(res):
                    raise RuntimeError(f"the PEFT child process exited with status {proc.returncode}")
                with open(res) as f:
                    got = {int(k): v for k, v in json.load(f).items()}
        else:
            if _jax_backend_started() and device_name().startswith("gpu"):
                log.warning("JAX already holds the GPU; the PEFT baseline may run out of memory")
            from .peft_baseline import run_jobs

            got = run_jobs(model_cfg, ranks, cfg["modules"], runs, budget, pc.get("device"), cfg["dtype"],
                           int(cfg["seed"]), bool(cfg["progress"]))
    except Exception as e:  # a missing torch/peft, an OOM or a crash must not lose the engine's results
        log.exception("HF PEFT baseline failed")
        got = {n: {"error": f"HF PEFT baseline failed: {type(e).__name__}: {e}"[:300]} for n in todo}
    for n in todo:
        s = got.get(n) or {"error": "HF PEFT produced no result"}
        if "error" in s:
            out[n] = (None, f"HF PEFT at n={n}: {s['error']}")
            continue
        note = (f"HF PEFT (mixed-adapter batches of <= {pc['max_batch']} through adapter_names, static batching, "
                f"FCFS) served the first {s['trace_duration_s']:.1f} s of the trace ({s['trace_requests']} "
                f"requests) with all {n} adapters")
        if s["hit_time_limit"]:
            note += (f"; it was stopped at its {s['time_limit_s']:.0f} s limit with {s['finished']} of the "
                     f"{s['requests']} requests that had arrived finished (throughput = finished / limit; "
                     f"generated tokens / mean output length give {s['token_equivalent_req_s']:.3f} req/s)")
        out[n] = (s, note)
        log.info("PEFT n=%d: %.3f req/s, %.1f tok/s, SLO %.2f%s", n, s["throughput_req_s"], s["tokens_per_s"],
                 s["slo_attainment"] or 0.0, " (time limit)" if s["hit_time_limit"] else "")
    return out


def rate_note(points: dict, rs: dict, probed: list, out_of_time: bool, main_rate: float) -> str:
    thr = float(rs["threshold"])
    best = metrics.max_sustainable_rate(points, thr)
    head = (f"max sustainable rate (SLO attainment >= {thr:g}): bisection over {sorted(rs['rates'])} req/s with "
            f"{rs['probe_s']:g} s probes and the main run at {main_rate:g} req/s; probed {sorted(probed)}")
    if out_of_time:
        head += "; the search stopped early (time budget), so the figure is a lower bound"
    if best is None:
        return head + "; no measured rate met the target"
    if best >= max(max(rs["rates"]), main_rate):
        return head + f"; even the highest rate ({best:g} req/s) met the target: a lower bound"
    return head


def run_from_config(config_path: str, out_dir: str, overrides: Optional[dict] = None) -> list[dict]:
    """Run the setting of `config_path` (with `--set` overrides); write and return one result per n.

    Each `<out>/<setting>-<n>.json` is written as soon as its main run is done
    and rewritten once its rate search is, so a run killed late keeps them.
    """
    cfg = load_config(config_path, overrides)
    t_start = time.monotonic()
    deadline = t_start + float(cfg["time_budget_s"])  # optional phases stop here
    hard_deadline = deadline + float(cfg.get("time_budget_grace_s", 30.0))  # main runs are cut here
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = f"slora-jax bench --config {config_path} --out {out_dir}" + "".join(
        f" --set {k}={v}" for k, v in (overrides or {}).items())
    model_path = _resolve_model(cfg["model"], config_path)
    model_cfg, _ = load_model_config(model_path)
    ns = sorted(int(n) for n in cfg["n_adapters"])
    ranks = [int(r) for r in cfg["ranks"]]
    slo = float(cfg["slo_ttft_s"])
    seed = int(cfg["seed"])
    progress = bool(cfg["progress"])
    rs = cfg["rate_search"]

    def trace_for(n: int, rate: float, duration: float, seed: int) -> Trace:
        return generate_trace(n, rate, duration, cfg["cv"], cfg["alpha"], cfg["input_range"], cfg["output_range"],
                              seed)

    traces = {n: trace_for(n, cfg["rate"], cfg["duration_s"], seed) for n in ns}
    prompts = make_prompts(traces[ns[0]], model_cfg.vocab_size, seed)  # the lengths are the same for every n
    assert all(np.array_equal(traces[n].prompt_len, traces[ns[0]].prompt_len) for n in ns)
    log.info("setting %s: model %s, n=%s, ranks %s, rate %g req/s, %d requests over %g s", cfg["setting"],
             model_cfg.name, ns, ranks, cfg["rate"], len(traces[ns[0]]), cfg["duration_s"])

    # 1. HF PEFT, before JAX takes the device
    peft = _peft_phase(cfg, model_path, model_cfg, ns, traces, prompts, deadline)

    # 2. the engine
    import jax

    if cfg.get("compile_cache_dir"):
        jax.config.update("jax_compilation_cache_dir", cfg["compile_cache_dir"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from ..api import LLM

    t = time.monotonic()
    llm = LLM(model_path, max_rank=max(ranks), dtype=cfg["dtype"], kernels=cfg["kernels"], seed=seed,
              **cfg["engine"])
    engine = llm.engine
    adapters_info = register_adapters(llm, ns[-1], ranks, cfg["modules"], cfg["adapter_host_memory"],
                                      float(cfg["adapter_host_budget_gb"]), seed)
    setup_s = time.monotonic() - t
    st = llm.stats()
    engine_info = dataclasses.asdict(llm.engine_cfg)
    engine_info.update({"num_pages": st["pages_total"], "pool_bytes": st["pool_bytes"], "kernels": st["kernels"]})
    n_programs = engine.runner.cache_size

    # warm-up: compile every step program, then (optionally) replay a short trace to warm everything else.
    # Batches without any adapter run a program without LoRA, so the base-only run gets a pass of its own.
    wc = cfg["warmup"]
    t = time.monotonic()
    n_bucket_programs = engine.warmup(lora=True)  # every bucket shape, with and without LoRA, compiled in parallel
    log.info("compiled %d step programs (every bucket shape) in %.1f s", n_bucket_programs, time.monotonic() - t)
    if float(wc.get("duration_s", 0)) > 0:
        wtrace = trace_for(ns[-1], float(wc["rate"]), float(wc["duration_s"]), seed + 1)
        wprompts = make_prompts(wtrace, model_cfg.vocab_size, seed + 1)
        passes = [("warm-up", lambda i: adapter_name(int(wtrace.adapter[i])))]
        if cfg.get("base_only", True):
            passes.append(("warm-up base-only", lambda i: None))
        for desc, adapter_of in passes:
            wr = replay(engine, wtrace, adapter_of, wprompts, slo, max_drain_s=float(wc["max_drain_s"]),
                        deadline=deadline, desc=desc, progress=progress)
            log.info("%s: %d requests, %.1f s, stopped: %s, %d compiled programs", desc, len(wr.records),
                     time.monotonic() - t, wr.stopped, n_programs())
    warmup_s = time.monotonic() - t
    programs_after_warmup = n_programs()

    def timed_run(trace: Trace, adapter_of, desc: str) -> dict:
        before, p0 = llm.stats(), n_programs()
        rep = replay(engine, trace, adapter_of, prompts, slo, max_drain_s=float(cfg["max_drain_s"]),
                     deadline=hard_deadline, desc=desc, progress=progress)
        s = metrics.summarize(rep.records, rep.elapsed_s, slo)
        s.update({"stopped": rep.stopped, "compiled_during": n_programs() - p0,
                  "engine": _stats_delta(before, llm.stats())})
        return s

    # 3. the base model alone on the same trace
    base = None
    if cfg.get("base_only", True):
        base = timed_run(traces[ns[0]], lambda i: None, "base-only")
        log.info("base only: %.3f req/s, %.1f tok/s, SLO %.2f, stopped: %s", base["throughput_req_s"],
                 base["tokens_per_s"], base["slo_attainment"] or 0.0, base["stopped"])

    dev, commit = device_name(), git_commit()
    os.makedirs(out_dir, exist_ok=True)

    def result(n: int, s: dict, points: dict, search_note: str) -> dict:
        peft_s, peft_note = peft.get(n, (None, "HF PEFT not run"))
        notes = [peft_note, search_note]
        if s["stopped"] != "done":
            notes.append(f"the run was cut ({s['stopped']}) with {s['unfinished']} of {s['requests']} requests "
                         "unfinished; throughput counts the finished ones over the run's wall time")
        if s["compiled_during"]:
            notes.append(f"{s['compiled_during']} step programs were compiled during the timed run (warm-up did not "
                         "cover them); their compile time is inside these figures")
        if base and base["compiled_during"]:
            notes.append(f"{base['compiled_during']} step programs were compiled during the base-only run")
        if adapters_info["adapter_host_memory"] == "shared":
            notes.append("the synthetic adapters share one host buffer per rank (to fit host memory); a swap-in "
                         "copies the same bytes as with distinct buffers")
        if float(cfg["duration_s"]) < 120:
            notes.append(f"a {cfg['duration_s']:g} s trace ({s['requests']} requests) where S-LoRA's Table 3 ran "
                         "120 s; throughput is bounded by the offered rate (up to the trace's sampling noise)")
        return {
            "setting": cfg["setting"], "model": model_cfg.name, "model_config": cfg["model"], "n_adapters": n,
            "ranks": ranks, "modules": list(cfg["modules"]), "rate": float(cfg["rate"]), "cv": float(cfg["cv"]),
            "alpha": float(cfg["alpha"]), "duration_s": float(cfg["duration_s"]),
            "input_range": list(cfg["input_range"]), "output_range": list(cfg["output_range"]), "seed": seed,
            "slo_ttft_s": slo,
            "requests": s["requests"], "throughput_req_s": s["throughput_req_s"], "tokens_per_s": s["tokens_per_s"],
            "avg_latency_s": s["avg_latency_s"], "avg_ttft_s": s["avg_ttft_s"], "slo_attainment": s["slo_attainment"],
            "max_sustainable_rate": metrics.max_sustainable_rate(points, float(rs["threshold"])),
            "baseline_peft_throughput_req_s": None if peft_s is None else peft_s["throughput_req_s"],
            "base_only_throughput_req_s": None if base is None else base["throughput_req_s"],
            "device": dev, "jax_version": jax.__version__, "git_commit": commit, "date": date, "command": command,
            "notes": notes,
            "run": s, "base_only": base, "peft": peft_s,
            "rate_search": {"threshold": float(rs["threshold"]), "probe_s": float(rs["probe_s"]),
                            "points": {f"{k:g}": v for k, v in sorted(points.items())}},
            "engine": engine_info, "adapters": adapters_info,
            "timing": {"setup_s": setup_s, "warmup_s": warmup_s, "total_s": time.monotonic() - t_start,
                       "compiled_programs_after_warmup": programs_after_warmup,
                       "compiled_programs": n_programs()},
        }

    def write(res: dict) -> None:
        path = os.path.join(out_dir, f"{res['setting']}-{res['n_adapters']}.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        log.info("wrote %s", path)

    # 4. S-LoRA at each n
    main: dict = {}
    results: dict = {}
    for n in ns:
        if time.monotonic() > hard_deadline - 5:
            log.error("time budget used up: no run for n=%d (raise time_budget_s or split n_adapters)", n)
            continue
        tr = traces[n]
        s = timed_run(tr, lambda i, tr=tr: adapter_name(int(tr.adapter[i])), f"{cfg['setting']} n={n}")
        main[n] = s
        log.info("%s n=%d: %.3f req/s, %.1f tok/s, avg latency %.2f s, avg ttft %.2f s, SLO %.2f, stopped: %s",
                 cfg["setting"], n, s["throughput_req_s"], s["tokens_per_s"], s["avg_latency_s"] or -1,
                 s["avg_ttft_s"] or -1, s["slo_attainment"] or 0.0, s["stopped"])
        results[n] = result(n, s, {float(cfg["rate"]): s["slo_attainment"]}, "max sustainable rate: not searched yet")
        write(results[n])

    # 5. maximum sustainable rate, with what is left of the budget: the largest n first (the hardest case,
    # and the one S-LoRA's goals name), so a short budget still searches where it matters
    done = [n for n in reversed(ns) if n in main]
    for k, n in enumerate(done):
        known = {float(cfg["rate"]): main[n]["slo_attainment"]}
        if not rs.get("enabled", True):
            results[n] = result(n, main[n], known, "max sustainable rate: search disabled (rate_search.enabled)")
            write(results[n])
            continue
        probe_cost = float(rs["probe_s"]) + slo + 2.0
        budget_n = min((deadline - time.monotonic()) / (len(done) - k), probe_cost * int(rs.get("max_probes", 4)))
        t_n = time.monotonic()
        probed: list = []
        out_of_time: list = []

        def probe(rate: float, n=n, t_n=t_n, budget_n=budget_n, probed=probed, out_of_time=out_of_time):
            if time.monotonic() - t_n + probe_cost > budget_n:
                out_of_time.append(rate)
                return None
            tr = trace_for(n, rate, float(rs["probe_s"]), seed + 2)
            rep = replay(engine, tr, lambda i: adapter_name(int(tr.adapter[i])),
                         make_prompts(tr, model_cfg.vocab_size, seed + 2), slo, max_drain_s=slo + 1.0,
                         stop_when_slo_known=True, deadline=min(time.monotonic() + 2 * probe_cost, hard_deadline),
                         desc=f"rate {rate:g} n={n}", progress=progress)
            a = metrics.slo_attainment(rep.records, slo)
            probed.append(rate)
            log.info("probe n=%d rate %g: SLO attainment %.3f (%d requests)", n, rate, a or 0.0, len(rep.records))
            return a

        points = metrics.search_rates(rs["rates"], probe, float(rs["threshold"]), known=known)
        results[n] = result(n, main[n], points, rate_note(points, rs, probed, bool(out_of_time), cfg["rate"]))
        write(results[n])
    log.info("setting %s done in %.0f s", cfg["setting"], time.monotonic() - t_start)
    return [results[n] for n in ns if n in results]
