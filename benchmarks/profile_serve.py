"""Where a serving step's time goes: a bench setting's traffic, a few seconds of it traced.

profile_step.py traces one fixed decode batch; this traces the engine as a bench setting drives it (its
arrivals, prompt and output lengths, adapters, prefix cache), after a lead-in that lets the running batch
settle. Over the traced window it reports, per engine step: the wall time, the host's own work and its
waits on the device (Engine.timings), the device's busy and idle time, the sequences and tokens a step
carried, and the device time by kernel kind (profile_step.kind_of) and by kernel name. A step whose wait
is ~0 while the device idles is host-bound; one whose device is busy throughout is device-bound, and the
kernel table says on what.

    python benchmarks/profile_serve.py --config configs/bench-chat.json --out DIR [--saturate]
        [--prefix-cache on|off] [--base-only] [--host-profile] [--lead-s 3] [--seconds 3] [--set KEY=VALUE ...]

Writes <out>/profile_serve_<setting>[_sat][_nocache][_base].json. `--base-only` sends the same requests to the
base model (no adapter): beside the same setting's LoRA profile it says where LoRA's cost goes.
`--host-profile` also runs cProfile on the engine's thread over the window and lists the host functions
that take its time (`host_functions`: milliseconds a step, own and with callees). cProfile slows Python
code, so that run's wall and host times a step are inflated; its device figures still hold.
"""
from __future__ import annotations

import argparse
import cProfile
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.profile_step import kernel_table, print_kernels  # noqa: E402
from slora_jax.bench import run as bench  # noqa: E402
from slora_jax.bench.workload import adapter_name  # noqa: E402


class Window:
    """An engine `on_step` callback: starts the profiler `lead_s` after the first step, stops it `seconds`
    later, and keeps the engine's figures at both ends and the batch of every step between. The figures
    are taken from the first step after the profiler started to the last before it stops, so the window's
    wall and host times hold neither call (starting it takes about a second, which the step that calls it
    counts as host work)."""

    def __init__(self, engine, trace_dir: str, lead_s: float, seconds: float, host_profile: bool = False):
        self.engine, self.trace_dir = engine, trace_dir
        self.host = cProfile.Profile() if host_profile else None
        self.lead_s, self.seconds = lead_s, seconds
        self.t0 = self.start = self.end = None
        self.tracing = False
        self.before = self.after = None
        self.running: list = []

    def __call__(self, finished) -> None:
        import jax

        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        if not self.tracing:
            if now - self.t0 >= self.lead_s:
                jax.profiler.start_trace(self.trace_dir, create_perfetto_trace=True,
                                         profiler_options=common.device_only_profile())
                self.tracing = True
        elif self.start is None:  # the step that started the profiler has been counted by now
            self.before, self.start = self._figures(), time.monotonic()
            if self.host is not None:
                self.host.enable()  # the thread that steps the engine (callbacks run on it)
        elif self.end is None:
            self.running.append(len(self.engine.scheduler.running))
            if now - self.start >= self.seconds:
                if self.host is not None:
                    self.host.disable()
                self.after, self.end = self._figures(), time.monotonic()
                self.engine.drain()  # the last step's device work inside the trace
                jax.profiler.stop_trace()

    @property
    def done(self) -> bool:
        return self.end is not None

    def _figures(self) -> dict:
        st = self.engine.stats()
        return {k: st[k] for k in ("steps", "tokens_generated", "prompt_tokens", "host_s", "device_wait_s",
                                   "mask_wait_s", "prefix_hit_tokens", "swaps_in")}


def host_functions(prof: cProfile.Profile, steps: int, top: int = 30) -> list:
    """The `top` host functions by their own time: milliseconds a step, own and with what they call."""
    import pstats

    rows = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{os.path.basename(f)}:{line}({name})", "calls_per_step": calls / steps,
             "own_ms_per_step": own / steps * 1e3, "cumulative_ms_per_step": cum / steps * 1e3}
            for (f, line, name), (_, calls, own, cum, _) in ranked]


def summarize(win: Window) -> dict:
    d = {k: win.after[k] - win.before[k] for k in win.before}
    steps = max(d["steps"], 1)
    events = common.device_events(win.trace_dir)
    busy, span = common.busy_and_span(events)
    wall = win.end - win.start
    per = lambda x: x / steps  # noqa: E731
    return {
        "window_s": wall, "steps": d["steps"], "wall_ms_per_step": per(wall) * 1e3,
        "host_ms_per_step": per(d["host_s"]) * 1e3, "device_wait_ms_per_step": per(d["device_wait_s"]) * 1e3,
        "mask_wait_ms_per_step": per(d["mask_wait_s"]) * 1e3,
        "device_busy_ms_per_step": per(busy) / 1e3, "device_idle_ms_per_step": per(max(wall * 1e6 - busy, 0)) / 1e3,
        "device_span_ms": span / 1e3,
        "running_mean": sum(win.running) / max(len(win.running), 1),
        "tokens_generated_per_step": per(d["tokens_generated"]), "prompt_tokens_admitted": d["prompt_tokens"],
        "prefix_hit_tokens": d["prefix_hit_tokens"], "swaps_in": d["swaps_in"], **kernel_table(events, steps, 25),
        **({} if win.host is None else {"host_functions": host_functions(win.host, steps)}),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--saturate", action="store_true", help="the setting's saturate_requests offered at once")
    ap.add_argument("--prefix-cache", default="on", choices=("on", "off"))
    ap.add_argument("--base-only", action="store_true", help="the same requests without their adapters")
    ap.add_argument("--host-profile", action="store_true", help="cProfile the engine's thread over the window")
    ap.add_argument("--lead-s", type=float, default=3.0, help="seconds of serving before the traced window")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds traced")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides.update({"saturate": "true" if args.saturate else "false", "compare_prefix_cache": "false"})
    plan = bench.plan_run(args.config, args.out, overrides)
    served = bench.start_engine(plan)
    bench.warm_up(plan, served)
    llm, engine = served.llm, served.engine
    llm.set_prefix_cache(args.prefix_cache == "on")
    bench.start_cold(served)
    n = plan.ns[-1]
    trace = plan.traces[n]
    win = Window(engine, tempfile.mkdtemp(), args.lead_s, args.seconds, args.host_profile)
    engine.on_step.append(win)
    adapter_of = (lambda i: None) if args.base_only else (lambda i: adapter_name(int(trace.adapter[i])))
    rep = bench.replay(engine, trace, adapter_of, plan.prompts[n], plan.slo,
                       max_drain_s=args.lead_s + args.seconds + 5.0,
                       deadline=time.monotonic() + args.lead_s + args.seconds + 1.0, progress=False)
    engine.on_step.remove(win)
    if not win.done:
        raise SystemExit(f"the traffic ended ({rep.stopped}) before the traced window did: "
                         "lower --lead-s / --seconds or offer more requests")
    res = {"setting": plan.cfg["setting"], "model": plan.model_cfg.name, "n_adapters": n,
           "saturate": plan.saturate, "rate": None if plan.saturate else float(plan.cfg["rate"]),
           "prefix_cache": args.prefix_cache, "base_only": args.base_only, "host_profile": args.host_profile,
           "lead_s": args.lead_s, "max_running": engine.scheduler.max_running,
           "device": common.device_name(), "git_commit": common.git_commit(), **summarize(win)}
    name = (f"profile_serve_{plan.cfg['setting']}" + ("_sat" if plan.saturate else "")
            + ("" if args.prefix_cache == "on" else "_nocache") + ("_base" if args.base_only else "")
            + ("_host" if args.host_profile else "") + ".json")
    common.write_json(os.path.join(args.out, name), res)
    print(f"wrote {name}: {res['steps']} steps in {res['window_s']:.2f} s, {res['wall_ms_per_step']:.2f} ms a step "
          f"(host {res['host_ms_per_step']:.2f}, device wait {res['device_wait_ms_per_step']:.2f}; device busy "
          f"{res['device_busy_ms_per_step']:.2f}, idle {res['device_idle_ms_per_step']:.2f}); "
          f"{res['running_mean']:.1f} running, {res['tokens_generated_per_step']:.1f} tokens a step")
    print_kernels(res, 15)
    for f in res.get("host_functions", [])[:15]:
        print(f"  host {f['own_ms_per_step']:7.3f} ms own {f['cumulative_ms_per_step']:7.3f} ms with callees "
              f"x {f['calls_per_step']:6.1f}  {f['function']}")


if __name__ == "__main__":
    main()
