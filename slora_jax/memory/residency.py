"""Adapter residency: host store -> device pool pages, LRU eviction, prefetch.

Swap-in = one host->device transfer of the adapter's compact buffer + one
donated scatter into its pages; swap-out = freeing its pages (the host copy
stays the source of truth). `prefetch` starts the host->device transfers of
adapters that queued requests will need before the step that needs them; the
scatter happens when the adapter gets pages. Measured on the H200 (jax
0.11.2, BENCHMARKS.md): issued while one step runs and before the next is
dispatched, as the engine's loop does, device_put transfers (to_device's path)
are 0.93 hidden behind the steps; issued after the last step they queue behind
it (0.04), and the identity-jit fallback never overlaps (0.02).

Each resident adapter also gets a small integer slot; `tables` holds, per slot
and module, the adapter's pool rows for the LoRA kernels ([R, K] padded), so a
step's segment tables are one vectorised numpy gather by slot.
"""
from __future__ import annotations

import logging

import numpy as np

from ..adapters.store import AdapterStore, to_device
from ..config import LORA_MODULES, ModelConfig
from . import layout
from .pages import OutOfPages, PageTable
from .pool import DevicePool

log = logging.getLogger(__name__)


class AdapterResidency:
    def __init__(self, cfg: ModelConfig, store: AdapterStore, pages: PageTable, pool: DevicePool, max_rank: int):
        self.cfg, self.store, self.pages, self.pool, self.max_rank = cfg, store, pages, pool, max_rank
        self.k = [layout.module_slots(cfg, m) for m in LORA_MODULES]
        self.slot_of: dict = {}
        self._free_slots: list = []
        self.a_tab = [np.zeros((0, max_rank, k_in), np.int32) for k_in, _ in self.k]
        self.b_tab = [np.zeros((0, max_rank, k_out), np.int32) for _, k_out in self.k]
        self.rank_tab = np.zeros((0, len(LORA_MODULES)), np.int32)
        self._inflight: dict = {}  # name -> device array being transferred
        self.swaps_in = 0
        self.swaps_out = 0

    # -- residency -----------------------------------------------------------------
    def pages_needed(self, name: str) -> int:
        if self.pages.is_resident(name):
            return 0
        return self.pages.adapter_pages_needed(self.store.get(name).n_rows)

    def make_resident(self, name: str) -> None:
        """Swap `name` in if needed (evicting idle adapters LRU). Raises OutOfPages, changing nothing."""
        if self.pages.is_resident(name):
            self.pages.touch(name)
            return
        entry = self.store.get(name)
        _, evicted = self.pages.load_adapter(name, entry.n_rows)
        for e in evicted:
            self._drop_slot(e)
        rows = self.pages.adapter_rows(name)
        data = self._inflight.pop(name, None)
        if data is None:
            data = to_device(entry.buffer, self.pool.array.sharding)
        self.pool.write_rows(rows, data)
        self._assign_slot(name, entry.ranks, rows)
        self.swaps_in += 1

    def evict(self, name: str) -> None:
        if self.pages.is_resident(name):
            self.pages.evict(name)
            self._drop_slot(name)

    def prefetch(self, names) -> None:
        """Start host->device copies for adapters that are not resident yet (asynchronous)."""
        for name in names:
            if name is None or name in self._inflight or self.pages.is_resident(name) or name not in self.store:
                continue
            if len(self._inflight) >= 8:  # bound the device memory held by prefetches
                break
            self._inflight[name] = to_device(self.store.get(name).buffer, self.pool.array.sharding)

    def forget(self, name: str) -> None:
        """Adapter removed from the store: drop any device copy."""
        self._inflight.pop(name, None)
        self.evict(name)

    # -- slot tables ---------------------------------------------------------------
    def _assign_slot(self, name, ranks: dict, rows: np.ndarray) -> None:
        if not self._free_slots:
            self._grow()
        slot = self._free_slots.pop()
        tables = layout.module_tables(self.cfg, ranks, rows)
        self.rank_tab[slot] = 0
        for i, m in enumerate(LORA_MODULES):
            self.a_tab[i][slot] = 0
            self.b_tab[i][slot] = 0
            if m in tables:
                a, b = tables[m]
                r = a.shape[0]
                self.a_tab[i][slot, :r] = a
                self.b_tab[i][slot, :r] = b
                self.rank_tab[slot, i] = r
        self.slot_of[name] = slot

    def _drop_slot(self, name) -> None:
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.rank_tab[slot] = 0
            self._free_slots.append(slot)
            self.swaps_out += 1

    def reserve_slots(self, n: int) -> None:
        while len(self.rank_tab) < n:
            self._grow()

    def _grow(self) -> None:
        n = len(self.rank_tab)
        new = max(16, 2 * n)
        self.a_tab = [np.concatenate([t, np.zeros((new - n,) + t.shape[1:], np.int32)]) for t in self.a_tab]
        self.b_tab = [np.concatenate([t, np.zeros((new - n,) + t.shape[1:], np.int32)]) for t in self.b_tab]
        self.rank_tab = np.concatenate([self.rank_tab, np.zeros((new - n, len(LORA_MODULES)), np.int32)])
        self._free_slots.extend(range(new - 1, n - 1, -1))


__all__ = ["AdapterResidency", "OutOfPages"]
