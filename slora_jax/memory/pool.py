"""The unified device pool: one [L, S, W] array for KV pages and adapter pages.

Allocated once at start-up (from `num_pages`, or `mem_fraction` of the device
memory left after the weights). The pool is the largest allocation on the
device, so every update is a jitted scatter with the pool donated (updated in
place); a non-donated update would transiently need a second pool. Row-index
arrays are padded to power-of-two buckets so swap-ins compile a bounded number
of programs.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from ..config import EngineConfig, ModelConfig
from .layout import PoolLayout, cdiv, row_width

log = logging.getLogger(__name__)


def page_bytes(cfg: ModelConfig, page_rows: int, dtype) -> int:
    """Bytes of one page over all layers: its K block and its V block."""
    return cfg.num_layers * 2 * page_rows * row_width(cfg) * jnp.dtype(dtype).itemsize


def free_device_bytes(device=None) -> int | None:
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def choose_num_pages(cfg: ModelConfig, ecfg: EngineConfig, dtype) -> int:
    if ecfg.num_pages is not None:
        return int(ecfg.num_pages)
    free = free_device_bytes()
    if free is None:  # CPU: no memory stats; a pool for a few full-length sequences
        pages = 8 * cdiv(ecfg.max_model_len, ecfg.page_rows)
        log.info("no device memory stats; using num_pages=%d", pages)
        return pages
    # free memory is per device, and under tensor parallelism each device holds 1/tp of every page
    return max(1, int(free * ecfg.mem_fraction) * ecfg.tp // page_bytes(cfg, ecfg.page_rows, dtype))


def _bucket(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


@functools.partial(jax.jit, donate_argnums=0)
def _scatter_rows(pool, rows, data):
    return pool.at[:, rows].set(data.astype(pool.dtype), mode="drop")


class DevicePool:
    """Owns the pool array; the host page table (pages.py) decides what goes where."""

    def __init__(self, layout: PoolLayout, dtype, sharding=None):
        self.layout, self.dtype = layout, dtype
        self.shape = layout.shape
        # committed to its device(s) from the start, as every later (donated) update returns it: an
        # uncommitted first pool would give each step program a second cache entry
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.array = jax.jit(functools.partial(jnp.zeros, self.shape, dtype), out_shardings=sharding)()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * jnp.dtype(self.dtype).itemsize

    def write_rows(self, rows: np.ndarray, data) -> None:
        """pool[:, rows] = data ([L, n, W], host or device): one donated scatter.

        Asynchronous: returns once dispatched, so a swap-in overlaps whatever
        the device is running.
        """
        n = len(rows)
        padded = np.full(_bucket(n), self.shape[1], np.int32)  # out-of-range rows are dropped
        padded[:n] = rows
        if data.shape[1] != len(padded):
            data = jnp.pad(jnp.asarray(data), ((0, 0), (0, len(padded) - n), (0, 0)))
        self.array = _scatter_rows(self.array, jnp.asarray(padded), data)
