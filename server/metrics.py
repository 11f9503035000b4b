"""Prometheus text-format metrics, written by hand so the server needs no metrics library.

Latency histograms are fed from the engine thread (the request listeners) and
read by the `/metrics` route, so each holds a lock. Pool, adapter and engine
counters are read from `LLM.stats()` at scrape time, so they also count work
driven through the Python API in the same process.
"""
from __future__ import annotations

import bisect
import math
import threading
import time
from typing import Iterable, Optional

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


def _fmt(v: float) -> str:
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = (str(v).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, esc)) + "}"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Iterable[float]):
        self.name, self.help = name, help_text
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, v: float, times: int = 1) -> None:
        i = bisect.bisect_left(self.bounds, v)
        with self._lock:
            self.counts[i] += times
            self.sum += v * times

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for bound, c in zip(self.bounds + (math.inf,), counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {acc}')
        out += [f"{self.name}_sum {_fmt(total)}", f"{self.name}_count {acc}"]
        return out


class LabeledCounter:
    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text  # name without the _total suffix
        self.values: dict = {}
        self._lock = threading.Lock()

    def inc(self, labels: dict, v: float = 1.0) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + v

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self.values.items())
        out = [f"# HELP {self.name}_total {self.help}", f"# TYPE {self.name}_total counter"]
        out += [f"{self.name}_total{_labels(dict(k))} {_fmt(v)}" for k, v in items]
        return out


class Metrics:
    def __init__(self):
        self.started = time.time()
        self.requests = LabeledCounter("slora_requests", "Generation requests (one per choice) by endpoint and finish reason.")
        self.errors = LabeledCounter("slora_http_errors", "HTTP error responses by status code.")
        self.ttft = Histogram("slora_time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              TTFT_BUCKETS)
        self.itl = Histogram("slora_inter_token_latency_seconds", "Time between consecutive generated tokens.",
                             ITL_BUCKETS)
        self.e2e = Histogram("slora_e2e_request_latency_seconds", "Time from arrival to the last token.", E2E_BUCKETS)

    # -- fed from the engine thread ----------------------------------------------------------
    def on_tokens(self, req, prev_count: int, prev_time: Optional[float], now: float) -> None:
        """`req` grew from prev_count output tokens (the last at prev_time) to len(req.output_ids) at `now`."""
        n = len(req.output_ids) - prev_count
        if n <= 0:
            return
        if prev_count == 0:
            if req.first_token_time is not None:
                self.ttft.observe(max(0.0, req.first_token_time - req.arrival))
            prev_time, n = req.first_token_time or now, n - 1
        if n > 0 and prev_time is not None:
            self.itl.observe(max(0.0, (now - prev_time) / n), n)

    def on_finish(self, req, endpoint: str) -> None:
        self.requests.inc({"endpoint": endpoint, "finish_reason": req.finish_reason or "unknown"})
        if req.finish_time is not None and req.output_ids:
            self.e2e.observe(max(0.0, req.finish_time - req.arrival))

    # -- scrape --------------------------------------------------------------------------
    def render(self, stats: dict, engine_alive: bool) -> str:
        def gauge(name, help_text, samples):
            lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            return lines + [f"{name}{_labels(lbl)} {_fmt(v)}" for lbl, v in samples]

        def counter(name, help_text, value):
            return [f"# HELP {name}_total {help_text}", f"# TYPE {name}_total counter", f"{name}_total {_fmt(value)}"]

        s = stats
        lines: list = []
        lines += self.requests.render() + self.errors.render()
        lines += counter("slora_prompt_tokens", "Prompt tokens admitted to the engine.", s.get("prompt_tokens", 0))
        lines += counter("slora_generation_tokens", "Tokens generated.", s.get("tokens_generated", 0))
        lines += counter("slora_engine_requests_finished", "Engine requests finished (stop, length or error).",
                         s.get("requests_finished", 0))
        lines += counter("slora_engine_requests_aborted", "Engine requests aborted (client gone or early abort).",
                         s.get("requests_aborted", 0))
        lines += counter("slora_engine_steps", "Engine steps run.", s.get("steps", 0))
        lines += counter("slora_preemptions", "Requests preempted for KV pages (recomputed later).",
                         s.get("preemptions", 0))
        lines += self.ttft.render() + self.itl.render() + self.e2e.render()
        lines += gauge("slora_pool_pages", "Pages of the unified device pool by kind.",
                       [({"kind": k}, s.get(f"pages_{k}", 0)) for k in ("kv", "adapter", "free")])
        lines += gauge("slora_pool_pages_capacity", "Pages in the unified device pool.", [({}, s.get("pages_total", 0))])
        lines += gauge("slora_adapters_resident", "Adapters whose weights are in the device pool.",
                       [({}, s.get("adapters_resident", 0))])
        lines += gauge("slora_adapters_registered", "Adapters registered (host memory).",
                       [({}, s.get("adapters_registered", 0))])
        lines += ["# HELP slora_adapter_swaps_total Adapter copies into (in) and evictions out of (out) the pool.",
                  "# TYPE slora_adapter_swaps_total counter",
                  f'slora_adapter_swaps_total{{direction="in"}} {_fmt(s.get("swaps_in", 0))}',
                  f'slora_adapter_swaps_total{{direction="out"}} {_fmt(s.get("swaps_out", 0))}']
        lines += gauge("slora_requests_running", "Requests in the running batch.", [({}, s.get("requests_running", 0))])
        lines += gauge("slora_requests_waiting", "Requests waiting for admission.", [({}, s.get("requests_waiting", 0))])
        lines += gauge("slora_engine_up", "1 while the engine thread runs.", [({}, int(engine_alive))])
        return "\n".join(lines) + "\n"
