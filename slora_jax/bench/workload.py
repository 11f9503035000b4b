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

Chat-shaped traces (`system_prompt_len` > 0): every prompt of adapter i starts
with adapter i's own system prompt, `system_prompt_len` token ids drawn from a
generator seeded by (seed, i), followed by a user turn of a length uniform in
`input_range`; `prompt_len` counts both. A base-model run of the trace sends the
same prompts: request j still starts with the system prompt of its adapter
index, so it repeats prefixes exactly as often. 0 (the default) is S-LoRA's
trace, unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Trace:
    arrival_s: np.ndarray  # [N] float64, seconds from the start, non-decreasing
    adapter: np.ndarray  # [N] int64 in [0, n_adapters)
    prompt_len: np.ndarray  # [N] int64
    output_len: np.ndarray  # [N] int64
    n_adapters: int
    system_prompt_len: int = 0  # leading tokens of each prompt: its adapter's system prompt

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
        return dataclasses.replace(self, arrival_s=self.arrival_s[:k], adapter=self.adapter[:k],
                                   prompt_len=self.prompt_len[:k], output_len=self.output_len[:k])

    def at_once(self) -> "Trace":
        """The same requests, all arriving at time 0 (a saturated run: the capacity, not an offered load)."""
        return dataclasses.replace(self, arrival_s=np.zeros_like(self.arrival_s))

    def scaled(self, factor: float) -> "Trace":
        """The same requests arriving `factor` times faster (arrival times divided by factor)."""
        return dataclasses.replace(self, arrival_s=self.arrival_s / factor)


def generate_trace(n_adapters: int, rate: float, duration_s: float, cv: float = 1.0, alpha: float = 1.0,
                   input_range: Sequence[int] = (8, 512), output_range: Sequence[int] = (8, 512),
                   seed: int = 42, system_prompt_len: int = 0) -> Trace:
    """S-LoRA's `generate_requests`: `int(rate * duration_s)` requests (see the module docstring); with
    `system_prompt_len`, each prompt is that many tokens longer (its adapter's system prompt)."""
    if n_adapters < 1:
        raise ValueError(f"n_adapters must be >= 1, got {n_adapters}")
    if rate <= 0 or cv <= 0 or alpha <= 0:
        raise ValueError(f"rate, cv and alpha must be > 0, got rate={rate} cv={cv} alpha={alpha}")
    (ilo, ihi), (olo, ohi) = input_range, output_range
    if not (1 <= ilo <= ihi and 1 <= olo <= ohi):
        raise ValueError(f"bad length ranges: input {input_range}, output {output_range}")
    if system_prompt_len < 0:
        raise ValueError(f"system_prompt_len must be >= 0, got {system_prompt_len}")
    total = int(rate * duration_s)
    rng = np.random.default_rng(seed)
    x = rng.power(alpha, total)
    adapter = np.minimum((x * n_adapters).astype(np.int64), n_adapters - 1)  # x < 1, but stay safe
    prompt_len = rng.integers(ilo, ihi + 1, total)
    output_len = rng.integers(olo, ohi + 1, total)
    intervals = rng.gamma(1.0 / (cv * cv), cv * cv / rate, total)
    return Trace(np.cumsum(intervals), adapter, prompt_len + system_prompt_len, output_len, n_adapters,
                 system_prompt_len)


def system_prompt(adapter: int, length: int, vocab_size: int, seed: int) -> list:
    """Adapter `adapter`'s system prompt: `length` random token ids, the same for every request of it."""
    return np.random.default_rng([seed, adapter]).integers(0, vocab_size, length).tolist()


def make_prompts(trace: Trace, vocab_size: int, seed: int, system_seed: Optional[int] = None) -> list:
    """Prompt token ids of the trace's requests (made before timing): its adapter's system prompt, if the
    trace has them, then random ids up to the request's length. `system_seed` (default `seed`): the seed
    of the system prompts, so that traffic of another seed can share a setting's system prompts."""
    rng = np.random.default_rng(seed + 7919)
    k = trace.system_prompt_len
    sseed = seed if system_seed is None else system_seed
    system = {int(a): system_prompt(int(a), k, vocab_size, sseed) for a in np.unique(trace.adapter)} if k else {}
    return [system.get(int(a), []) + rng.integers(0, vocab_size, int(n) - k).tolist()
            for a, n in zip(trace.adapter, trace.prompt_len)]


def adapter_ranks(n_adapters: int, ranks: Sequence[int]) -> list[int]:
    """Rank of each adapter: `ranks` assigned round-robin (S-LoRA's get_adapter_dirs)."""
    return [int(ranks[i % len(ranks)]) for i in range(n_adapters)]


def adapter_name(i: int) -> str:
    return f"bench-{i:05d}"
