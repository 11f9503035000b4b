"""S-LoRA's synthetic workload (its benchmarks/trace.py), as numpy arrays.

A trace of `int(rate * duration_s)` requests. The adapter of each request is
floor(n * X) with X ~ power(alpha) (density alpha * x^(alpha-1) on [0, 1]:
alpha = 1 is uniform over the adapters, alpha < 1 puts more weight on the
low indices); inter-arrival times are gamma with mean 1/rate and coefficient
of variation cv (shape 1/cv^2, scale cv^2/rate; cv = 1 is a Poisson process);
input and output lengths are uniform integers in their closed ranges.

The draws come in S-LoRA's order (adapters, input lengths, output lengths,
intervals) from one generator, so with the same seed every n gives the same
arrivals and lengths and only the adapter indices differ: the runs over n, and
the base-only ceiling, replay one request stream.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Trace:
    arrival_s: np.ndarray  # [N] float64, seconds from the start, non-decreasing
    adapter: np.ndarray  # [N] int64 in [0, n_adapters)
    prompt_len: np.ndarray  # [N] int64
    output_len: np.ndarray  # [N] int64
    n_adapters: int

    def __len__(self) -> int:
        return len(self.arrival_s)

    def __iter__(self) -> Iterator[tuple]:
        """(arrival_s, adapter_index, prompt_len, output_len) per request."""
        for i in range(len(self)):
            yield (float(self.arrival_s[i]), int(self.adapter[i]), int(self.prompt_len[i]), int(self.output_len[i]))

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0

    def head(self, duration_s: float) -> "Trace":
        """The requests that arrive within the first `duration_s` seconds."""
        k = int(np.searchsorted(self.arrival_s, duration_s, side="right"))
        return Trace(self.arrival_s[:k], self.adapter[:k], self.prompt_len[:k], self.output_len[:k], self.n_adapters)

    def at_once(self) -> "Trace":
        """The same requests, all arriving at time 0 (a saturated run: the capacity, not an offered load)."""
        return dataclasses.replace(self, arrival_s=np.zeros_like(self.arrival_s))

    def scaled(self, factor: float) -> "Trace":
        """The same requests arriving `factor` times faster (arrival times divided by factor)."""
        return dataclasses.replace(self, arrival_s=self.arrival_s / factor)


def generate_trace(n_adapters: int, rate: float, duration_s: float, cv: float = 1.0, alpha: float = 1.0,
                   input_range: Sequence[int] = (8, 512), output_range: Sequence[int] = (8, 512),
                   seed: int = 42) -> Trace:
    """S-LoRA's `generate_requests`: `int(rate * duration_s)` requests (see the module docstring)."""
    if n_adapters < 1:
        raise ValueError(f"n_adapters must be >= 1, got {n_adapters}")
    if rate <= 0 or cv <= 0 or alpha <= 0:
        raise ValueError(f"rate, cv and alpha must be > 0, got rate={rate} cv={cv} alpha={alpha}")
    (ilo, ihi), (olo, ohi) = input_range, output_range
    if not (1 <= ilo <= ihi and 1 <= olo <= ohi):
        raise ValueError(f"bad length ranges: input {input_range}, output {output_range}")
    total = int(rate * duration_s)
    rng = np.random.default_rng(seed)
    x = rng.power(alpha, total)
    adapter = np.minimum((x * n_adapters).astype(np.int64), n_adapters - 1)  # x < 1, but stay safe
    prompt_len = rng.integers(ilo, ihi + 1, total)
    output_len = rng.integers(olo, ohi + 1, total)
    intervals = rng.gamma(1.0 / (cv * cv), cv * cv / rate, total)
    return Trace(np.cumsum(intervals), adapter, prompt_len, output_len, n_adapters)


def adapter_ranks(n_adapters: int, ranks: Sequence[int]) -> list[int]:
    """Rank of each adapter: `ranks` assigned round-robin (S-LoRA's get_adapter_dirs)."""
    return [int(ranks[i % len(ranks)]) for i in range(n_adapters)]


def adapter_name(i: int) -> str:
    return f"bench-{i:05d}"
