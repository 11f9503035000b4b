"""S-LoRA's serving metrics (its benchmarks/run_exp.py `get_res_stats`).

- throughput: finished requests / wall time of the run (from the start of the
  trace until the last request finishes, the drain included), and generated
  tokens / the same time;
- average latency (arrival -> last token) and average first-token latency,
  over the finished requests;
- SLO attainment: the fraction of *all* requests whose first token came
  strictly within `slo_ttft_s` (S-LoRA's `attainment_func`, 6 s); a request
  that never got a first token (aborted, cut off) counts as a miss;
- maximum sustainable rate: the highest offered rate whose SLO attainment is
  at least `threshold` (90 %), found by probing a list of rates in rising
  order up to the first one that fails; a figure with no failing rate above
  it (every listed rate passed, or the probes ran out of time) is only a
  lower bound.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np


@dataclasses.dataclass
class RequestRecord:
    """Times in seconds from the start of the run."""

    arrival: float
    prompt_len: int
    output_len: int  # asked for
    generated: int = 0  # tokens produced (== output_len when finished)
    first_token: Optional[float] = None
    finish: Optional[float] = None  # None: not finished (aborted, cut off)
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied

    @property
    def ttft(self) -> Optional[float]:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def latency(self) -> Optional[float]:
        return None if self.finish is None else self.finish - self.arrival


def _mean(xs) -> Optional[float]:
    return float(np.mean(xs)) if len(xs) else None


def _pct(xs, q) -> Optional[float]:
    return float(np.percentile(xs, q)) if len(xs) else None


def slo_attainment(records: Sequence[RequestRecord], slo_ttft_s: float) -> Optional[float]:
    if not records:
        return None
    ok = sum(1 for r in records if r.ttft is not None and r.ttft < slo_ttft_s)
    return ok / len(records)


def summarize(records: Sequence[RequestRecord], elapsed_s: float, slo_ttft_s: float) -> dict:
    """The metrics of one run (keys match the result JSON)."""
    finished = [r for r in records if r.finish is not None]
    lat = [r.latency for r in finished]
    ttft = [r.ttft for r in finished]
    elapsed = max(float(elapsed_s), 1e-9)
    return {
        "requests": len(records),
        "finished": len(finished),
        "unfinished": len(records) - len(finished),
        "elapsed_s": float(elapsed_s),
        "throughput_req_s": len(finished) / elapsed,
        "tokens_per_s": sum(r.generated for r in records) / elapsed,
        "avg_latency_s": _mean(lat),
        "avg_ttft_s": _mean(ttft),
        "p50_ttft_s": _pct(ttft, 50),
        "p90_ttft_s": _pct(ttft, 90),
        "p99_ttft_s": _pct(ttft, 99),
        "avg_latency_per_output_token_s": _mean([r.latency / max(r.output_len, 1) for r in finished]),
        "slo_attainment": slo_attainment(records, slo_ttft_s),
    }


def _failing(points: dict, threshold: float) -> list:
    return sorted(r for r, a in points.items() if a is not None and a < threshold)


def max_sustainable_rate(points: dict, threshold: float = 0.9) -> Optional[float]:
    """Highest rate in `points` ({rate: attainment}) that met `threshold`, below the lowest failing one
    (None if none did)."""
    fails = _failing(points, threshold)
    ceiling = fails[0] if fails else float("inf")
    ok = [r for r, a in points.items() if a is not None and a >= threshold and r < ceiling]
    return max(ok) if ok else None


def rate_is_lower_bound(points: dict, threshold: float = 0.9, rates: Sequence[float] = (),
                        capacity: Optional[float] = None) -> bool:
    """True when no measured rate failed and the search did not stop at `capacity` (the next of `rates`
    above the best one exceeds it): the sustainable rate may lie above every rate measured."""
    if _failing(points, threshold):
        return False
    best = max_sustainable_rate(points, threshold)
    above = [float(r) for r in rates if best is None or float(r) > best]
    return capacity is None or not above or min(above) <= capacity


def search_rates(rates: Sequence[float], probe: Callable[[float], Optional[float]], threshold: float = 0.9,
                 known: Optional[dict] = None, capacity: Optional[float] = None) -> dict:
    """Probe `rates` in rising order, from just above the highest known passing rate, up to the first one
    that fails.

    Assumes attainment falls as the rate rises. `probe(rate)` returns the SLO
    attainment at that rate, or None when it ran out of time (the search stops
    there: the result is then a lower bound). `known` holds already-measured
    {rate: attainment} points (e.g. the main run): the scan starts above the
    highest of them that passed (below the lowest that failed) and never
    probes at or past a known failing rate. No rate above `capacity` (the
    throughput with every request offered at once) is probed: its queue would
    grow without bound, however a short probe ends. Returns every measured
    {rate: attainment} point, `known` included.
    """
    points = {float(k): v for k, v in (known or {}).items()}
    fails = _failing(points, threshold)
    ceiling = fails[0] if fails else float("inf")
    floor = max((r for r, a in points.items() if a is not None and a >= threshold and r < ceiling), default=-1.0)
    for rate in sorted(set(float(r) for r in rates)):
        if rate <= floor or rate in points:
            continue
        if rate >= ceiling or (capacity is not None and rate > capacity):
            break
        a = probe(rate)
        if a is None:
            break
        points[rate] = a
        if a < threshold:
            break
    return points
