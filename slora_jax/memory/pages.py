"""Host page table of the unified pool: the single owner of page state.

Geometry
--------
The device pool is ``pool[L, S, W]`` with ``S = 2 * N * page_rows`` (see
``pallas_kernels/reference.py``). Page ``p`` (``0 <= p < N``) owns two blocks
of ``page_rows`` rows: its K block, rows ``[p * pr, (p + 1) * pr)``, and its V
block, rows ``[(N + p) * pr, (N + p + 1) * pr)`` (``pr = page_rows``).

A page is either

* **KV** of one sequence: ``page_rows`` consecutive tokens; token ``i`` of the
  sequence has its K vector at pool row ``pages[i // pr] * pr + i % pr`` and
  its V vector ``N * pr`` rows further; or
* **adapter** rows of one resident adapter: ``2 * page_rows`` rows, the K block
  first then the V block. Flat adapter row ``i`` lives in page
  ``pages[i // (2 * pr)]`` at ``w = i % (2 * pr)``: pool row ``page * pr + w``
  if ``w < pr`` else ``(N + page) * pr + (w - pr)``. (How an adapter's A/B
  matrices are flattened into rows is the adapter manager's business; this
  table only hands out row indices.) or
* **free**.

Pages are token blocks of ``page_rows`` rows. ``page_rows = 1`` is S-LoRA's
token granularity (no internal fragmentation: a sequence wastes nothing, an
adapter at most one row); larger blocks (16 is the default) let kernels move
whole pages by DMA / vectorised loads, at the price of at most
``page_rows - 1`` wasted token slots per sequence and ``2 * page_rows - 1``
rows per adapter.

Adapters
--------
The host copy of every adapter's weights is the source of truth, so evicting
an adapter only frees its pages (nothing is copied back). Residents are kept
in LRU order (load, :meth:`PageTable.acquire`, :meth:`PageTable.release` and
:meth:`PageTable.touch` mark an adapter most recently used); the refcount is
the number of running sequences using it, and only idle (refcount 0)
adapters may be evicted. ``extend`` never evicts: the caller (scheduler)
decides, using :meth:`PageTable.evict_for` / :meth:`PageTable.evictable_pages`.

Everything is numpy; per-page and per-token work is vectorised, Python loops
run only over sequences or adapters.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, NamedTuple, Sequence

import numpy as np

__all__ = ["OutOfPages", "AdapterLoad", "PageTable", "FREE", "KV", "ADAPTER"]

FREE = 0
KV = 1
ADAPTER = 2

_INT32_MAX = np.iinfo(np.int32).max


class OutOfPages(RuntimeError):
    """Not enough pages. Raised before any state is changed."""

    def __init__(self, needed: int, free: int, evictable: int, what: str = ""):
        self.needed = int(needed)
        self.free = int(free)
        self.evictable = int(evictable)
        self.what = what
        prefix = f"{what}: " if what else ""
        super().__init__(
            f"{prefix}out of pages: needed {self.needed} pages, "
            f"{self.free} free, {self.evictable} evictable (held by idle adapters)"
        )


class AdapterLoad(NamedTuple):
    """Result of :meth:`PageTable.load_adapter` (unpacks as ``pages, evicted``)."""

    pages: np.ndarray  # int32 page indices, in order
    evicted: list  # names of adapters evicted to make room, LRU first


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Seq:
    __slots__ = ("buf", "n", "length")

    def __init__(self) -> None:
        self.buf = np.empty(4, dtype=np.int32)
        self.n = 0  # pages in use
        self.length = 0  # tokens

    @property
    def pages(self) -> np.ndarray:
        return self.buf[: self.n]


class _Adapter:
    __slots__ = ("pages", "n_rows", "uid")

    def __init__(self, pages: np.ndarray, n_rows: int, uid: int) -> None:
        self.pages = pages
        self.n_rows = n_rows
        self.uid = uid


class PageTable:
    """Host-side page table of a pool of ``num_pages`` pages of ``page_rows`` rows."""

    def __init__(self, num_pages: int, page_rows: int):
        num_pages = int(num_pages)
        page_rows = int(page_rows)
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if page_rows < 1:
            raise ValueError(f"page_rows must be >= 1, got {page_rows}")
        if 2 * num_pages * page_rows > _INT32_MAX:
            raise ValueError(
                f"pool of 2 * {num_pages} * {page_rows} rows does not fit int32 row indices"
            )
        self._n = num_pages
        self._pr = page_rows
        self._owner_kind = np.zeros(num_pages, dtype=np.int8)
        self._owner_id = np.full(num_pages, -1, dtype=np.int64)
        # Free stack: the top is at _free_count - 1; popping first yields low pages.
        self._free_stack = np.arange(num_pages - 1, -1, -1, dtype=np.int32)
        self._free_count = num_pages
        self._kv_count = 0
        self._adapter_count = 0
        self._seqs: dict[int, _Seq] = {}
        self._adapters: dict[Hashable, _Adapter] = {}
        self._refcount: dict[Hashable, int] = {}
        self._lru: OrderedDict[Hashable, None] = OrderedDict()  # first = least recently used
        self._next_uid = 0
        self._swaps_in = 0
        self._swaps_out = 0

    # ------------------------------------------------------------------ basics
    @property
    def num_pages(self) -> int:
        return self._n

    @property
    def page_rows(self) -> int:
        return self._pr

    @property
    def pool_rows(self) -> int:
        """S = 2 * num_pages * page_rows."""
        return 2 * self._n * self._pr

    @property
    def v_row_offset(self) -> int:
        """Add to a K row index (from kv_slots) to get the V row: N * page_rows."""
        return self._n * self._pr

    @property
    def free_count(self) -> int:
        return self._free_count

    @property
    def kv_count(self) -> int:
        return self._kv_count

    @property
    def adapter_count(self) -> int:
        return self._adapter_count

    @property
    def owner_kind(self) -> np.ndarray:
        """Read-only int8 [N]: 0 free, 1 KV, 2 adapter."""
        return _readonly(self._owner_kind)

    @property
    def owner_id(self) -> np.ndarray:
        """Read-only int64 [N]: seq id (KV), internal adapter uid (adapter), -1 (free)."""
        return _readonly(self._owner_id)

    def free_list(self) -> np.ndarray:
        """Copy of the free stack, bottom first (the next pages handed out are at the end)."""
        return self._free_stack[: self._free_count].copy()

    def stats(self) -> dict:
        return {
            "pages_total": self._n,
            "page_rows": self._pr,
            "pages_free": self._free_count,
            "pages_kv": self._kv_count,
            "pages_adapter": self._adapter_count,
            "pages_evictable": self.evictable_pages(),
            "sequences": len(self._seqs),
            "kv_tokens": sum(s.length for s in self._seqs.values()),
            "adapters_resident": len(self._adapters),
            "adapters_in_use": sum(1 for c in self._refcount.values() if c > 0),
            "swaps_in": self._swaps_in,
            "swaps_out": self._swaps_out,
        }

    # ------------------------------------------------------------ allocation
    def _pop(self, k: int) -> np.ndarray:
        assert 0 <= k <= self._free_count
        c = self._free_count
        pages = self._free_stack[c - k : c][::-1].copy()
        self._free_count = c - k
        return pages

    def _push(self, pages: np.ndarray) -> None:
        k = len(pages)
        c = self._free_count
        # Reversed so that popping them again yields them in their original order.
        self._free_stack[c : c + k] = pages[::-1]
        self._free_count = c + k
        self._owner_kind[pages] = FREE
        self._owner_id[pages] = -1

    # ---------------------------------------------------------------------- KV
    @staticmethod
    def _check_seq_id(seq_id) -> int:
        if isinstance(seq_id, (bool, np.bool_)) or not isinstance(seq_id, (int, np.integer)):
            raise TypeError(f"seq_id must be an int, got {seq_id!r}")
        return int(seq_id)

    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def seq_ids(self) -> list[int]:
        return list(self._seqs)

    def pages_needed(self, seq_id: int, new_len: int) -> int:
        """Additional pages for ``seq_id`` to hold ``new_len`` tokens (unknown seq: from scratch)."""
        s = self._seqs.get(seq_id)
        have = s.n if s is not None else 0
        return max(0, _cdiv(int(new_len), self._pr) - have)

    def extend(self, seq_id: int, new_len: int) -> np.ndarray:
        """Grow (or create) ``seq_id`` so that it holds ``new_len`` tokens.

        Returns the newly allocated pages (int32, possibly empty). Raises
        ValueError if ``new_len`` is smaller than the current length, and
        OutOfPages (changing nothing) if there are not enough free pages; it
        never evicts adapters.
        """
        seq_id = self._check_seq_id(seq_id)
        new_len = int(new_len)
        if new_len < 0:
            raise ValueError(f"new_len must be >= 0, got {new_len}")
        s = self._seqs.get(seq_id)
        if s is not None and new_len < s.length:
            raise ValueError(
                f"extend(seq {seq_id}, {new_len}): shorter than its current length {s.length}"
            )
        need = _cdiv(new_len, self._pr) - (s.n if s is not None else 0)
        if need > self._free_count:
            raise OutOfPages(need, self._free_count, self.evictable_pages(),
                             f"extend(seq {seq_id}, {new_len})")
        if s is None:
            s = self._seqs[seq_id] = _Seq()
        if need > 0:
            new = self._pop(need)
            self._owner_kind[new] = KV
            self._owner_id[new] = seq_id
            self._kv_count += need
            if s.n + need > len(s.buf):
                buf = np.empty(max(2 * len(s.buf), s.n + need), dtype=np.int32)
                buf[: s.n] = s.buf[: s.n]
                s.buf = buf
            s.buf[s.n : s.n + need] = new
            s.n += need
        else:
            new = np.empty(0, dtype=np.int32)
        s.length = new_len
        return new

    def free_seq(self, seq_id: int) -> None:
        """Free all pages of ``seq_id`` (KeyError if unknown)."""
        s = self._seqs.pop(seq_id)
        if s.n:
            self._push(s.pages)
            self._kv_count -= s.n

    def seq_pages(self, seq_id: int) -> np.ndarray:
        """Read-only int32 page indices of ``seq_id``, in token order."""
        return _readonly(self._seqs[seq_id].pages)

    def seq_len(self, seq_id: int) -> int:
        return self._seqs[seq_id].length

    def kv_slots(self, seq_id: int, start: int, end: int) -> np.ndarray:
        """int32 pool K row of each token position in [start, end) of ``seq_id``.

        V rows are these plus :attr:`v_row_offset`.
        """
        s = self._seqs[seq_id]
        start, end = int(start), int(end)
        if not 0 <= start <= end <= s.length:
            raise ValueError(
                f"kv_slots(seq {seq_id}, {start}, {end}): out of range [0, {s.length}]"
            )
        pos = np.arange(start, end, dtype=np.int64)
        pr = self._pr
        return (s.pages[pos // pr].astype(np.int64) * pr + pos % pr).astype(np.int32)

    def block_table(self, seq_ids: Sequence[int], width: int) -> np.ndarray:
        """int32 [len(seq_ids), width] page indices per sequence, padded with 0."""
        width = int(width)
        out = np.zeros((len(seq_ids), width), dtype=np.int32)
        for i, sid in enumerate(seq_ids):
            s = self._seqs[sid]
            if s.n > width:
                raise ValueError(f"block_table: seq {sid} has {s.n} pages > width {width}")
            out[i, : s.n] = s.pages
        return out

    # ---------------------------------------------------------------- adapters
    def adapter_pages_needed(self, n_rows: int) -> int:
        return _cdiv(int(n_rows), 2 * self._pr)

    def is_resident(self, name: Hashable) -> bool:
        return name in self._adapters

    def resident_adapters(self) -> list:
        """Names of resident adapters, least recently used first."""
        return list(self._lru)

    def lru_order(self) -> list:
        """Same as :meth:`resident_adapters` (LRU first)."""
        return list(self._lru)

    def refcount(self, name: Hashable) -> int:
        return self._refcount[name]

    def adapter_pages(self, name: Hashable) -> np.ndarray:
        return _readonly(self._adapters[name].pages)

    def adapter_n_rows(self, name: Hashable) -> int:
        return self._adapters[name].n_rows

    def _idle_lru(self) -> list:
        return [n for n in self._lru if self._refcount[n] == 0]

    def evictable_pages(self) -> int:
        """Pages held by idle (refcount 0) resident adapters."""
        return sum(len(self._adapters[n].pages) for n, c in self._refcount.items() if c == 0)

    def load_adapter(self, name: Hashable, n_rows: int) -> AdapterLoad:
        """Allocate ceil(n_rows / (2 * page_rows)) pages for adapter ``name``.

        Evicts idle adapters in LRU order if needed. Raises ValueError if
        already resident, OutOfPages (changing nothing) if it cannot fit even
        after evicting every idle adapter. The new adapter is most recently
        used, with refcount 0.
        """
        n_rows = int(n_rows)
        if n_rows < 1:
            raise ValueError(f"load_adapter({name!r}): n_rows must be >= 1, got {n_rows}")
        if name in self._adapters:
            raise ValueError(f"load_adapter({name!r}): already resident")
        need = self.adapter_pages_needed(n_rows)
        evict: list = []
        if need > self._free_count:
            avail = self._free_count
            for n in self._idle_lru():
                if avail >= need:
                    break
                evict.append(n)
                avail += len(self._adapters[n].pages)
            if avail < need:
                raise OutOfPages(need, self._free_count, self.evictable_pages(),
                                 f"load_adapter({name!r}, {n_rows} rows)")
        for n in evict:
            self._evict(n)
        pages = self._pop(need)
        uid = self._next_uid
        self._next_uid += 1
        self._owner_kind[pages] = ADAPTER
        self._owner_id[pages] = uid
        self._adapter_count += need
        self._adapters[name] = _Adapter(pages, n_rows, uid)
        self._refcount[name] = 0
        self._lru[name] = None
        self._swaps_in += 1
        return AdapterLoad(_readonly(pages), evict)

    def adapter_rows(self, name: Hashable) -> np.ndarray:
        """int32 [n_rows]: pool row index of each of the adapter's rows, in order."""
        a = self._adapters[name]
        pr, n = self._pr, self._n
        i = np.arange(a.n_rows, dtype=np.int64)
        page = a.pages[i // (2 * pr)].astype(np.int64)
        w = i % (2 * pr)
        rows = np.where(w < pr, page * pr + w, (n + page) * pr + (w - pr))
        return rows.astype(np.int32)

    def _evict(self, name: Hashable) -> None:
        a = self._adapters.pop(name)
        del self._refcount[name]
        del self._lru[name]
        self._push(a.pages)
        self._adapter_count -= len(a.pages)
        self._swaps_out += 1

    def evict(self, name: Hashable) -> None:
        """Free the pages of resident adapter ``name``; refused if it is in use."""
        if name not in self._adapters:
            raise KeyError(f"evict({name!r}): adapter not resident")
        rc = self._refcount[name]
        if rc > 0:
            raise RuntimeError(
                f"evict({name!r}): adapter in use by {rc} running sequence(s); release it first"
            )
        self._evict(name)

    def evict_for(self, n_pages: int) -> list:
        """Evict idle adapters, LRU first, until free_count >= n_pages or none is left.

        Returns the evicted names (possibly without reaching n_pages).
        """
        out = []
        if self._free_count >= n_pages:
            return out
        for n in self._idle_lru():
            self._evict(n)
            out.append(n)
            if self._free_count >= n_pages:
                break
        return out

    def touch(self, name: Hashable) -> None:
        """Mark resident adapter ``name`` most recently used."""
        if name not in self._adapters:
            raise KeyError(f"touch({name!r}): adapter not resident")
        self._lru.move_to_end(name)

    def acquire(self, name: Hashable) -> int:
        """A running sequence starts using ``name`` (must be resident). Returns the refcount."""
        if name not in self._adapters:
            raise KeyError(f"acquire({name!r}): adapter not resident")
        self._refcount[name] += 1
        self._lru.move_to_end(name)
        return self._refcount[name]

    def release(self, name: Hashable) -> int:
        """A sequence stops using ``name``. Marks it most recently used. Returns the refcount."""
        if name not in self._adapters:
            raise KeyError(f"release({name!r}): adapter not resident")
        if self._refcount[name] <= 0:
            raise RuntimeError(f"release({name!r}): refcount is already 0")
        self._refcount[name] -= 1
        self._lru.move_to_end(name)
        return self._refcount[name]

    # -------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Raise AssertionError (with a precise message) unless the table is consistent."""
        n, pr = self._n, self._pr
        kind, oid = self._owner_kind, self._owner_id

        def fail(msg: str) -> None:
            raise AssertionError(f"PageTable invariant violated: {msg}")

        bad = np.flatnonzero((kind != FREE) & (kind != KV) & (kind != ADAPTER))
        if bad.size:
            fail(f"owner_kind has invalid values at pages {bad[:8].tolist()}: "
                 f"{kind[bad[:8]].tolist()}")
        if not 0 <= self._free_count <= n:
            fail(f"free_count {self._free_count} outside [0, {n}]")

        free = self._free_stack[: self._free_count].astype(np.int64)
        seq_list = list(self._seqs.items())
        ad_list = list(self._adapters.items())
        kv_pages = (np.concatenate([s.pages for _, s in seq_list]).astype(np.int64)
                    if seq_list else np.empty(0, np.int64))
        kv_owner = (np.repeat(np.array([sid for sid, _ in seq_list], dtype=np.int64),
                              [s.n for _, s in seq_list])
                    if seq_list else np.empty(0, np.int64))
        ad_pages = (np.concatenate([a.pages for _, a in ad_list]).astype(np.int64)
                    if ad_list else np.empty(0, np.int64))
        ad_owner = (np.repeat(np.array([a.uid for _, a in ad_list], dtype=np.int64),
                              [len(a.pages) for _, a in ad_list])
                    if ad_list else np.empty(0, np.int64))

        for label, arr in (("free list", free), ("KV", kv_pages), ("adapter", ad_pages)):
            oob = arr[(arr < 0) | (arr >= n)]
            if oob.size:
                fail(f"{label} page indices out of range [0, {n}): {oob[:8].tolist()}")

        free_c = np.bincount(free, minlength=n)
        kv_c = np.bincount(kv_pages, minlength=n)
        ad_c = np.bincount(ad_pages, minlength=n)
        total = free_c + kv_c + ad_c
        bad = np.flatnonzero(total != 1)
        if bad.size:
            details = []
            for p in bad[:8].tolist():
                seqs = sorted(set(kv_owner[kv_pages == p].tolist()))
                uids = set(ad_owner[ad_pages == p].tolist())
                names = [nm for nm, a in ad_list if a.uid in uids]
                details.append(f"page {p}: {free_c[p]}x in free list, {kv_c[p]}x KV "
                               f"(seqs {seqs}), {ad_c[p]}x adapter ({names})")
            fail(f"{bad.size} page(s) not owned exactly once: " + "; ".join(details))

        exp_kind = np.zeros(n, dtype=np.int8)
        exp_kind[kv_pages] = KV
        exp_kind[ad_pages] = ADAPTER
        exp_id = np.full(n, -1, dtype=np.int64)
        exp_id[kv_pages] = kv_owner
        exp_id[ad_pages] = ad_owner
        bad = np.flatnonzero(exp_kind != kind)
        if bad.size:
            fail(f"owner_kind disagrees at pages {bad[:8].tolist()}: has "
                 f"{kind[bad[:8]].tolist()}, expected {exp_kind[bad[:8]].tolist()}")
        bad = np.flatnonzero(exp_id != oid)
        if bad.size:
            fail(f"owner_id disagrees at pages {bad[:8].tolist()}: has "
                 f"{oid[bad[:8]].tolist()}, expected {exp_id[bad[:8]].tolist()}")

        if self._free_count != int(np.count_nonzero(kind == FREE)):
            fail(f"free_count {self._free_count} != pages of kind free "
                 f"{int(np.count_nonzero(kind == FREE))}")
        if self._kv_count != kv_pages.size:
            fail(f"kv_count {self._kv_count} != {kv_pages.size} pages held by sequences")
        if self._adapter_count != ad_pages.size:
            fail(f"adapter_count {self._adapter_count} != {ad_pages.size} pages held by adapters")
        if self._free_count + self._kv_count + self._adapter_count != n:
            fail(f"free {self._free_count} + kv {self._kv_count} + adapter "
                 f"{self._adapter_count} != num_pages {n}")

        for sid, s in seq_list:
            if s.length < 0 or s.n != _cdiv(s.length, pr):
                fail(f"seq {sid}: {s.n} pages for {s.length} tokens, expected "
                     f"{_cdiv(s.length, pr)} (page_rows {pr})")
        uids = [a.uid for _, a in ad_list]
        if len(set(uids)) != len(uids):
            fail(f"duplicate adapter uids {uids}")
        for nm, a in ad_list:
            if a.n_rows < 1 or len(a.pages) != _cdiv(a.n_rows, 2 * pr):
                fail(f"adapter {nm!r}: {len(a.pages)} pages for {a.n_rows} rows, expected "
                     f"{_cdiv(a.n_rows, 2 * pr)}")
        if set(self._refcount) != set(self._adapters):
            fail(f"refcount keys {sorted(map(repr, self._refcount))} != resident adapters "
                 f"{sorted(map(repr, self._adapters))}")
        if set(self._lru) != set(self._adapters) or len(self._lru) != len(self._adapters):
            fail(f"LRU entries {list(self._lru)} != resident adapters {list(self._adapters)}")
        neg = {nm: c for nm, c in self._refcount.items() if c < 0}
        if neg:
            fail(f"negative refcounts {neg}")
