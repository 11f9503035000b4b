"""Adapter swap-in on the GPU: host store (pinned_host) -> device pool pages.

1. Pinned host->device bandwidth (the denominator), measured in the same run.
2. Swap-in time and GB/s per Llama-7B q,k,v,o adapter at ranks 8/16/64, singly and up to 256 at once (as
   many as fit the device: the pool of all of them plus their copies in flight within 70 % of its free memory).
3. Overlap: a decode-sized step (reading up to ~13 GB, like a 7B decode step; less where the device has
   not the room) alone and with swaps in flight.
4. Host memory for N Llama-7B rank-8 adapters registered in the store (default 5,000; time-capped).

    python benchmarks/bench_swap.py --out $OUT [--quick] [--n-host 5000]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from slora_jax.adapters.store import AdapterStore, _mover, pinned_sharding, to_device  # noqa: E402
from slora_jax.config import load_model_config  # noqa: E402
from slora_jax.config import EngineConfig  # noqa: E402
from slora_jax.memory import layout  # noqa: E402
from slora_jax.memory.cache import PoolCache  # noqa: E402
from slora_jax.memory.layout import PoolLayout  # noqa: E402
from slora_jax.memory.pages import PageTable  # noqa: E402
from slora_jax.memory.pool import DevicePool  # noqa: E402


def pinned_bandwidth(nbytes: int) -> float:
    sh = pinned_sharding()
    host = np.random.default_rng(0).standard_normal(nbytes // 4, np.float32)
    src = jax.device_put(host, sh) if sh is not None else host
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return nbytes / common.median_seconds(to_device, src, dev)


def many_that_fit(cfg, ranks, dtype) -> int:
    """Adapters per rank for the "at once" rows: 256, or fewer (a power of two) where the pool of all of
    them and the copies of the largest rank's in flight would pass 70 % of the free device memory."""
    one = {r: cfg.num_layers * layout.num_rows(cfg, {m: r for m in ("q_proj", "k_proj", "v_proj", "o_proj")})
           * layout.row_width(cfg) * jnp.dtype(dtype).itemsize for r in ranks}
    free = common.free_device_bytes()
    if free is None:
        return 256
    n = 256
    while n > 16 and n * (sum(one.values()) + max(one.values())) > 0.7 * free:
        n //= 2
    return n


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--n-host", type=int, default=5000, help="0 skips the host-memory measurement")
    ap.add_argument("--host-seconds", type=float, default=150.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only-host", action="store_true", help="only the host-memory measurement")
    args = ap.parse_args()
    if args.quick:
        args.model, args.n_host = "tiny", 50
    cfg, _ = load_model_config(args.model)
    dtype = jnp.bfloat16
    dev = common.device_name()
    bw = pinned_bandwidth(256 << 20 if not args.quick else 8 << 20)
    print(f"pinned host->device: {bw / 1e9:.1f} GB/s (pinned={pinned_sharding() is not None})", flush=True)

    if args.only_host:
        hostmem = host_memory(cfg, dtype, dev, args)
        common.write_json(os.path.join(args.out, "swap_host.json"),
                          {"pinned_h2d_gbps": bw / 1e9, "host_memory": hostmem})
        return
    page_rows = 16
    ranks = (8, 16, 64)
    store = AdapterStore(cfg, max_rank=64, dtype=dtype)
    count_many = 16 if args.quick else many_that_fit(cfg, ranks, dtype)
    for r in ranks:
        store.add_synthetic([f"r{r}-{i}" for i in range(count_many)], r, seed=r)
    rows_per_rank = {r: store.get(f"r{r}-0").n_rows for r in ranks}
    lay = PoolLayout.create(cfg, EngineConfig(page_rows=page_rows, max_model_len=page_rows), 1)
    need_pages = sum(lay.adapter_pages(rows_per_rank[r]) * count_many for r in ranks) + 64
    lay = PoolLayout.create(cfg, EngineConfig(page_rows=page_rows, max_model_len=page_rows), need_pages)
    pool = DevicePool(lay, dtype)
    pages = PageTable(lay)
    res = PoolCache(lay, store, pages, pool, 64, capacity=len(ranks) * count_many)
    print(f"pool {pool.nbytes / 2**30:.1f} GiB for {need_pages} pages", flush=True)

    def swap(names):
        t0 = time.perf_counter()
        for n in names:
            res.acquire(n)
            res.release(n)
        jax.block_until_ready(pool.array)
        return time.perf_counter() - t0

    out = []
    for r in ranks:
        nbytes = store.get(f"r{r}-0").nbytes
        swap([f"r{r}-0"])  # compile the scatter for this size
        res.evict(f"r{r}-0")
        single = []
        for i in range(1, 11):
            single.append(swap([f"r{r}-{i}"]))
        for i in range(1, 11):
            res.evict(f"r{r}-{i}")
        t = statistics.median(single)
        out.append({"device": dev, "rank": r, "count": 1, "seconds": t, "gbps": nbytes / t / 1e9,
                    "bandwidth_fraction": nbytes / t / bw, "bytes": nbytes})
        names = [f"r{r}-{i}" for i in range(count_many)]
        t = swap(names)
        out.append({"device": dev, "rank": r, "count": count_many, "seconds": t,
                    "gbps": nbytes * count_many / t / 1e9, "bandwidth_fraction": nbytes * count_many / t / bw,
                    "bytes": nbytes * count_many})
        for n in names:
            res.evict(n)
        print(json.dumps(out[-2]), "\n", json.dumps(out[-1]), flush=True)

    del res, pages, pool  # the overlap step takes the room the pool had
    gc.collect()
    overlap = overlap_rows(store, [f"r16-{i}" for i in range(min(32, count_many))], dev, args.quick)
    hostmem = host_memory(cfg, dtype, dev, args) if args.n_host > 0 else None  # None: keep swap_host.json's
    common.write_json(os.path.join(args.out, "swap.json"),
                      {"pinned_h2d_gbps": bw / 1e9, "swaps": out, "overlap": overlap, "host_memory": hostmem})


def overlap_rows(store, names, dev, quick) -> list:
    """Can adapter transfers run while the device computes? One row per way of moving the bytes.

    A compute-bound-on-HBM step (chained matmuls over a ~13 GB weight, ~30 ms, like a few decode steps)
    alone, the transfers of `names` alone, then both dispatched together. hidden_fraction = the time
    saved over running them back to back, over the shorter of the two (1 = fully overlapped).
    """
    free = common.free_device_bytes()
    n_w = (min(13 << 30, int(0.3 * free)) if free else 13 << 30) // 2 if not quick else (64 << 20) // 2
    w = jax.random.normal(jax.random.PRNGKey(0), (n_w // 4096, 4096), jnp.bfloat16)
    x = jnp.ones((8, w.shape[0]), jnp.bfloat16)

    @jax.jit
    def step(x, w):
        for _ in range(4):
            x = ((x @ w) @ w.T).astype(x.dtype)
        return x

    target = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    pinned = [store.get(n).buffer for n in names]
    host = [np.asarray(jax.device_get(b)) for b in pinned]
    movers = {"pinned_host device_put": (pinned, lambda b: jax.device_put(b, target.with_memory_kind("device"))),
              "pinned_host identity jit": (pinned, _mover(target)),
              "numpy device_put": (host, lambda b: jax.device_put(b, target))}
    if pinned_sharding() is None:  # CPU: only the numpy path exists
        movers = {"numpy device_put": movers["numpy device_put"]}
    step_alone = common.median_seconds(step, x, w)
    two_steps = common.median_seconds(lambda: step(step(x, w), w))
    rows = []
    for how, (bufs, move) in movers.items():
        try:
            xfer_alone = common.median_seconds(lambda: [move(b) for b in bufs])
            both = common.median_seconds(lambda: (step(x, w), [move(b) for b in bufs]))
        except Exception as e:  # a path this jax version refuses is a finding, not a crash
            rows.append({"device": dev, "how": how, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        nbytes = sum(b.nbytes for b in bufs)
        rows.append(_overlap_row(dev, how, "after a step", len(bufs), nbytes, step_alone, xfer_alone, both))
        # The engine's loop always has a step in flight: a prefetch issued while step N runs is followed by
        # step N + 1's dispatch. If a transfer may only start once the work queued before it is done (the
        # pattern above), it can still run under step N + 1.

        def step_transfers_step():
            a = step(x, w)
            moved = [move(b) for b in bufs]
            return moved, step(a, w)

        between = common.median_seconds(step_transfers_step)
        rows.append(_overlap_row(dev, how, "between two steps", len(bufs), nbytes, two_steps / 2, xfer_alone,
                                 between, steps=2))
    return rows


def _overlap_row(dev, how, pattern, adapters, nbytes, step_s, xfer_s, both_s, steps=1) -> dict:
    """hidden_fraction = time saved over running the steps and the transfers back to back, over the
    shorter of the two (1 = the transfers fully hidden)."""
    saved = steps * step_s + xfer_s - both_s
    row = {"device": dev, "how": how, "pattern": pattern, "adapters": adapters, "bytes": nbytes,
           "step_alone_s": step_s, "transfers_alone_s": xfer_s, "both_s": both_s,
           "hidden_fraction": max(0.0, min(1.0, saved / min(steps * step_s, xfer_s)))}
    print(json.dumps(row), flush=True)
    return row


def host_memory(cfg, dtype, dev, args) -> dict:
    """Register N rank-8 adapters (time-capped); pinned host memory needs XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB
    above its 64 GB default for thousands of 7B adapters."""
    before = rss_gb()
    host = AdapterStore(cfg, max_rank=64, dtype=dtype)
    t0 = time.time()
    n_done = 0
    chunk = 100
    while n_done < args.n_host and time.time() - t0 < args.host_seconds:
        k = min(chunk, args.n_host - n_done)
        host.add_synthetic([f"h{n_done + i}" for i in range(k)], 8, seed=n_done)
        n_done += k
    hostmem = {"device": dev, "adapters": n_done, "target": args.n_host, "seconds": time.time() - t0,
               "store_bytes": host.host_bytes(), "rss_growth_gb": rss_gb() - before,
               "bytes_per_adapter": host.host_bytes() / max(n_done, 1), "pinned": pinned_sharding() is not None}
    print(json.dumps(hostmem), flush=True)
    return hostmem


if __name__ == "__main__":
    main()
