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
  at least `threshold` (90 %), found by bisection over a list of rates.
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
        "avg_latency_per_output_token_s": _mean([r.latency / max(r.output_len, 1) for r in finished]),
        "slo_attainment": slo_attainment(records, slo_ttft_s),
    }


def max_sustainable_rate(points: dict, threshold: float = 0.9) -> Optional[float]:
    """Highest rate in `points` ({rate: attainment}) whose attainment >= threshold (None if none)."""
    ok = [r for r, a in points.items() if a is not None and a >= threshold]
    return max(ok) if ok else None


def search_rates(rates: Sequence[float], probe: Callable[[float], Optional[float]], threshold: float = 0.9,
                 known: Optional[dict] = None) -> dict:
    """Bisection over sorted `rates` for the highest one with attainment >= threshold.

    Assumes attainment falls as the rate rises. `probe(rate)` returns the SLO
    attainment at that rate, or None when it ran out of time (the search stops
    there). `known` holds already-measured {rate: attainment} (e.g. the main
    run) and is used instead of probing where the search lands on those rates.
    Returns every measured {rate: attainment} point, `known` included.
    """
    rates = sorted(set(float(r) for r in rates))
    points = {float(k): v for k, v in (known or {}).items()}
    lo, hi = -1, len(rates)  # rates[lo] passes (or none), rates[hi] fails (or none)
    # narrow with the known points first (they cost nothing), by monotonicity
    for r, a in points.items():
        if a is None:
            continue
        if a >= threshold:  # every listed rate <= r passes too
            lo = max(lo, int(np.searchsorted(rates, r, side="right")) - 1)
        else:  # every listed rate >= r fails too
            hi = min(hi, int(np.searchsorted(rates, r, side="left")))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        r = rates[mid]
        a = points.get(r)
        if a is None:
            a = probe(r)
            if a is None:
                break
            points[r] = a
        if a >= threshold:
            lo = mid
        else:
            hi = mid
    return points
