"""Prometheus metrics through `prometheus_client`, in a registry of the app's own (no global state).

Latency histograms and request counters are fed from the engine thread (request callbacks) and the
error handlers; pool, adapter and engine figures are read from `LLM.stats()` at scrape time (a
collector), so they also count work driven through the Python API in the same process.
"""
from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# (name, help, stats key) of the engine's counters, exported as <name>_total
_ENGINE_COUNTERS = (
    ("slora_prompt_tokens", "Prompt tokens admitted to the engine.", "prompt_tokens"),
    ("slora_generation_tokens", "Tokens generated.", "tokens_generated"),
    ("slora_engine_requests_finished", "Engine requests finished (stop, length or error).", "requests_finished"),
    ("slora_engine_requests_aborted", "Engine requests aborted (client gone or early abort).", "requests_aborted"),
    ("slora_engine_steps", "Engine steps run.", "steps"),
    ("slora_preemptions", "Requests preempted for KV pages (recomputed later).", "preemptions"),
    ("slora_prefix_query_tokens", "Prompt tokens looked up in the prefix cache.", "prefix_query_tokens"),
    ("slora_prefix_hit_tokens", "Prompt tokens whose KV the prefix cache supplied.", "prefix_hit_tokens"),
    ("slora_engine_host_seconds", "Seconds the engine loop spent on host work (schedule, build, dispatch, "
     "post-process).", "host_s"),
    ("slora_engine_device_wait_seconds", "Seconds the engine loop waited on the device for sampled tokens.",
     "device_wait_s"),
)
_ENGINE_GAUGES = (
    ("slora_pool_pages_capacity", "Pages in the unified device pool.", "pages_total"),
    ("slora_adapters_resident", "Adapters whose weights are in the device pool.", "adapters_resident"),
    ("slora_adapters_registered", "Adapters registered (host memory).", "adapters_registered"),
    ("slora_requests_running", "Requests in the running batch.", "requests_running"),
    ("slora_requests_waiting", "Requests waiting for admission.", "requests_waiting"),
)


class _EngineCollector:
    """Engine figures from `stats()` at each scrape."""

    def __init__(self, stats: Callable[[], dict], engine_up: Callable[[], bool]):
        self.stats, self.engine_up = stats, engine_up

    def describe(self):
        return []  # collected at scrape time only

    def collect(self):
        s = self.stats()
        for name, help_text, key in _ENGINE_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=s.get(key, 0))
        swaps = CounterMetricFamily("slora_adapter_swaps", "Adapter copies into (in) and evictions out of (out) "
                                    "the pool.", labels=["direction"])
        swaps.add_metric(["in"], s.get("swaps_in", 0))
        swaps.add_metric(["out"], s.get("swaps_out", 0))
        yield swaps
        pages = GaugeMetricFamily("slora_pool_pages", "Pages of the unified device pool by kind.", labels=["kind"])
        for kind in ("kv", "adapter", "cached", "free"):
            pages.add_metric([kind], s.get(f"pages_{kind}", 0))
        yield pages
        for name, help_text, key in _ENGINE_GAUGES:
            yield GaugeMetricFamily(name, help_text, value=s.get(key, 0))
        yield GaugeMetricFamily("slora_engine_up", "1 while the engine loop runs.", value=int(self.engine_up()))


class Metrics:
    def __init__(self, stats: Callable[[], dict], engine_up: Callable[[], bool]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slora_requests", "Generation requests (one per choice) by endpoint and finish reason.",
                                ["endpoint", "finish_reason"], registry=r)
        self.errors = Counter("slora_http_errors", "HTTP error responses by status code.", ["status"], registry=r)
        self.ttft = Histogram("slora_time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("slora_inter_token_latency_seconds", "Time between consecutive generated tokens.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("slora_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=E2E_BUCKETS, registry=r)
        r.register(_EngineCollector(stats, engine_up))

    # -- fed from the engine thread ----------------------------------------------------------
    def on_tokens(self, handle, prev_count: int, prev_time: Optional[float], now: float) -> None:
        """`handle` grew from prev_count output tokens (the last seen at prev_time) to its count at `now`."""
        n = handle.num_output_tokens - prev_count
        if n <= 0:
            return
        if prev_count == 0:
            if handle.ttft_s is not None:
                self.ttft.observe(max(0.0, handle.ttft_s))
            n -= 1
            prev_time = prev_time if prev_time is not None else now
        if n > 0 and prev_time is not None:
            gap = max(0.0, (now - prev_time) / n)
            for _ in range(n):
                self.itl.observe(gap)

    def on_finish(self, handle, endpoint: str) -> None:
        self.requests.labels(endpoint=endpoint, finish_reason=handle.finish_reason or "unknown").inc()
        if handle.latency_s is not None and handle.num_output_tokens:
            self.e2e.observe(max(0.0, handle.latency_s))

    # -- scrape --------------------------------------------------------------------------
    def render(self) -> bytes:
        """The exposition text (reads the engine's stats: call it off the event loop)."""
        return generate_latest(self.registry)
