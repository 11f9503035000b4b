"""Host page table of the unified pool: free-page accounting and the KV pages of each sequence.

The geometry (which pool rows a page owns) is `PoolLayout`'s (memory/layout.py).
A page is either

* **KV** of one sequence: ``page_rows`` consecutive tokens of it, private and
  writable, or
* a **block**: a full KV page whose tokens are final, registered as a cached
  prefix block by the pool cache (memory/cache.py). It is read-only; any
  number of sequences may list it among their first pages (its refcount), and
  with refcount 0 it stays in the pool, idle, until the cache evicts it, or
* **adapter** rows of one resident adapter, held for the pool cache, or
* **free**.

The page table keeps the refcounts (it knows every sequence's pages); the
pool cache owns everything else about blocks and adapters (keys, LRU order,
eviction). The page table tells it when a block's refcount leaves or reaches
0, and asks it for room when a sequence needs more pages than are free;
nobody else evicts. Errors are raised before any state is changed.

Everything is numpy; per-page and per-token work is vectorised, Python loops
run only over sequences or page holders.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import numpy as np

from .layout import PoolLayout, cdiv

__all__ = ["OutOfPages", "PageTable", "Reclaimer", "FREE", "KV", "ADAPTER", "BLOCK"]

FREE = 0
KV = 1
ADAPTER = 2
BLOCK = 3


_NO_PAGES = np.empty(0, dtype=np.int32)
_NO_PAGES.flags.writeable = False

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
            f"{self.free} free, {self.evictable} evictable (idle adapters and cached prefix blocks)"
        )


class Reclaimer(Protocol):
    """What the page table asks for room: the owner of evictable pages."""

    def evictable_pages(self) -> int: ...

    def make_room(self, n_pages: int) -> None: ...

    def blocks_idle(self, pages: np.ndarray) -> None:
        """These blocks' refcounts reached 0 (evictable now), least valuable first."""

    def blocks_taken(self, pages: np.ndarray) -> None:
        """These idle blocks are in use again (refcount 0 -> 1)."""


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


class _Seq:
    __slots__ = ("buf", "n", "length")

    def __init__(self, capacity: int = 4) -> None:
        self.buf = np.empty(max(4, capacity), dtype=np.int32)
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
        self._refs = np.zeros(n, dtype=np.int32)  # sequences listing the page (1 for private KV)
        # Free stack: the top is at _free_count - 1; popping first yields low pages.
        self._free_stack = np.arange(n - 1, -1, -1, dtype=np.int32)
        self._free_count = n
        self._kv_count = 0  # private KV pages
        self._block_count = 0  # cached prefix blocks, in use or idle
        self._idle_blocks = 0  # blocks no sequence lists (evictable)
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
        """Private KV pages (blocks not included)."""
        return self._kv_count

    @property
    def block_count(self) -> int:
        """Cached prefix blocks, shared by running sequences or idle."""
        return self._block_count

    @property
    def idle_block_count(self) -> int:
        """Blocks with refcount 0: kept only as cache, evictable."""
        return self._idle_blocks

    @property
    def adapter_count(self) -> int:
        return self._n - self._free_count - self._kv_count - self._block_count

    def evictable_pages(self) -> int:
        return self._reclaimer.evictable_pages() if self._reclaimer is not None else 0

    @property
    def owner_kind(self) -> np.ndarray:
        """Read-only int8 [N]: 0 free, 1 KV, 2 adapter, 3 block."""
        return _readonly(self._owner_kind)

    @property
    def owner_id(self) -> np.ndarray:
        """Read-only int64 [N]: seq id (KV), holder id (adapter), -1 (free, block)."""
        return _readonly(self._owner_id)

    @property
    def refcount(self) -> np.ndarray:
        """Read-only int32 [N]: sequences listing the page (1 for private KV, any for a block, else 0)."""
        return _readonly(self._refs)

    def free_list(self) -> np.ndarray:
        """Copy of the free stack, bottom first (the next pages handed out are at the end)."""
        return self._free_stack[: self._free_count].copy()

    def stats(self) -> dict:
        return {
            "pages_total": self._n,
            "page_rows": self._pr,
            "pages_free": self._free_count,
            # pages running sequences use (private, and blocks they share); idle blocks are only cache
            "pages_kv": self._kv_count + self._block_count - self._idle_blocks,
            "pages_cached": self._idle_blocks,
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
        self._refs[pages] = 0

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
        s = self._seqs.get(seq_id) if type(seq_id) is int else None
        if s is not None and s.length <= new_len <= s.n * self._pr and type(new_len) is int:
            s.length = new_len  # the common step: room left in its last page (every check below passes)
            return _NO_PAGES
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
            self._refs[new] = 1
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
        """Free the private pages of ``seq_id`` and drop its references to blocks (KeyError if unknown).

        Blocks no sequence lists any more stay in the pool; the reclaimer hears of them, last page first
        (a chain's tail is worth less than its head: the cache evicts it first)."""
        s = self._seqs.pop(seq_id)
        if not s.n:
            return
        pages = s.pages
        shared = self._owner_kind[pages] == BLOCK
        own = pages[~shared]
        if own.size:
            self._push(own)
            self._kv_count -= own.size
        blocks = pages[shared]
        if blocks.size:
            self._refs[blocks] -= 1
            idle = blocks[self._refs[blocks] == 0]
            if idle.size:
                self._idle_blocks += idle.size
                self._reclaimer.blocks_idle(idle[::-1].copy())

    # ------------------------------------------------------------ prefix blocks
    def share(self, seq_id: int, pages: np.ndarray) -> None:
        """Start ``seq_id`` with the cached blocks ``pages`` as its first pages (read-only, refcounts + 1).
        ValueError (nothing changed) if it exists or a page is not a block."""
        seq_id = self._check_seq_id(seq_id)
        pages = np.asarray(pages, dtype=np.int32)
        if seq_id in self._seqs:
            raise ValueError(f"share: seq {seq_id} already has pages")
        if pages.size and ((self._owner_kind[pages] != BLOCK).any() or np.unique(pages).size != pages.size):
            raise ValueError(f"share(seq {seq_id}): pages {pages.tolist()} are not distinct cached blocks")
        s = self._seqs[seq_id] = _Seq(2 * pages.size)
        s.buf[: pages.size] = pages
        s.n, s.length = pages.size, pages.size * self._pr
        if pages.size:
            taken = pages[self._refs[pages] == 0]
            self._refs[pages] += 1
            if taken.size:
                self._idle_blocks -= taken.size
                self._reclaimer.blocks_taken(taken)

    def seal(self, seq_id: int, index: np.ndarray) -> np.ndarray:
        """The pages at positions ``index`` of ``seq_id`` (private, full: their tokens are final) become
        cached blocks: read-only from now on, still listed by the sequence. Returns them.
        ValueError (nothing changed) if one is not a full private page of it."""
        s = self._seqs[seq_id]
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= s.length // self._pr):
            raise ValueError(f"seal(seq {seq_id}, {index.tolist()}): only its {s.length // self._pr} full pages")
        pages = s.pages[index]
        if (self._owner_kind[pages] != KV).any():
            raise ValueError(f"seal(seq {seq_id}): pages {pages.tolist()} are not all private KV")
        self._owner_kind[pages] = BLOCK
        self._owner_id[pages] = -1
        self._kv_count -= pages.size
        self._block_count += pages.size
        return _readonly(pages)

    def drop_blocks(self, pages: np.ndarray) -> None:
        """Free idle blocks (the cache evicts them). ValueError (nothing changed) if one is in use."""
        pages = np.asarray(pages, dtype=np.int32)
        if (self._owner_kind[pages] != BLOCK).any() or self._refs[pages].any():
            raise ValueError(f"drop_blocks: pages {pages.tolist()} are not all idle blocks")
        self._push(pages)
        self._block_count -= pages.size
        self._idle_blocks -= pages.size

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

    def batch_write_rows(self, seq_ids: Sequence[int], tables: np.ndarray, seq_of: np.ndarray,
                         positions: np.ndarray) -> np.ndarray:
        """`kv_rows` of the positions a step writes, all at once (numpy over its tokens): token j is position
        `positions[j]` of sequence `seq_ids[seq_of[j]]`, whose `block_table` row is `tables[seq_of[j]]`.
        ValueError if a position is past its sequence or lies in a block (blocks are read-only)."""
        positions = np.asarray(positions, dtype=np.int64)
        lengths = np.fromiter((self._seqs[s].length for s in seq_ids), np.int64, len(seq_ids))
        if ((positions < 0) | (positions >= lengths[seq_of])).any():
            raise ValueError(f"batch_write_rows: a position of {positions.tolist()} lies past its sequence")
        pages = tables[seq_of, positions // self._pr]
        if (self._owner_kind[pages] != KV).any():
            raise ValueError(f"batch_write_rows: a position of {positions.tolist()} lies in a shared prefix block")
        return (pages.astype(np.int64) * self._pr + positions % self._pr).astype(np.int32)

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

        kv_pages, kv_owner = flat(seq_list, lambda s: s.pages)  # every sequence's pages, blocks included
        ad_pages, ad_owner = flat(held, lambda p: p)

        for label, arr in (("free list", free), ("KV", kv_pages), ("adapter", ad_pages)):
            oob = arr[(arr < 0) | (arr >= n)]
            if oob.size:
                fail(f"{label} page indices out of range [0, {n}): {oob[:8].tolist()}")

        blocks = kind == BLOCK
        free_c = np.bincount(free, minlength=n)
        kv_c = np.bincount(kv_pages, minlength=n)
        ad_c = np.bincount(ad_pages, minlength=n)
        # a block is owned by the cache whoever lists it; any other page by exactly one of free list,
        # sequence, adapter
        bad = np.flatnonzero(free_c + ad_c + np.where(blocks, 1, kv_c) != 1)
        if bad.size:
            details = [f"page {p}: {free_c[p]}x in free list, {kv_c[p]}x KV "
                       f"(seqs {sorted(set(kv_owner[kv_pages == p].tolist()))}), {ad_c[p]}x adapter "
                       f"(holders {sorted(set(ad_owner[ad_pages == p].tolist()))}), block {bool(blocks[p])}"
                       for p in bad[:8].tolist()]
            fail(f"{bad.size} page(s) not owned exactly once: " + "; ".join(details))
        bad = np.flatnonzero(self._refs != kv_c)
        if bad.size:
            fail(f"refcounts {self._refs[bad[:8]].tolist()} of pages {bad[:8].tolist()} != the "
                 f"{kv_c[bad[:8]].tolist()} sequences listing them")
        if kv_pages.size and np.unique(kv_owner * n + kv_pages).size != kv_pages.size:
            fail("a sequence lists a page twice")

        exp_kind = np.zeros(n, dtype=np.int8)
        exp_kind[kv_pages] = KV
        exp_kind[ad_pages] = ADAPTER
        exp_kind[blocks] = BLOCK
        exp_id = np.full(n, -1, dtype=np.int64)
        exp_id[kv_pages] = kv_owner
        exp_id[ad_pages] = ad_owner
        exp_id[blocks] = -1
        bad = np.flatnonzero(exp_kind != kind)
        if bad.size:
            fail(f"owner_kind disagrees at pages {bad[:8].tolist()}: has "
                 f"{kind[bad[:8]].tolist()}, expected {exp_kind[bad[:8]].tolist()}")
        bad = np.flatnonzero(exp_id != oid)
        if bad.size:
            fail(f"owner_id disagrees at pages {bad[:8].tolist()}: has "
                 f"{oid[bad[:8]].tolist()}, expected {exp_id[bad[:8]].tolist()}")
        counts = {"free_count": (self._free_count, np.count_nonzero(kind == FREE)),
                  "kv_count": (self._kv_count, np.count_nonzero(kind == KV)),
                  "block_count": (self._block_count, np.count_nonzero(blocks)),
                  "idle blocks": (self._idle_blocks, np.count_nonzero(blocks & (self._refs == 0)))}
        for label, (have, want) in counts.items():
            if have != int(want):
                fail(f"{label} {have} != {int(want)} pages of that kind")
        for sid, s in seq_list:
            if s.length < 0 or s.n != cdiv(s.length, pr):
                fail(f"seq {sid}: {s.n} pages for {s.length} tokens, expected "
                     f"{cdiv(s.length, pr)} (page_rows {pr})")
            at = np.flatnonzero(blocks[s.pages])
            if at.size and at.max() >= s.length // pr:
                fail(f"seq {sid}: block {s.pages[at.max()]} at page {at.max()} is not full "
                     f"({s.length} tokens): it could be written")

    def held_pages(self, holder: int) -> np.ndarray:
        return _readonly(self._held[holder])

    def holders(self) -> list:
        return list(self._held)
