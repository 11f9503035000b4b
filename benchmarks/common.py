"""Shared timing helpers for the GPU benchmark scripts (not imported by the package).

Timing follows the device tool's METHOD.md: warm up (compile) first, run the
work `iters` times inside one jitted `fori_loop` so that per-call dispatch is
not measured, block on the result, repeat and take the median.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from typing import Callable

import jax
import jax.numpy as jnp


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # the device machine's copy may carry no .git
        return os.environ.get("GIT_COMMIT", "unknown")


def time_loop(body: Callable, args: tuple, iters: int = 20, repeats: int = 5) -> float:
    """Median seconds of one `body(*args)` call, timed as `iters` calls inside one jit.

    `body` must return an array of the same shape/dtype as its first argument
    (it is threaded through the loop as a carry so XLA cannot hoist the work).
    """

    @jax.jit
    def run(*a):
        def step(_, carry):
            return body(carry, *a[1:])

        return jax.lax.fori_loop(0, iters, step, a[0])

    jax.block_until_ready(run(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def hbm_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of `y = x + 1` over `gib` GiB of bf16 (bytes read + written): the roofline denominator."""
    n = int(gib * (1 << 30)) // 2
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.bfloat16)  # not zeros (METHOD.md)
    f = jax.jit(lambda a: a + 1, donate_argnums=0)
    for _ in range(3):  # warm up: compile, clocks
        x = jax.block_until_ready(f(x))
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        x = jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    del x
    return 2 * n * 2 / min(times)  # the device's capability: its best pass


def write_json(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
