"""The pool cache: the one owner of evictable device state in the unified pool.

Besides running sequences' private KV, the pool holds two kinds of things,
both owned here:

* **resident adapters**: for each, its pool pages (allocated from the page
  table), its entry in the kernels' tables, a refcount (running sequences
  using it) and the swap counters; prefetches of adapters that queued
  requests will need are in flight here too;
* **cached prefix blocks**: full KV pages whose tokens are final, keyed by a
  hash chain (`chain_keys`) over (the adapter's identity: a digest of its
  weights taken at registration, or the base model's; the page's tokens; the
  previous page's key). New sequences share them read-only (the page table
  counts their users) and compute only what follows.

Everything idle (an adapter no running sequence uses, a block no sequence
lists) is in ONE least-recently-used order, and eviction takes from its
front whichever kind comes first: when a sequence needs pages (the page
table asks `make_room`) and when an adapter is swapped in. A key stands for
its whole prefix, so a lookup (`match`) walks the chain key by key and stops
at the first one missing: an evicted middle block ends a match, it never
leaves a hole. A finished sequence's blocks become idle last page first, so
chains lose their tails before their heads.

Swap-in = one host->device transfer of the adapter's compact buffer (started
early by `prefetch` where possible, so it overlaps the running step) + one
donated scatter into its pages; swap-out = freeing its pages (the host copy
stays the source of truth).

The kernels' tables (`AdapterTables`) have a fixed number of entries, decided
at start-up, so adapter churn never changes a step's shapes or the host
arrays it gathers from; running out of entries is handled like a full pool
(evict an idle adapter, else the request waits).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import logging
from typing import Optional

import numpy as np

from ..adapters.store import AdapterStore, to_device
from ..config import LORA_MODULES
from .layout import PoolLayout, module_tables
from .pages import BLOCK, OutOfPages, PageTable
from .pool import DevicePool

log = logging.getLogger(__name__)

MAX_PREFETCH = 8  # adapters whose host->device copy may be in flight at once (bounds their device memory)
BASE_IDENTITY = hashlib.blake2b(b"slora-jax base model", digest_size=16).digest()


def chain_keys(parent: bytes, tokens, page_rows: int) -> list:
    """Keys of the full pages of `tokens`, following the page keyed `parent` (for the first page: the
    adapter's identity). key = blake2b(parent key + the page's int32 token ids): it stands for the identity
    and every token up to the page's end, which is all the page's K/V depend on."""
    data = np.ascontiguousarray(tokens, dtype=np.int32)
    out = []
    for i in range(len(data) // page_rows):
        parent = hashlib.blake2b(parent + data[i * page_rows: (i + 1) * page_rows].tobytes(),
                                 digest_size=16).digest()
        out.append(parent)
    return out


class CacheFull(OutOfPages):
    """Every entry of the kernels' tables belongs to an adapter in use. Raised before any change."""

    def __init__(self, capacity: int, what: str = ""):
        RuntimeError.__init__(self, f"{what}: all {capacity} adapter table entries belong to running adapters")
        self.needed, self.free, self.evictable, self.what = 1, 0, 0, what


class AdapterTables:
    """Per table entry and target module: an adapter's pool rows and rank, read by the LoRA kernels.

    a_rows[m][i] / b_rows[m][i]: [max_rank, K] pool rows of entry i's A^T rows / B rows of module m
    (zero past its rank); ranks[i, m]: its rank on module m (0 = not targeted or a free entry).
    A step's segment tables are one numpy gather by entry.
    """

    def __init__(self, capacity: int, max_rank: int, module_rows: tuple):
        self.a_rows = [np.zeros((capacity, max_rank, k_in), np.int32) for k_in, _ in module_rows]
        self.b_rows = [np.zeros((capacity, max_rank, k_out), np.int32) for _, k_out in module_rows]
        self.ranks = np.zeros((capacity, len(LORA_MODULES)), np.int32)

    def set(self, i: int, tables: dict) -> None:
        """tables: {module: (a_rows [r, K_in], b_rows [r, K_out])} from layout.module_tables."""
        self.clear(i)
        for m, (a, b) in tables.items():
            j = LORA_MODULES.index(m)
            r = a.shape[0]
            self.a_rows[j][i, :r] = a
            self.b_rows[j][i, :r] = b
            self.ranks[i, j] = r

    def clear(self, i: int) -> None:
        self.ranks[i] = 0
        for t in self.a_rows + self.b_rows:
            t[i] = 0


@dataclasses.dataclass
class _Resident:
    holder: int  # the id the page table knows its pages by
    pages: np.ndarray
    index: int  # its entry in AdapterTables
    refcount: int = 0


IDLE_ADAPTER, IDLE_BLOCK = "adapter", "block"  # items of the one LRU: (IDLE_ADAPTER, name), (IDLE_BLOCK, page)


class PoolCache:
    def __init__(self, layout: PoolLayout, store: AdapterStore, pages: PageTable, pool: DevicePool, max_rank: int,
                 capacity: int):
        if capacity < 1:
            raise ValueError(f"the adapter cache needs at least one table entry, got {capacity}")
        self.layout, self.store, self.pages, self.pool = layout, store, pages, pool
        self.capacity = capacity
        self.tables = AdapterTables(capacity, max_rank, layout.module_rows)
        self._resident: collections.OrderedDict[str, _Resident] = collections.OrderedDict()  # first = LRU
        self._free_entries = list(range(capacity - 1, -1, -1))  # popping yields low entries first
        self._holders = itertools.count()
        self._inflight: dict = {}  # name -> device copy being transferred (prefetch)
        # idle adapters and idle blocks, least recently used first: item -> its pages
        self._lru: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        self._evictable = 0  # sum of the LRU's pages
        self._blocks: dict[bytes, int] = {}  # chain key -> page of every cached block (in use or idle)
        self._key_of: dict[int, bytes] = {}  # page -> its key
        self.swaps_in = 0
        self.swaps_out = 0
        pages.set_reclaimer(self)

    # -- queries ---------------------------------------------------------------------
    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def resident(self) -> list:
        """Names of resident adapters, least recently used first."""
        return list(self._resident)

    def refcount(self, name: str) -> int:
        return self._resident[name].refcount

    def index_of(self, name: str) -> int:
        """The adapter's entry in the kernels' tables (it must be resident)."""
        return self._resident[name].index

    def adapter_pages(self, name: str) -> np.ndarray:
        return self._resident[name].pages

    def pages_needed(self, name: str) -> int:
        """Pages a swap-in of `name` would take (0 if resident)."""
        return 0 if name in self._resident else self.layout.adapter_pages(self.store.get(name).n_rows)

    def evictable_pages(self) -> int:
        """Pages of idle adapters and idle blocks."""
        return self._evictable

    def _idle_add(self, item: tuple, n_pages: int) -> None:
        self._lru[item] = n_pages
        self._evictable += n_pages

    def _idle_remove(self, item: tuple) -> None:
        self._evictable -= self._lru.pop(item)

    def can_take(self, name: str) -> bool:
        """Whether `name` is resident or a table entry can be found for it (free, or an idle adapter's)."""
        return name in self._resident or bool(self._free_entries) or any(
            e.refcount == 0 for e in self._resident.values())

    # -- residency -------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """A running sequence starts using `name`: swap it in if needed (evicting idle adapters, LRU first,
        for pages and a table entry) and count the user. Raises OutOfPages / CacheFull, changing nothing."""
        e = self._resident.get(name)
        if e is None:
            e = self._swap_in(name)
        elif e.refcount == 0:
            self._idle_remove((IDLE_ADAPTER, name))
        e.refcount += 1
        self._resident.move_to_end(name)

    def release(self, name: str) -> None:
        """A sequence stops using `name`; it stays resident (most recently used) until evicted."""
        e = self._resident[name]
        if e.refcount <= 0:
            raise RuntimeError(f"release({name!r}): refcount is already 0")
        e.refcount -= 1
        self._resident.move_to_end(name)
        if e.refcount == 0:
            self._idle_add((IDLE_ADAPTER, name), len(e.pages))

    def _swap_in(self, name: str) -> _Resident:
        entry = self.store.get(name)
        need = self.layout.adapter_pages(entry.n_rows)
        what = f"swap in adapter {name!r} ({need} pages)"
        evict, free, entry_free = [], self.pages.free_count, bool(self._free_entries)
        for item, n in self._lru.items():
            if free >= need and entry_free:
                break
            if item[0] == IDLE_BLOCK and free >= need:
                continue  # only an adapter's eviction frees a table entry
            evict.append(item)
            free += n
            entry_free = entry_free or item[0] == IDLE_ADAPTER
        if free < need:
            raise OutOfPages(need, self.pages.free_count, self.evictable_pages(), what)
        if not entry_free:
            raise CacheFull(self.capacity, what)
        self._evict_items(evict)
        holder = next(self._holders)
        pages = self.pages.hold(holder, need, what)
        rows = self.layout.adapter_pool_rows(pages, entry.n_rows)
        data = self._inflight.pop(name, None)
        if data is None:
            data = to_device(entry.buffer, self.pool.array.sharding)
        self.pool.write_rows(rows, data)
        index = self._free_entries.pop()
        self.tables.set(index, module_tables(self.layout.module_rows, entry.ranks, rows))
        res = self._resident[name] = _Resident(holder, pages, index)
        self.swaps_in += 1
        return res

    def make_room(self, n_pages: int) -> None:
        """Evict idle adapters and blocks, least recently used first, until `n_pages` pages are free or
        nothing idle is left."""
        victims, free = [], self.pages.free_count
        for item, n in self._lru.items():
            if free >= n_pages:
                break
            victims.append(item)
            free += n
        self._evict_items(victims)

    def _evict_items(self, items: list) -> None:
        blocks = [page for kind, page in items if kind == IDLE_BLOCK]
        for kind, name in items:
            if kind == IDLE_ADAPTER:
                self._evict(name)
        if blocks:
            for page in blocks:
                self._idle_remove((IDLE_BLOCK, page))
                del self._blocks[self._key_of.pop(page)]
            self.pages.drop_blocks(np.array(blocks, np.int32))

    def evict(self, name: str) -> None:
        """Swap `name` out now (it must be idle)."""
        e = self._resident[name]
        if e.refcount:
            raise RuntimeError(f"evict({name!r}): adapter in use by {e.refcount} running sequence(s)")
        self._evict(name)

    def _evict(self, name: str) -> None:
        e = self._resident.pop(name)
        self._idle_remove((IDLE_ADAPTER, name))
        self.pages.release_held(e.holder)
        self.tables.clear(e.index)
        self._free_entries.append(e.index)
        self.swaps_out += 1

    def forget(self, name: str) -> None:
        """The adapter leaves the store: drop its prefetch and its device pages (it must be idle)."""
        self._inflight.pop(name, None)
        if name in self._resident:
            self.evict(name)

    def prefetch(self, names) -> None:
        """Start host->device copies of adapters that are not resident yet (asynchronous)."""
        for name in names:
            if len(self._inflight) >= MAX_PREFETCH:
                break
            if name is None or name in self._inflight or name in self._resident or name not in self.store:
                continue
            self._inflight[name] = to_device(self.store.get(name).buffer, self.pool.array.sharding)

    # -- prefix blocks ---------------------------------------------------------------
    def identity(self, adapter: Optional[str]) -> bytes:
        """The root of an adapter's chain keys: its weights' digest (the base model: its own)."""
        return BASE_IDENTITY if adapter is None else self.store.get(adapter).digest

    def match(self, keys: list) -> np.ndarray:
        """int32 pages of the longest run of leading `keys` that are cached (one chain: the first miss ends it)."""
        out = []
        for key in keys:
            page = self._blocks.get(key)
            if page is None:
                break
            out.append(page)
        return np.array(out, np.int32)

    def register(self, seq_id: int, first: int, keys: list) -> int:
        """Pages first, first + 1, ... of `seq_id` (full, their tokens final, written by dispatched steps)
        have these keys: cache them as blocks. A page that is already a block (shared from the cache) or
        whose key is cached already (the same prefix computed by another sequence at the same time) stays as
        it is. Returns how many became blocks."""
        pages = self.pages.seq_pages(seq_id)[first: first + len(keys)]
        kinds = self.pages.owner_kind[pages]
        index, new = [], []
        for i, key in enumerate(keys):
            if kinds[i] == BLOCK:
                assert self._key_of[int(pages[i])] == key, (seq_id, first + i)
            elif key not in self._blocks:
                index.append(first + i)
                new.append(key)
        if index:
            for key, page in zip(new, self.pages.seal(seq_id, index).tolist()):
                self._blocks[key] = page
                self._key_of[page] = key
        return len(index)

    def drop_idle(self) -> None:
        """Swap out every idle adapter, drop every idle cached block and every prefetch in flight."""
        self._inflight.clear()
        self._evict_items(list(self._lru))

    def blocks_idle(self, pages: np.ndarray) -> None:
        """The page table: these blocks' refcounts reached 0. They join the LRU as its most recent items."""
        for page in pages.tolist():
            self._idle_add((IDLE_BLOCK, page), 1)

    def blocks_taken(self, pages: np.ndarray) -> None:
        """The page table: these idle blocks are shared by a sequence again."""
        for page in pages.tolist():
            self._idle_remove((IDLE_BLOCK, page))

    def stats(self) -> dict:
        return {"adapters_resident": len(self._resident),
                "adapters_in_use": sum(1 for e in self._resident.values() if e.refcount),
                "adapter_entries": self.capacity, "pages_evictable": self.evictable_pages(),
                "prefix_blocks": len(self._blocks), "swaps_in": self.swaps_in, "swaps_out": self.swaps_out}

    # -- invariants ------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError unless the cache agrees with itself and with the page table."""
        def fail(msg):
            raise AssertionError(f"PoolCache invariant violated: {msg}")

        entries = [e.index for e in self._resident.values()]
        if len(set(entries)) != len(entries):
            fail(f"a table entry is shared: {entries}")
        if sorted(entries + self._free_entries) != list(range(self.capacity)):
            fail(f"entries in use {sorted(entries)} + free {sorted(self._free_entries)} != 0..{self.capacity - 1}")
        if self.swaps_in - self.swaps_out != len(self._resident):
            fail(f"swaps_in {self.swaps_in} - swaps_out {self.swaps_out} != {len(self._resident)} resident")
        holders = {e.holder: n for n, e in self._resident.items()}
        if set(holders) != set(self.pages.holders()):
            fail(f"holders {sorted(holders)} != page table holders {sorted(self.pages.holders())}")
        for name, e in self._resident.items():
            if e.refcount < 0:
                fail(f"{name!r} has refcount {e.refcount}")
            if name not in self.store:
                fail(f"{name!r} is resident but not registered")
            n_rows = self.store.get(name).n_rows
            if len(e.pages) != self.layout.adapter_pages(n_rows) or not np.array_equal(
                    self.pages.held_pages(e.holder), e.pages):
                fail(f"{name!r}: pages {e.pages.tolist()} disagree with the page table or its {n_rows} rows")
            want = {m: r for m, r in self.store.get(name).ranks.items()}
            have = {m: int(self.tables.ranks[e.index, j]) for j, m in enumerate(LORA_MODULES)
                    if self.tables.ranks[e.index, j]}
            if want != have:
                fail(f"{name!r}: table entry {e.index} has ranks {have}, the adapter {want}")
        for i in self._free_entries:
            if self.tables.ranks[i].any():
                fail(f"free table entry {i} has ranks {self.tables.ranks[i].tolist()}")
        kind, refs = self.pages.owner_kind, self.pages.refcount
        block_pages = set(np.flatnonzero(kind == BLOCK).tolist())
        if set(self._blocks.values()) != block_pages or len(self._blocks) != len(block_pages):
            fail(f"cached keys' pages {sorted(self._blocks.values())} != the page table's blocks {sorted(block_pages)}")
        if any(self._key_of.get(p) != k for k, p in self._blocks.items()) or len(self._key_of) != len(self._blocks):
            fail("page -> key is not the inverse of key -> page")
        idle = {(IDLE_ADAPTER, n): len(e.pages) for n, e in self._resident.items() if e.refcount == 0}
        idle.update({(IDLE_BLOCK, p): 1 for p in block_pages if refs[p] == 0})
        if dict(self._lru) != idle:
            fail(f"LRU items {sorted(self._lru, key=str)} != idle adapters and blocks {sorted(idle, key=str)}")
        if self._evictable != sum(idle.values()):
            fail(f"evictable {self._evictable} != {sum(idle.values())} pages of idle adapters and blocks")




def default_capacity(layout: PoolLayout, max_running: int) -> int:
    """Table entries when not configured: as many adapters as the pool could hold next to one full-length
    sequence (an adapter takes at least one page), capped where more resident adapters would not help
    (a few KB of host tables each)."""
    return max(1, min(layout.num_pages - layout.pages_per_seq, max(1024, 2 * max_running)))
