"""Shared helpers for the GPU benchmark scripts (not imported by the package).

Timing follows the device tool's METHOD.md: warm up (compile) first, run the
work `iters` times inside one jitted program (unrolled) so that per-call dispatch is
not measured, block on the result, repeat and take the median.

`kernel_bench_main` is the driver of the kernel benches (bench_lora.py,
bench_attention.py): their options, the order of their phases and their output.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import statistics
import tempfile
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def git_commit() -> str:
    """$GIT_COMMIT when set (the device machine's copy carries a stale .git), else git's (the bench's own)."""
    from slora_jax.bench.run import git_commit as commit

    return commit()


def _looped(body: Callable, iters: int, n_args: int, n_sets: int) -> Callable:
    """One jitted program calling `body` `iters` times, its output fed back as its first argument.

    The calls are unrolled: an XLA while loop on the GPU copies its predicate to the host every
    iteration, a ~20 us stall that would be timed as part of each call. Iteration i takes the i % n_sets-th
    set of the other arguments (passed flat, n_args per set).
    """

    @jax.jit
    def run(carry, *flat):
        sets = [flat[k * n_args:(k + 1) * n_args] for k in range(n_sets)]
        for i in range(iters):
            carry = body(carry, *sets[i % n_sets])
        return carry

    return run


def time_loop(body: Callable, args: tuple, iters: int = 20, repeats: int = 5,
              arg_sets: list | None = None, split: tuple | None = None):
    """Median seconds of one `body(*args)` call, timed as `iters` calls inside one jit.

    `body` must return an array of the same shape/dtype as its first argument
    (it is threaded through the calls as a carry so XLA cannot hoist the work).
    `arg_sets`: alternatives to args[1:] (same shapes), taken in turn, so that repeated calls do not
    find their inputs in the L2 cache (METHOD.md: rotate among several input sets).
    With `split` (substrings of kernel names, possibly none), returns (seconds, device_us, parts):
    device_us = microseconds per call spent in device kernels, from a jax.profiler trace of one more run
    of the same program: what a CUDA-graph timing measures, without the host's launch gaps (None where
    the trace has no event; on a CPU, whose trace has no device process, every event counts: a check
    that the script runs, not a figure); parts[key] = the share of the kernels whose name contains key.
    """
    sets = [tuple(args[1:])] + [tuple(a) for a in (arg_sets or [])]
    flat = [a for s in sets for a in s]
    run = _looped(body, iters, len(args) - 1, len(sets))
    jax.block_until_ready(run(args[0], *flat))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(args[0], *flat))
        times.append((time.perf_counter() - t0) / iters)
    seconds = statistics.median(times)
    if split is None:
        return seconds
    tmp = tempfile.mkdtemp()
    with jax.profiler.trace(tmp, create_perfetto_trace=True, profiler_options=device_only_profile()):
        jax.block_until_ready(run(args[0], *flat))
    events = [(name.lower(), dur) for name, _, dur in device_events(tmp)]
    device_us = sum(dur for _, dur in events) / iters if events else None
    return seconds, device_us, {key: sum(dur for name, dur in events if key in name) / iters for key in split}


def device_only_profile():
    """jax.profiler options that trace the device but not every Python call: the Python tracer slowed a
    saturated 8B step ten-fold (H100), so a traced loop would be host-bound where the real one is not."""
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0
    return opts


def device_events(trace_dir: str) -> list:
    """(name, start us, duration us) of every complete event on a device (not host) process of the trace."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in procs.items() if "/device:" in name and "CPU" not in name}
    if not device:  # a CPU run: keep the XLA thunks so the script can be checked there
        device = set(procs)
    return [(e["name"], float(e.get("ts", 0.0)), float(e.get("dur", 0.0))) for e in events
            if e.get("ph") == "X" and e["pid"] in device]


def busy_and_span(events) -> tuple:
    """(microseconds some device event ran, microseconds from the first event's start to the last's end)."""
    spans = sorted((ts, ts + dur) for _, ts, dur in events)
    if not spans:
        return 0.0, 0.0
    busy, (cur_lo, cur_hi) = 0.0, spans[0]
    for lo, hi in spans[1:]:
        if lo > cur_hi:
            busy += cur_hi - cur_lo
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    busy += cur_hi - cur_lo
    return busy, max(hi for _, hi in spans) - spans[0][0]


def median_seconds(fn: Callable, *args, repeats: int = 5) -> float:
    """Median seconds of `fn(*args)` (blocked on), after one untimed call that compiles and warms up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- the roofline: what the device can read, measured in the same process --------------------
GIB = 1 << 30
READ_GIB = 8.0  # the read measurements stream this much (less only where the device has not the room)


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """The roofline denominators, measured at the start of a bench run (DESIGN.md section 7).

    read_bps: the device's read limit, the best of a read-only reduction and a bf16 GEMV over
    `read_bytes` (a decode step, a LoRA kernel and decode attention only read, so they are held to
    it); copy_bps: `y = x + 1` (bytes read + written), the denominator of earlier runs, kept beside it;
    matmul_flops: a bf16 matrix product's rate (prefill attention's compute roofline), None if unmeasured.
    """

    read_bps: float
    reduce_bps: float
    gemv_bps: float
    copy_bps: float
    read_bytes: int
    matmul_flops: Optional[float] = None

    def fractions(self, nbytes: float, seconds: float) -> dict:
        """A row's roofline fields for `nbytes` moved (the fewest the work must move) in `seconds`."""
        bps = nbytes / seconds
        return {"read_roofline_fraction": round(bps / self.read_bps, 4),
                "copy_roofline_fraction": round(bps / self.copy_bps, 4)}

    def row_fields(self) -> dict:
        """The denominators themselves, for each row (TB/s, TFLOP/s)."""
        return {"read_limit_tbps": round(self.read_bps / 1e12, 4), "copy_limit_tbps": round(self.copy_bps / 1e12, 4)}

    def describe(self) -> str:
        s = (f"read limit {self.read_bps / 1e12:.3f} TB/s (reduction {self.reduce_bps / 1e12:.3f}, bf16 GEMV "
             f"{self.gemv_bps / 1e12:.3f}, over {self.read_bytes / GIB:.2f} GiB); copy {self.copy_bps / 1e12:.3f} TB/s")
        return s + (f"; bf16 matmul {self.matmul_flops / 1e12:.0f} TFLOP/s" if self.matmul_flops else "")


def free_device_bytes() -> Optional[int]:
    """Bytes the first device can still allocate (None on a CPU, which keeps no such count)."""
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _best_seconds(fn, *args, calls: int = 4, repeats: int = 5) -> float:
    """Best seconds per call of `fn(*args)`: `calls` dispatched back to back, blocked on once, `repeats`
    times after a warm-up (the capability: clocks and caches at their best, launch gaps amortized)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(calls)])
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of `y = x + 1` over `gib` GiB of bf16, bytes read + written, best donated pass."""
    n = int(gib * GIB) // 2
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
    return 2 * n * 2 / min(times)


def _streaming_rate(fn, buf, *args, per_row: int) -> float:
    """Bytes/s of `fn` reading all of `buf` and its first half, as the rate of the extra half: the launch,
    ramp-up and tail every call pays drop out (in a 2 ms probe they were ~0.6 %, enough for a kernel
    reading twice as much per call to out-read the probe). The whole-buffer rate where timing noise makes
    the difference meaningless."""
    rows = buf.shape[0]
    half = rows // 2
    full_s = _best_seconds(jax.jit(fn), buf, *args)
    half_s = _best_seconds(jax.jit(lambda a, *r: fn(a[:half], *r)), buf, *args)
    whole = rows * per_row / full_s
    if full_s <= half_s:
        return whole
    return max(whole, (rows - half) * per_row / (full_s - half_s))


def read_bandwidth(gib: float) -> tuple[float, float, int]:
    """(reduction bytes/s, GEMV bytes/s, bytes read) over one random bf16 [N, 4096] buffer of `gib` GiB,
    each a streaming rate (`_streaming_rate`).

    Reduction: the sum over N (a [4096] float32 result) and over 4096 (an [N] result), the better of the
    two; GEMV: [N, 4096] @ [4096, 32] (bytes: the buffer read, the [N, 32] product written)."""
    cols = 4096
    rows = max(2, int(gib * GIB) // (2 * cols))
    buf = jax.random.normal(jax.random.PRNGKey(1), (rows, cols), jnp.bfloat16)
    v = jax.random.normal(jax.random.PRNGKey(2), (cols, 32), jnp.bfloat16)
    nbytes = rows * cols * 2
    reduce_bps = max(_streaming_rate(lambda a: jnp.sum(a, axis=0, dtype=jnp.float32), buf, per_row=cols * 2),
                     _streaming_rate(lambda a: jnp.sum(a, axis=1, dtype=jnp.float32), buf, per_row=cols * 2))
    gemv_bps = _streaming_rate(lambda a, b: a @ b, buf, v, per_row=cols * 2 + 32 * 2)
    del buf
    return reduce_bps, gemv_bps, nbytes


def matmul_flops(n: int = 8192) -> float:
    """FLOP/s of one bf16 [n, n] @ [n, n] (float32 accumulation), best of a few."""
    a = jax.random.normal(jax.random.PRNGKey(3), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(4), (n, n), jnp.bfloat16)
    s = _best_seconds(jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(x.dtype)), a, b)
    return 2 * n ** 3 / s


def device_limits(read_gib: Optional[float] = None, copy_gib: float = 2.0, flops: bool = False,
                  smoke: bool = False) -> DeviceLimits:
    """Measure the roofline denominators now (call it before the bench allocates its own arrays).

    The read buffer is READ_GIB (8 GiB), or 40 % of the free device memory where that is less;
    `smoke` (a CPU check of the script) shrinks everything to a few MiB."""
    if smoke:
        read_gib, copy_gib = 1 / 16, 1 / 16
    elif read_gib is None:
        free = free_device_bytes()
        read_gib = READ_GIB if free is None else min(READ_GIB, 0.4 * free / GIB)
    reduce_bps, gemv_bps, nbytes = read_bandwidth(read_gib)
    copy_bps = copy_bandwidth(min(copy_gib, read_gib))
    peak = matmul_flops(256 if smoke else 8192) if flops else None
    lim = DeviceLimits(max(reduce_bps, gemv_bps), reduce_bps, gemv_bps, copy_bps, nbytes, peak)
    print(f"device limits: {lim.describe()}", flush=True)
    return lim


READ_FRACTIONS = ("read_roofline_fraction", "device_read_roofline_fraction")


def rebase_read_limit(rows: list) -> list:
    """The read limit is at least the best read rate anything in this run reached. Where a read-only kernel
    still outran the probes, that rate becomes the denominator of every row of the run, marked
    `read_limit_source`; the row that set it carries no fraction (it would be 1 by construction) but
    `sets_read_limit`. Returns new rows (a bench saving as it goes passes its growing list again)."""
    best = max((r[k] for r in rows for k in READ_FRACTIONS if r.get(k) is not None), default=0.0)
    if best <= 1.0:
        return rows
    rows = [dict(r) for r in rows]
    for r in rows:
        for k in READ_FRACTIONS:
            if r.get(k) is None:
                continue
            if r[k] == best:
                r[k], r["sets_read_limit"] = None, True
            else:
                r[k] = round(r[k] / best, 4)
        if r.get("read_limit_tbps") is not None:
            r["read_limit_tbps"] = round(r["read_limit_tbps"] * best, 4)
            r["read_limit_source"] = "the fastest read-only row of this run (above the probes)"
    return rows


def write_json(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float32; inf if `out` has a NaN or inf (which the norm could hide)."""
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def tunables_name(prefix: str, tunables: dict) -> str:
    """'pallas:block_kv64-num_warps4' for a row's kernel column; the bare prefix for the defaults."""
    return prefix + (":" + "-".join(f"{k}{v}" for k, v in tunables.items()) if tunables else "")


# -- the kernel benches' driver ----------------------------------------------------------------
class KernelBenchRun:
    """What the timing and sweep phases of one kernel-bench run share: device, bandwidth, clock, rows."""

    def __init__(self, print_row: Callable[[dict], None]):
        self.t_start = time.perf_counter()
        self.device = device_name()
        self.limits: Optional[DeviceLimits] = None  # measured before the timings
        self.rows: list = []
        self.commit = git_commit()
        self._print_row = print_row

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def emit(self, rows: list) -> list:
        """Keep `rows` for the JSON file and print each as it comes; returns them."""
        for r in rows:
            r.setdefault("git_commit", self.commit)
            self.rows.append(r)
            self._print_row(r)
        return rows


def kernel_bench_main(argv, *, doc: str, cfg, correctness: Callable[[], list],
                      timings: Callable[[KernelBenchRun], None], sweep: Callable[[KernelBenchRun], None],
                      print_row: Callable[[dict], None], out_file: str) -> int:
    """(a) correctness, (b) timings, (c) a tunables sweep, rows to <out>/`out_file`; exit status 1 on a FAIL.

    `cfg` is the script's shape class (`smoke()`, `interpret`, `flops`: whether its rows need the
    matmul rate);
    `correctness()` returns the names of failed checks; `timings` and `sweep`
    print their section header and `emit` their rows.
    """
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-sweep", action="store_true", help="skip the tunables sweep")
    ap.add_argument("--check-only", action="store_true", help="only the correctness checks")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes in interpret mode: checks the script itself on a CPU")
    args = ap.parse_args(argv)
    if args.smoke:
        cfg.smoke()
    run = KernelBenchRun(print_row)
    print(f"device {run.device}, jax {jax.__version__}, commit {run.commit}")
    if not args.check_only:  # first, while the device is empty
        run.limits = device_limits(flops=getattr(cfg, "flops", False), smoke=args.smoke)

    print(f"== (a) correctness (interpret={cfg.interpret}) vs the XLA reference")
    failures = correctness()
    if not args.check_only:
        timings(run)
        if not args.no_sweep:
            sweep(run)
        path = os.path.join(args.out, out_file)
        write_json(path, rebase_read_limit(run.rows))
        print(f"wrote {len(run.rows)} rows to {path}")
    print(f"total {run.elapsed():.0f}s; "
          f"{'all checks PASS' if not failures else 'FAILED: ' + ', '.join(failures)}")
    return 1 if failures else 0
