"""Host page table of the unified pool: free-page accounting and the KV pages of each sequence.

The geometry (which pool rows a page owns) is `PoolLayout`'s (memory/layout.py).
A page is either

* **KV** of one sequence: ``page_rows`` consecutive tokens of it, or
* **adapter** rows of one resident adapter, held for the adapter cache
  (memory/cache.py), which owns everything else about adapters: which are
  resident, their LRU order and refcounts, and when to evict them, or
* **free**.

When a sequence needs more pages than are free, the page table asks its
reclaimer (the adapter cache) to give pages back; nobody else evicts.
Errors are raised before any state is changed.

Everything is numpy; per-page and per-token work is vectorised, Python loops
run only over sequences or page holders.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import numpy as np

from .layout import PoolLayout, cdiv

__all__ = ["OutOfPages", "PageTable", "Reclaimer", "FREE", "KV", "ADAPTER"]

FREE = 0
KV = 1
ADAPTER = 2


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


class Reclaimer(Protocol):
    """What the page table asks for room: the owner of evictable pages."""

    def evictable_pages(self) -> int: ...

    def make_room(self, n_pages: int) -> None: ...


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


class _Seq:
    __slots__ = ("buf", "n", "length")

    def __init__(self) -> None:
        self.buf = np.empty(4, dtype=np.int32)
        self.n = 0  # pages in use
        self.length = 0  # tokens

    @property
    def pages(self) -> np.ndarray:
        return self.buf[: self.n]


class PageTable:
    """Host-side page table of the pool described by `layout`."""

    def __init__(self, layout: PoolLayout):
        self.layout = layout
        n = self._n = layout.num_pages
        self._pr = layout.page_rows
        self._owner_kind = np.zeros(n, dtype=np.int8)
        self._owner_id = np.full(n, -1, dtype=np.int64)
        # Free stack: the top is at _free_count - 1; popping first yields low pages.
        self._free_stack = np.arange(n - 1, -1, -1, dtype=np.int32)
        self._free_count = n
        self._kv_count = 0
        self._seqs: dict[int, _Seq] = {}
        self._held: dict[int, np.ndarray] = {}  # adapter pages by holder id (given by the cache)
        self._reclaimer: Optional[Reclaimer] = None

    def set_reclaimer(self, reclaimer: Reclaimer) -> None:
        self._reclaimer = reclaimer

    # ------------------------------------------------------------------ basics
    @property
    def num_pages(self) -> int:
        return self._n

    @property
    def page_rows(self) -> int:
        return self._pr

    @property
    def free_count(self) -> int:
        return self._free_count

    @property
    def kv_count(self) -> int:
        return self._kv_count

    @property
    def adapter_count(self) -> int:
        return self._n - self._free_count - self._kv_count

    def evictable_pages(self) -> int:
        return self._reclaimer.evictable_pages() if self._reclaimer is not None else 0

    @property
    def owner_kind(self) -> np.ndarray:
        """Read-only int8 [N]: 0 free, 1 KV, 2 adapter."""
        return _readonly(self._owner_kind)

    @property
    def owner_id(self) -> np.ndarray:
        """Read-only int64 [N]: seq id (KV), holder id (adapter), -1 (free)."""
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
            "pages_adapter": self.adapter_count,
            "sequences": len(self._seqs),
            "kv_tokens": sum(s.length for s in self._seqs.values()),
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

    def _ensure_free(self, need: int, what: str) -> None:
        """Make `need` pages free, asking the reclaimer for room; OutOfPages (nothing changed) if impossible."""
        if need <= self._free_count:
            return
        evictable = self.evictable_pages()
        if need > self._free_count + evictable:
            raise OutOfPages(need, self._free_count, evictable, what)
        self._reclaimer.make_room(need)
        assert self._free_count >= need, (need, self._free_count)

    # ------------------------------------------------------- adapter pages
    def hold(self, holder: int, n_pages: int, what: str = "") -> np.ndarray:
        """Allocate `n_pages` free pages for adapter holder `holder` (the cache's id). Never reclaims:
        the cache evicts before it asks. OutOfPages if fewer are free."""
        if holder in self._held:
            raise ValueError(f"holder {holder} already holds pages")
        if n_pages > self._free_count:
            raise OutOfPages(n_pages, self._free_count, self.evictable_pages(), what)
        pages = self._pop(int(n_pages))
        self._owner_kind[pages] = ADAPTER
        self._owner_id[pages] = holder
        self._held[holder] = pages
        return _readonly(pages)

    def release_held(self, holder: int) -> None:
        """Free every page of `holder` (KeyError if it holds none)."""
        self._push(self._held.pop(holder))

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
        return max(0, cdiv(new_len, self._pr) - have)

    def extend(self, seq_id: int, new_len: int) -> np.ndarray:
        """Grow (or create) ``seq_id`` so that it holds ``new_len`` tokens.

        Returns the newly allocated pages (int32, possibly empty). Raises
        ValueError if ``new_len`` is smaller than the current length. Asks the
        reclaimer for room when too few pages are free, and raises OutOfPages
        (changing nothing) if even that cannot make enough.
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
        need = cdiv(new_len, self._pr) - (s.n if s is not None else 0)
        self._ensure_free(need, f"extend(seq {seq_id}, {new_len})")
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

    def kv_rows(self, seq_id: int, start: int, end: int) -> np.ndarray:
        """int32 pool K row of each token position in [start, end) of ``seq_id`` (V: + layout.v_row_offset)."""
        s = self._seqs[seq_id]
        start, end = int(start), int(end)
        if not 0 <= start <= end <= s.length:
            raise ValueError(
                f"kv_rows(seq {seq_id}, {start}, {end}): out of range [0, {s.length}]"
            )
        return self.layout.kv_rows(s.pages, np.arange(start, end, dtype=np.int64))

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

    # -------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Raise AssertionError (with a precise message) unless the table is consistent."""
        n, pr = self._n, self._pr
        kind, oid = self._owner_kind, self._owner_id

        def fail(msg: str) -> None:
            raise AssertionError(f"PageTable invariant violated: {msg}")

        if not 0 <= self._free_count <= n:
            fail(f"free_count {self._free_count} outside [0, {n}]")

        free = self._free_stack[: self._free_count].astype(np.int64)
        seq_list = list(self._seqs.items())
        held = list(self._held.items())

        def flat(items, pages_of):
            if not items:
                return np.empty(0, np.int64), np.empty(0, np.int64)
            pages = np.concatenate([pages_of(x) for _, x in items]).astype(np.int64)
            owner = np.repeat(np.array([k for k, _ in items], np.int64), [len(pages_of(x)) for _, x in items])
            return pages, owner

        kv_pages, kv_owner = flat(seq_list, lambda s: s.pages)
        ad_pages, ad_owner = flat(held, lambda p: p)

        for label, arr in (("free list", free), ("KV", kv_pages), ("adapter", ad_pages)):
            oob = arr[(arr < 0) | (arr >= n)]
            if oob.size:
                fail(f"{label} page indices out of range [0, {n}): {oob[:8].tolist()}")

        free_c = np.bincount(free, minlength=n)
        kv_c = np.bincount(kv_pages, minlength=n)
        ad_c = np.bincount(ad_pages, minlength=n)
        bad = np.flatnonzero(free_c + kv_c + ad_c != 1)
        if bad.size:
            details = [f"page {p}: {free_c[p]}x in free list, {kv_c[p]}x KV "
                       f"(seqs {sorted(set(kv_owner[kv_pages == p].tolist()))}), {ad_c[p]}x adapter "
                       f"(holders {sorted(set(ad_owner[ad_pages == p].tolist()))})" for p in bad[:8].tolist()]
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
        for sid, s in seq_list:
            if s.length < 0 or s.n != cdiv(s.length, pr):
                fail(f"seq {sid}: {s.n} pages for {s.length} tokens, expected "
                     f"{cdiv(s.length, pr)} (page_rows {pr})")

    def held_pages(self, holder: int) -> np.ndarray:
        return _readonly(self._held[holder])

    def holders(self) -> list:
        return list(self._held)
