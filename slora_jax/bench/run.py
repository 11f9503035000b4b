"""`slora-jax bench`: replay S-LoRA's workload in real time against the engine.

One invocation serves one setting (configs/bench-*.json) for each n in its
`n_adapters` list, all in this process. Offered load (the default), in order:

1. HF PEFT baseline (peft_baseline.py) for each n up to `peft.n_cap`, on the
   head of the trace (`peft.duration_s`), stopped at `peft.time_limit_s`. It
   runs first, before JAX touches the device, and gives its GPU memory back
   when done, so that the engine's pool can then take most of the device.
2. The engine: random weights of the model preset, max(n) synthetic adapters
   (q,k,v,o; ranks round-robin), every step program compiled (warm-up), then
3. the base model alone (every request adapter=None) on the same trace: the
   ceiling LoRA serving is measured against;
4. the S-LoRA run for each n (the same arrivals and lengths; only the adapter
   indices depend on n), the trace offered at its rate: its throughput is
   bounded by that rate;
5. the maximum sustainable rate per n (largest n first): `rate_search.rates`
   probed in rising order up to the first whose SLO attainment falls below
   `rate_search.threshold`, or up to the capacity (`rate_search.capacity_bound`:
   `capacity_requests` requests offered at once first; a short probe above it
   passes on a burst the running batch absorbs, while its queue grows), with
   whatever is left of `time_budget_s`.

Saturated (`--set saturate=true`): the capacity, not an offered load. Steps
2-4 with `saturate_requests` requests all offered at once, base-only and each
n on the same requests; no PEFT, no rate search. Each n's result carries
`lora_vs_base` (its throughput over base-only's, same process).

Prefix cache on / off (`compare_prefix_cache`, the chat setting): step 2,
then the largest n's requests at the offered rate (first-token latency) and
all at once (`saturate_requests`, throughput), each with the prefix cache on
and off on the same engine, every run from an empty pool cache (no adapter
resident, no prefix cached; the warm-up replay has compiled the rest). With
`system_prompt_len` each prompt starts with its adapter's system prompt
(workload.py). No base-only, PEFT or rate search.

Every phase is time-bounded (see `DEFAULTS`). Results go to
`<out>/<setting>-<n>.json` (saturated: `<out>/<setting>-sat-<n>.json`; prefix
cache on / off: `<out>/<setting>-prefix.json`); report.py turns them into
BENCHMARKS.md and plots.
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
from .workload import Trace, adapter_name, adapter_ranks, generate_trace, make_prompts

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
    "engine": {},  # EngineConfig overrides: max_batch_tokens, num_pages | mem_fraction, max_running (default: what the
    # KV pages hold), ...
    "warmup": {"rate": 10.0, "duration_s": 20.0, "max_drain_s": 40.0},  # per pass (LoRA, then base-only)
    "base_only": True,
    "rate_search": {"enabled": True, "rates": [2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 56, 64], "probe_s": 15.0,
                    "threshold": 0.9, "max_probes": 4, "capacity_bound": True,
                    "capacity_requests": None},  # None: saturate_requests
    # saturated mode: `saturate_requests` requests of the setting's lengths and adapters, all offered at once;
    # each run stops `saturate_max_s` after its start (unfinished requests count as such)
    "saturate": False,
    "saturate_requests": 1000,
    "saturate_max_s": 240.0,
    "system_prompt_len": 0,  # > 0: every prompt starts with its adapter's system prompt of this many tokens
    "prefix_warm_s": 0.0,  # prefix cache on / off: seconds of the traffic served (untimed) before the offered run
    "prefix_more_rates": [],  # prefix cache on / off: offered rates measured after `rate` (first-token latency)
    "compare_prefix_cache": False,  # the run of the chat setting: prefix cache on / off (module docstring)
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
            finish=(r.finish_time - t0) if ok else None, cached_tokens=r.cached_tokens))
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
    keys = ("swaps_in", "swaps_out", "preemptions", "requests_aborted", "steps", "tokens_generated",
            "prefix_query_tokens", "prefix_hit_tokens", "host_s", "device_wait_s", "mask_wait_s")
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


@dataclasses.dataclass
class Plan:
    """What a run serves and within which time, decided before anything touches the device."""

    cfg: dict
    config_path: str
    out_dir: str
    model_path: str
    model_cfg: object
    ns: list
    ranks: list
    traces: dict  # n -> Trace (the same arrivals and lengths for every n)
    prompts: dict  # n -> prompt token ids of traces[n] (system prompts follow each n's adapter indices)
    t_start: float
    deadline: float  # optional phases (PEFT, warm-up, rate search) stop here
    hard_deadline: float  # main runs are cut here
    date: str
    command: str

    @property
    def slo(self) -> float:
        return float(self.cfg["slo_ttft_s"])

    @property
    def saturate(self) -> bool:
        return bool(self.cfg.get("saturate"))

    def trace(self, n: int, rate: float, duration_s: float, seed: int) -> Trace:
        c = self.cfg
        return generate_trace(n, rate, duration_s, c["cv"], c["alpha"], c["input_range"], c["output_range"], seed,
                              int(c["system_prompt_len"]))

    def requests(self, saturate: bool) -> "Plan":
        """This plan with the setting's requests: its trace at its rate, or (`saturate`) a trace of
        `saturate_requests` requests (the same seed) offered at once; the traces and prompts of every n."""
        c = self.cfg
        rate, seed = float(c["rate"]), int(c["seed"])
        duration = (int(c["saturate_requests"]) + 0.5) / rate if saturate else float(c["duration_s"])
        traces = {n: self.trace(n, rate, duration, seed) for n in self.ns}
        if saturate:
            traces = {n: tr.at_once() for n, tr in traces.items()}
        prompts = {n: make_prompts(tr, self.model_cfg.vocab_size, seed) for n, tr in traces.items()}
        return dataclasses.replace(self, cfg={**c, "saturate": saturate}, traces=traces, prompts=prompts)


def plan_run(config_path: str, out_dir: str, overrides: Optional[dict] = None) -> Plan:
    """The configuration, the model's shape, the traces and prompts, the deadlines."""
    cfg = load_config(config_path, overrides)
    t_start = time.monotonic()
    deadline = t_start + float(cfg["time_budget_s"])
    model_path = _resolve_model(cfg["model"], config_path)
    model_cfg, _ = load_model_config(model_path)
    ns = sorted(int(n) for n in cfg["n_adapters"])
    plan = Plan(cfg, config_path, out_dir, model_path, model_cfg, ns, [int(r) for r in cfg["ranks"]], {}, {},
                t_start, deadline, deadline + float(cfg.get("time_budget_grace_s", 30.0)),
                datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                f"slora-jax bench --config {config_path} --out {out_dir}" + "".join(
                    f" --set {k}={v}" for k, v in (overrides or {}).items()))
    plan = plan.requests(plan.saturate)
    assert all(np.array_equal(plan.traces[n].prompt_len, plan.traces[ns[0]].prompt_len) for n in ns)
    log.info("setting %s: model %s, n=%s, ranks %s, %s, %d requests", cfg["setting"], model_cfg.name, ns,
             plan.ranks, "all offered at once" if plan.saturate else f"{cfg['rate']:g} req/s over "
             f"{cfg['duration_s']:g} s", len(plan.traces[ns[0]]))
    return plan


@dataclasses.dataclass
class Served:
    """The engine of a run and what it was set up with."""

    llm: object
    adapters_info: dict
    engine_info: dict
    setup_s: float
    warmup_s: float = 0.0
    programs_after_warmup: int = 0

    @property
    def engine(self):
        return self.llm.engine

    def programs(self) -> int:
        return self.engine.runner.cache_size()

    def stats(self) -> dict:
        return self.llm.stats()


def start_engine(plan: Plan) -> Served:
    """Random weights of the preset, the pool, the synthetic adapters of the largest n."""
    import jax

    cfg = plan.cfg
    if cfg.get("compile_cache_dir"):
        jax.config.update("jax_compilation_cache_dir", cfg["compile_cache_dir"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from ..api import LLM

    t = time.monotonic()
    llm = LLM(plan.model_path, max_rank=max(plan.ranks), dtype=cfg["dtype"], kernels=cfg["kernels"],
              seed=int(cfg["seed"]), **cfg["engine"])
    adapters_info = register_adapters(llm, plan.ns[-1], plan.ranks, cfg["modules"], cfg["adapter_host_memory"],
                                      float(cfg["adapter_host_budget_gb"]), int(cfg["seed"]))
    st = llm.stats()
    engine_info = dataclasses.asdict(llm.engine_cfg)
    engine_info.update({"num_pages": st["pages_total"], "pool_bytes": st["pool_bytes"], "kernels": st["kernels"],
                        "max_running": llm.engine.scheduler.max_running})
    return Served(llm, adapters_info, engine_info, time.monotonic() - t)


def serve_untimed(plan: Plan, served: Served, n: int, rate: float, duration_s: float, seed: int, desc: str,
                  max_drain_s: float, deadline: float, base_only: bool = False,
                  system_seed: Optional[int] = None) -> Replay:
    """Replay `duration_s` of the setting's traffic (trace and prompts of `seed`; system prompts of
    `system_seed`, default `seed`) at `rate`, outside any timed run: through n's adapters, or `base_only`."""
    tr = plan.trace(n, rate, duration_s, seed)
    prompts = make_prompts(tr, plan.model_cfg.vocab_size, seed, system_seed)
    adapter_of = (lambda i: None) if base_only else (lambda i: adapter_name(int(tr.adapter[i])))
    return replay(served.engine, tr, adapter_of, prompts, plan.slo, max_drain_s=max_drain_s, deadline=deadline,
                  desc=desc, progress=bool(plan.cfg["progress"]))


def warm_up(plan: Plan, served: Served) -> None:
    """Compile every step program, then (optionally) replay a short trace to warm everything else.

    Batches without any adapter run a program without LoRA, so the base-only run gets a pass of its own."""
    cfg, wc, engine = plan.cfg, plan.cfg["warmup"], served.engine
    t = time.monotonic()
    n_bucket_programs = engine.warmup(lora=True)  # every bucket shape, with and without LoRA, compiled in parallel
    log.info("compiled %d step programs (every bucket shape) in %.1f s", n_bucket_programs, time.monotonic() - t)
    if float(wc.get("duration_s", 0)) > 0:
        passes = [("warm-up", False)] + ([("warm-up base-only", True)] if cfg.get("base_only", True) else [])
        for desc, base in passes:
            wr = serve_untimed(plan, served, plan.ns[-1], float(wc["rate"]), float(wc["duration_s"]),
                               int(cfg["seed"]) + 1, desc, float(wc["max_drain_s"]), plan.deadline, base_only=base)
            log.info("%s: %d requests, %.1f s, stopped: %s, %d compiled programs", desc, len(wr.records),
                     time.monotonic() - t, wr.stopped, served.programs())
    served.warmup_s = time.monotonic() - t
    served.programs_after_warmup = served.programs()


def start_cold(served: Served) -> None:
    """The pool as after start-up: no cached prefix block, no resident adapter. Runs replay the same prompts
    (base-only, each n, the probes of one seed), so blocks one run leaves cached would serve the next one's
    prompts (the synthetic adapters of a shared buffer are one identity) and measure it on cached KV."""
    served.engine.drain()  # a step a deadline left in flight
    served.llm.clear_cache()


def timed_run(plan: Plan, served: Served, trace: Trace, prompts: list, adapter_of, desc: str,
              records: Optional[list] = None, cold: bool = True) -> dict:
    """One replay of `trace`, summarized; cut at the hard deadline. `records`: a list that receives its
    RequestRecords. `cold`: from the pool as after start-up (`start_cold`); else as the last run left it."""
    if cold:
        start_cold(served)
    before, p0 = served.stats(), served.programs()
    drain = float(plan.cfg["saturate_max_s"] if plan.saturate else plan.cfg["max_drain_s"])
    rep = replay(served.engine, trace, adapter_of, prompts, plan.slo, max_drain_s=drain,
                 deadline=plan.hard_deadline, desc=desc, progress=bool(plan.cfg["progress"]))
    s = metrics.summarize(rep.records, rep.elapsed_s, plan.slo)
    if records is not None:
        records.extend(rep.records)
    s.update({"stopped": rep.stopped, "compiled_during": served.programs() - p0,
              "engine": _stats_delta(before, served.stats())})
    log.info("%s: %.3f req/s, %.1f tok/s, avg latency %.2f s, avg ttft %.2f s, SLO %.2f, stopped: %s", desc,
             s["throughput_req_s"], s["tokens_per_s"], s["avg_latency_s"] or -1, s["avg_ttft_s"] or -1,
             s["slo_attainment"] or 0.0, s["stopped"])
    return s


def lora_run(plan: Plan, served: Served, n: int, desc: str = "", records: Optional[list] = None,
             cold: bool = True) -> dict:
    tr = plan.traces[n]
    return timed_run(plan, served, tr, plan.prompts[n], lambda i: adapter_name(int(tr.adapter[i])),
                     f"{plan.cfg['setting']} n={n}{desc}", records, cold)


def base_only_run(plan: Plan, served: Served) -> Optional[dict]:
    """The base model alone on the same requests (None where the setting turns it off)."""
    if not plan.cfg.get("base_only", True):
        return None
    n = plan.ns[0]  # the prompts of n's adapter indices (their system prompts, if any)
    return timed_run(plan, served, plan.traces[n], plan.prompts[n], lambda i: None, "base-only")


def measure_capacity(plan: Plan, served: Served, n: int) -> float:
    """Req/s at n with `rate_search.capacity_requests` requests of the setting offered at once."""
    k = int(plan.cfg["rate_search"].get("capacity_requests") or plan.cfg["saturate_requests"])
    sat = dataclasses.replace(plan, cfg={**plan.cfg, "saturate_requests": k}).requests(saturate=True)
    return lora_run(sat, served, n, f", {k} at once (the rate search's bound)")["throughput_req_s"]


def search_rate(plan: Plan, served: Served, n: int, known: dict, budget_s: float) -> tuple:
    """The maximum sustainable rate at n within `budget_s`: (every measured {rate: attainment}, a note, the
    capacity that bounds the search or None)."""
    rs, cfg = plan.cfg["rate_search"], plan.cfg
    t_n = time.monotonic()
    capacity = measure_capacity(plan, served, n) if rs.get("capacity_bound", True) else None
    probe_cost = float(rs["probe_s"]) + plan.slo + 2.0
    budget_s = min(budget_s, time.monotonic() - t_n + probe_cost * int(rs.get("max_probes", 4)))
    probed: list = []
    out_of_time: list = []
    seed = int(cfg["seed"]) + 2

    def probe(rate: float):
        if time.monotonic() - t_n + probe_cost > budget_s:
            out_of_time.append(rate)
            return None
        tr = plan.trace(n, rate, float(rs["probe_s"]), seed)
        start_cold(served)
        rep = replay(served.engine, tr, lambda i: adapter_name(int(tr.adapter[i])),
                     make_prompts(tr, plan.model_cfg.vocab_size, seed), plan.slo, max_drain_s=plan.slo + 1.0,
                     stop_when_slo_known=True, deadline=min(time.monotonic() + 2 * probe_cost, plan.hard_deadline),
                     desc=f"rate {rate:g} n={n}", progress=bool(cfg["progress"]))
        a = metrics.slo_attainment(rep.records, plan.slo)
        probed.append(rate)
        log.info("probe n=%d rate %g: SLO attainment %.3f (%d requests)", n, rate, a or 0.0, len(rep.records))
        return a

    points = metrics.search_rates(rs["rates"], probe, float(rs["threshold"]), known=known, capacity=capacity)
    return points, rate_note(points, rs, probed, bool(out_of_time), float(cfg["rate"]), capacity), capacity


def _peft_phase(plan: Plan) -> dict:
    """n -> (PEFT summary or None, note), for every n. One PEFT model (the largest n within the cap) serves all."""
    cfg, model_path, model_cfg, ns = plan.cfg, plan.model_path, plan.model_cfg, plan.ns
    traces, prompts, deadline = plan.traces, plan.prompts, plan.deadline
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
        runs.append({"n": n, "trace": trace, "prompts": prompts[n][: len(trace)], "slo_ttft_s": float(cfg["slo_ttft_s"]),
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


def rate_note(points: dict, rs: dict, probed: list, out_of_time: bool, main_rate: float,
              capacity: Optional[float] = None) -> str:
    thr = float(rs["threshold"])
    best = metrics.max_sustainable_rate(points, thr)
    head = (f"max sustainable rate (SLO attainment >= {thr:g}): rates {sorted(rs['rates'])} req/s probed in rising "
            f"order up to the first that fails, {rs['probe_s']:g} s probes, the main run at {main_rate:g} req/s; "
            f"probed {sorted(probed)}")
    if capacity is not None:
        head += f"; none above the capacity, {capacity:.2f} req/s with every request offered at once"
    if out_of_time:
        head += "; the probes stopped early (time budget)"
    if best is None:
        return head + "; no measured rate met the target"
    if metrics.rate_is_lower_bound(points, thr, rs["rates"], capacity):
        return head + f"; no measured rate failed, so {best:g} req/s is a lower bound"
    return head


def _notes(plan: Plan, served: Served, s: dict, base: Optional[dict], extra: Sequence[str]) -> list:
    notes = [x for x in extra if x]
    if s["stopped"] != "done":
        notes.append(f"the run was cut ({s['stopped']}) with {s['unfinished']} of {s['requests']} requests "
                     "unfinished; throughput counts the finished ones over the run's wall time")
    if s["compiled_during"]:
        notes.append(f"{s['compiled_during']} step programs were compiled during the timed run (warm-up did not "
                     "cover them); their compile time is inside these figures")
    if base and base["compiled_during"]:
        notes.append(f"{base['compiled_during']} step programs were compiled during the base-only run")
    if base and base["stopped"] != "done":
        notes.append(f"the base-only run was cut ({base['stopped']}) with {base['unfinished']} requests unfinished")
    if served.adapters_info["adapter_host_memory"] == "shared":
        notes.append("the synthetic adapters share one host buffer per rank (to fit host memory); a swap-in "
                     "copies the same bytes as with distinct buffers")
    if plan.saturate:
        notes.append(f"saturated: all {s['requests']} requests offered at once; throughput = finished requests / "
                     "the wall time from the first arrival to the last finish (the drain of the last ones included)")
    elif float(plan.cfg["duration_s"]) < 120:
        notes.append(f"a {plan.cfg['duration_s']:g} s trace ({s['requests']} requests) at an offered "
                     f"{plan.cfg['rate']:g} req/s where S-LoRA's Table 3 ran 120 s; throughput is bounded by the "
                     "offered rate (up to the trace's sampling noise)")
    return notes


def _provenance(plan: Plan) -> dict:
    """Where, when and how a result was measured: the keys every result JSON ends with."""
    import jax

    return {"device": device_name(), "jax_version": jax.__version__, "git_commit": git_commit(), "date": plan.date,
            "command": plan.command}


def _setup(plan: Plan, served: Served) -> dict:
    return {"engine": served.engine_info, "adapters": served.adapters_info,
            "timing": {"setup_s": served.setup_s, "warmup_s": served.warmup_s,
                       "total_s": time.monotonic() - plan.t_start,
                       "compiled_programs_after_warmup": served.programs_after_warmup,
                       "compiled_programs": served.programs()}}


def result(plan: Plan, served: Served, n: int, s: dict, base: Optional[dict], points: dict, notes: list,
           peft_s: Optional[dict] = None, capacity: Optional[float] = None) -> dict:
    """One n's result JSON."""
    cfg, rs = plan.cfg, plan.cfg["rate_search"]
    thr = float(rs["threshold"])
    base_tp = None if base is None else base["throughput_req_s"]
    out = {
        "setting": cfg["setting"], "model": plan.model_cfg.name, "model_config": cfg["model"], "n_adapters": n,
        "ranks": plan.ranks, "modules": list(cfg["modules"]), "saturated": plan.saturate, "rate": float(cfg["rate"]),
        "cv": float(cfg["cv"]), "alpha": float(cfg["alpha"]), "duration_s": float(cfg["duration_s"]),
        "input_range": list(cfg["input_range"]), "output_range": list(cfg["output_range"]),
        "system_prompt_len": int(cfg.get("system_prompt_len") or 0),
        "seed": int(cfg["seed"]), "slo_ttft_s": plan.slo,
        "requests": s["requests"], "throughput_req_s": s["throughput_req_s"], "tokens_per_s": s["tokens_per_s"],
        "avg_latency_s": s["avg_latency_s"], "avg_ttft_s": s["avg_ttft_s"], "slo_attainment": s["slo_attainment"],
        "base_only_throughput_req_s": base_tp,
        "base_only_tokens_per_s": None if base is None else base["tokens_per_s"],
        "lora_vs_base": s["throughput_req_s"] / base_tp if base_tp else None,
        "max_running": served.engine_info["max_running"], **_provenance(plan),
        "notes": notes, "run": s, "base_only": base, **_setup(plan, served),
    }
    if not plan.saturate:
        out.update({
            "max_sustainable_rate": metrics.max_sustainable_rate(points, thr),
            "max_sustainable_rate_is_lower_bound": metrics.rate_is_lower_bound(points, thr, rs["rates"], capacity),
            "baseline_peft_throughput_req_s": None if peft_s is None else peft_s["throughput_req_s"],
            "peft": peft_s,
            "rate_search": {"threshold": thr, "probe_s": float(rs["probe_s"]), "rates": sorted(rs["rates"]),
                            "points": {f"{k:g}": v for k, v in sorted(points.items())}, "capacity_req_s": capacity},
        })
    return out


def write_result(plan: Plan, res: dict, name: Optional[str] = None) -> str:
    """`res` as `<out>/<name>` (default: `<setting>[-sat]-<n>.json`)."""
    tag = "-sat" if res.get("saturated") else ""
    path = os.path.join(plan.out_dir, name or f"{res['setting']}{tag}-{res['n_adapters']}.json")
    os.makedirs(plan.out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    log.info("wrote %s", path)
    return path


def run_saturated(plan: Plan, served: Served) -> list[dict]:
    """Base-only, then each n, on the same requests offered at once; one result per n."""
    base = base_only_run(plan, served)
    results = []
    for n in plan.ns:
        if time.monotonic() > plan.hard_deadline - 5:
            log.error("time budget used up: no saturated run for n=%d (raise time_budget_s or split n_adapters)", n)
            continue
        s = lora_run(plan, served, n)
        res = result(plan, served, n, s, base, {}, _notes(plan, served, s, base, ()))
        write_result(plan, res)
        results.append(res)
        if res["lora_vs_base"] is not None:
            log.info("%s n=%d saturated: %.2f req/s, base only %.2f, LoRA / base %.3f, max_running %d",
                     plan.cfg["setting"], n, res["throughput_req_s"], res["base_only_throughput_req_s"],
                     res["lora_vs_base"], res["max_running"])
    return results


def run_offered(plan: Plan, served: Served, peft: dict) -> list[dict]:
    """Base-only, each n at the offered rate, then the rate search (largest n first); one result per n.

    Each result is written as soon as its main run is done and rewritten once its rate search is, so a
    run killed late keeps them."""
    cfg, rs = plan.cfg, plan.cfg["rate_search"]
    base = base_only_run(plan, served)
    main: dict = {}
    results: dict = {}

    def emit(n: int, points: dict, search_note: str, capacity: Optional[float] = None) -> None:
        peft_s, peft_note = peft.get(n, (None, "HF PEFT not run"))
        results[n] = result(plan, served, n, main[n], base, points,
                            _notes(plan, served, main[n], base, (peft_note, search_note)), peft_s, capacity)
        write_result(plan, results[n])

    for n in plan.ns:
        if time.monotonic() > plan.hard_deadline - 5:
            log.error("time budget used up: no run for n=%d (raise time_budget_s or split n_adapters)", n)
            continue
        main[n] = lora_run(plan, served, n)
        emit(n, {float(cfg["rate"]): main[n]["slo_attainment"]}, "max sustainable rate: not searched yet")
    # the largest n first (the hardest case, and the one S-LoRA's goals name), so a short budget still
    # searches where it matters
    done = [n for n in reversed(plan.ns) if n in main]
    for k, n in enumerate(done):
        known = {float(cfg["rate"]): main[n]["slo_attainment"]}
        if not rs.get("enabled", True):
            emit(n, known, "max sustainable rate: search disabled (rate_search.enabled)")
            continue
        points, note, capacity = search_rate(plan, served, n, known,
                                             (plan.deadline - time.monotonic()) / (len(done) - k))
        emit(n, points, note, capacity)
    return [results[n] for n in plan.ns if n in results]


# -- prefix cache on / off ------------------------------------------------------------------------
def hit_rate(s: dict) -> float:
    """Prompt tokens found in the prefix cache over those looked up, in one timed run (0 with the cache off)."""
    e = s["engine"]
    return e["prefix_hit_tokens"] / e["prefix_query_tokens"] if e["prefix_query_tokens"] else 0.0


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def _prefix_mode(runs: dict) -> dict:
    """One mode's figures: throughput and first-token latency at the offered rate, saturated throughput."""
    out: dict = {}
    o, s = runs.get("offered"), runs.get("saturated")
    if o:
        out.update({"throughput_req_s": o["throughput_req_s"], "tokens_per_s": o["tokens_per_s"],
                    "ttft_mean_s": o["avg_ttft_s"], "ttft_p50_s": o["p50_ttft_s"], "ttft_p99_s": o["p99_ttft_s"],
                    "hit_rate": hit_rate(o)})
    if s:
        out.update({"saturated_throughput_req_s": s["throughput_req_s"], "saturated_tokens_per_s": s["tokens_per_s"],
                    "saturated_hit_rate": hit_rate(s)})
    return {**out, "runs": runs}


def _prefix_notes(plan: Plan, runs: dict) -> list:
    c = plan.cfg
    warm = float(c.get("prefix_warm_s") or 0.0)
    before = (f", after {warm:g} s of the same traffic (another seed, the same system prompts) served untimed"
              if warm > 0 else "")
    notes = [f"the same requests with the prefix cache on and off on one engine (step programs compiled once), "
             f"each mode from an empty pool cache (no adapter resident, no prefix cached): {c['duration_s']:g} s "
             f"at {c['rate']:g} req/s (first-token latency){before}, then {c['saturate_requests']} requests of "
             "the setting (the same seed) offered at once (throughput)"]
    for mode, by in runs.items():
        for which, s in by.items():
            if s["stopped"] != "done":
                notes.append(f"{which}, prefix cache {mode}: cut ({s['stopped']}) with {s['unfinished']} of "
                             f"{s['requests']} requests unfinished")
            if s["compiled_during"]:
                notes.append(f"{which}, prefix cache {mode}: {s['compiled_during']} step programs compiled during "
                             "the timed run")
    return notes


def prefix_result(plan: Plan, served: Served, n: int, runs: dict) -> dict:
    """The result JSON of the prefix cache on / off comparison."""
    c = plan.cfg
    on, off = _prefix_mode(runs["on"]), _prefix_mode(runs["off"])
    return {
        "setting": c["setting"], "model": plan.model_cfg.name, "model_config": c["model"], "n_adapters": n,
        "ranks": plan.ranks, "system_prompt_len": int(c["system_prompt_len"]), "input_range": list(c["input_range"]),
        "output_range": list(c["output_range"]), "rate": float(c["rate"]), "cv": float(c["cv"]),
        "alpha": float(c["alpha"]), "duration_s": float(c["duration_s"]),
        "prefix_warm_s": float(c.get("prefix_warm_s") or 0.0), "saturate_requests": int(c["saturate_requests"]), "seed": int(c["seed"]), "on": on, "off": off,
        "ttft_p50_speedup": _ratio(off.get("ttft_p50_s"), on.get("ttft_p50_s")),
        "saturated_throughput_ratio": _ratio(on.get("saturated_throughput_req_s"),
                                             off.get("saturated_throughput_req_s")),
        "max_running": served.engine_info["max_running"], **_provenance(plan),
        "notes": _prefix_notes(plan, runs), **_setup(plan, served),
    }


def _serve_before(plan: Plan, served: Served, n: int, mode: str) -> None:
    """`prefix_warm_s` seconds of the setting's traffic (another seed), untimed, before an offered run: its
    first-token latency is then a server's that has been up, with the popular adapters' prefixes cached
    (as the LRU keeps them), not one's that starts from an empty cache."""
    warm_s = float(plan.cfg.get("prefix_warm_s") or 0.0)
    if warm_s <= 0:
        return
    rep = serve_untimed(plan, served, n, float(plan.cfg["rate"]), warm_s, int(plan.cfg["seed"]) + 2,
                        f"serving before the offered run, prefix cache {mode}", float(plan.cfg["max_drain_s"]),
                        plan.hard_deadline, system_seed=int(plan.cfg["seed"]))
    log.info("served %d requests (%.0f s of traffic) before the offered run, prefix cache %s", len(rep.records),
             warm_s, mode)


def cached_requests_ttft(on: list, off: list) -> dict:
    """First-token latency of the requests whose prefix the cache supplied (cache on), beside the same
    requests' with the cache off: the saving a cached prefix brings, apart from the misses around it."""
    idx = [i for i, r in enumerate(on) if r.cached_tokens > 0 and r.ttft is not None
           and i < len(off) and off[i].ttft is not None]
    if not idx:
        return {"requests": 0}
    p50_on = float(np.percentile([on[i].ttft for i in idx], 50))
    p50_off = float(np.percentile([off[i].ttft for i in idx], 50))
    return {"requests": len(idx), "of": len(on), "cached_tokens_mean": float(np.mean([on[i].cached_tokens for i in idx])),
            "ttft_p50_on_s": p50_on, "ttft_p50_off_s": p50_off, "ttft_p50_speedup": _ratio(p50_off, p50_on)}


def run_prefix_compare(plan: Plan, served: Served) -> dict:
    """The largest n's requests with the prefix cache on and off: at the offered rate, then all at once (the
    TTFT pair first, so a short budget keeps it). Writes `<setting>-prefix.json`."""
    n = plan.ns[-1]
    runs: dict = {"on": {}, "off": {}}
    more = [float(r) for r in plan.cfg.get("prefix_more_rates") or []]
    offered: dict = {rate: {"on": [], "off": []} for rate in [float(plan.cfg["rate"])] + more}  # RequestRecords
    more_runs: dict = {rate: {"on": None, "off": None} for rate in more}
    for which, saturate in (("offered", False), ("saturated", True)):
        p = plan.requests(saturate)
        for mode in runs:
            if time.monotonic() > plan.hard_deadline - 5:
                log.error("time budget used up: no %s run with the prefix cache %s", which, mode)
                continue
            start_cold(served)
            served.llm.set_prefix_cache(mode == "on")
            if saturate:
                runs[mode][which] = lora_run(p, served, n, f", {which}, prefix cache {mode}", cold=False)
                continue
            _serve_before(plan, served, n, mode)
            runs[mode][which] = lora_run(p, served, n, f", {which}, prefix cache {mode}",
                                         offered[float(plan.cfg["rate"])][mode], cold=False)
            for rate in more:  # on the cache as the main rate's run left it
                if time.monotonic() < plan.hard_deadline - 5:
                    at = dataclasses.replace(plan, cfg={**plan.cfg, "rate": rate}).requests(False)
                    more_runs[rate][mode] = lora_run(at, served, n, f", {which} at {rate:g} req/s, prefix cache "
                                                     f"{mode}", offered[rate][mode], cold=False)
    res = prefix_result(plan, served, n, runs)
    res["cached_requests"] = cached_requests_ttft(*offered[float(plan.cfg["rate"])].values())
    res["more_rates"] = [{"rate": rate, "on": _prefix_mode({"offered": r["on"]}) if r["on"] else {},
                          "off": _prefix_mode({"offered": r["off"]}) if r["off"] else {},
                          "cached_requests": cached_requests_ttft(*offered[rate].values())}
                         for rate, r in more_runs.items()]
    for m in res["more_rates"]:
        m["ttft_p50_speedup"] = _ratio(m["off"].get("ttft_p50_s"), m["on"].get("ttft_p50_s"))
    write_result(plan, res, f"{plan.cfg['setting']}-prefix.json")
    log.info("%s n=%d, prefix cache on / off: TTFT p50 speed-up %s, saturated throughput ratio %s, hit rate %s",
             plan.cfg["setting"], n, res["ttft_p50_speedup"], res["saturated_throughput_ratio"],
             res["on"].get("hit_rate"))
    return res


def run_from_config(config_path: str, out_dir: str, overrides: Optional[dict] = None) -> list[dict]:
    """Run the setting of `config_path` (with `--set` overrides); write and return one result per n (prefix
    cache on / off: the one comparison)."""
    plan = plan_run(config_path, out_dir, overrides)
    compare = bool(plan.cfg["compare_prefix_cache"])
    peft = {} if plan.saturate or compare else _peft_phase(plan)  # before JAX takes the device
    served = start_engine(plan)
    warm_up(plan, served)
    if compare:
        results = [run_prefix_compare(plan, served)]
    else:
        results = run_saturated(plan, served) if plan.saturate else run_offered(plan, served, peft)
    log.info("setting %s done in %.0f s", plan.cfg["setting"], time.monotonic() - plan.t_start)
    return results
