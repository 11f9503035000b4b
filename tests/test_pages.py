"""The host page table (memory/pages.py) and the pool cache (memory/cache.py: adapters, prefix blocks) over it."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from slora_jax.config import LORA_MODULES
from slora_jax.memory import cache as cache_mod
from slora_jax.memory.cache import CacheFull, PoolCache, chain_keys
from slora_jax.memory.layout import PoolLayout, cdiv
from slora_jax.memory.pages import ADAPTER, BLOCK, FREE, KV, OutOfPages, PageTable

MODULE_ROWS = tuple((1, 1) for _ in LORA_MODULES)  # one pool row per A^T row and per B row


def make_layout(num_pages, page_rows, pages_per_seq=1):
    return PoolLayout(num_layers=1, num_pages=num_pages, page_rows=page_rows, row_width=4,
                      pages_per_seq=pages_per_seq, module_rows=MODULE_ROWS)


def table(num_pages, page_rows):
    return PageTable(make_layout(num_pages, page_rows))


class FakeEntry:
    def __init__(self, n_rows):
        self.n_rows = n_rows
        self.ranks = {"q_proj": n_rows // 2} if n_rows >= 2 else {}
        self.buffer = n_rows


class FakeStore(dict):
    """name -> FakeEntry: the part of AdapterStore the cache reads."""

    def get(self, name):
        return self[name]


class FakePool:
    """Records which pool rows each swap-in wrote (no device)."""

    class array:
        sharding = None

    def __init__(self):
        self.writes = []

    def write_rows(self, rows, data):
        self.writes.append((np.asarray(rows).copy(), data))


@pytest.fixture(autouse=True)
def _no_device(monkeypatch):
    monkeypatch.setattr(cache_mod, "to_device", lambda buffer, sharding: buffer)


def make_cache(num_pages, page_rows, adapters: dict, capacity=8):
    """(page table, cache) over a fake pool; adapters: name -> n_rows."""
    pt = table(num_pages, page_rows)
    store = FakeStore({n: FakeEntry(r) for n, r in adapters.items()})
    return pt, PoolCache(pt.layout, store, pt, FakePool(), max_rank=8, capacity=capacity)


def write_rows(pt, spans):
    """PageTable.batch_write_rows of one step writing positions [start, end) of each (seq, start, end)."""
    sids = [s for s, _, _ in spans]
    tables = pt.block_table(sids, max([len(pt.seq_pages(s)) for s in sids] + [1]))
    seq_of = np.concatenate([np.full(e - b, i) for i, (_, b, e) in enumerate(spans)]).astype(np.int64)
    positions = np.concatenate([np.arange(b, e) for _, b, e in spans]).astype(np.int64)
    return pt.batch_write_rows(sids, tables, seq_of, positions)


# --------------------------------------------------------------------------- unit tests
def test_kv_rows_page_rows_1():
    pt = table(8, 1)
    assert pt.extend(0, 3).tolist() == [0, 1, 2]
    assert pt.extend(1, 2).tolist() == [3, 4]
    assert pt.pages_needed(0, 5) == 2
    assert pt.extend(0, 5).tolist() == [5, 6]
    assert pt.seq_pages(0).tolist() == [0, 1, 2, 5, 6]
    assert pt.kv_rows(0, 0, 5).tolist() == [0, 1, 2, 5, 6]
    assert pt.kv_rows(0, 3, 5).tolist() == [5, 6]
    assert pt.kv_rows(1, 0, 2).tolist() == [3, 4]
    assert pt.kv_rows(0, 2, 2).tolist() == []
    assert pt.kv_rows(0, 0, 5).dtype == np.int32
    assert pt.layout.v_row_offset == 8 and pt.layout.pool_rows == 16
    pt.free_seq(1)
    assert pt.free_count == 8 - 5
    assert pt.extend(2, 2).tolist() == [3, 4]  # freed pages are reused in their order
    pt.check_invariants()


def test_kv_rows_page_rows_4():
    pt = table(6, 4)
    assert pt.extend(0, 6).tolist() == [0, 1]
    assert pt.extend(1, 3).tolist() == [2]
    assert pt.pages_needed(0, 8) == 0
    assert pt.extend(0, 8).tolist() == []
    assert pt.pages_needed(0, 9) == 1
    assert pt.pages_needed(99, 9) == 3  # unknown sequence: from scratch
    assert pt.extend(0, 9).tolist() == [3]
    assert pt.seq_len(0) == 9
    assert pt.kv_rows(0, 0, 9).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12]
    assert pt.kv_rows(0, 5, 9).tolist() == [5, 6, 7, 12]
    assert pt.kv_rows(1, 0, 3).tolist() == [8, 9, 10]
    assert pt.layout.v_row_offset == 24
    bt = pt.block_table([0, 1], 4)
    assert bt.dtype == np.int32
    assert bt.tolist() == [[0, 1, 3, 0], [2, 0, 0, 0]]
    with pytest.raises(ValueError):
        pt.block_table([0], 2)
    with pytest.raises(ValueError):
        pt.kv_rows(0, 0, 10)
    with pytest.raises(ValueError):
        pt.extend(0, 5)  # shrinking is not supported
    assert pt.kv_count == 4 and pt.free_count == 2 and pt.adapter_count == 0
    pt.check_invariants()


def test_new_seq_empty():
    pt = table(2, 4)
    assert pt.extend(7, 0).tolist() == []
    assert pt.seq_len(7) == 0 and pt.seq_pages(7).tolist() == []
    assert pt.block_table([7], 3).tolist() == [[0, 0, 0]]
    pt.check_invariants()
    pt.free_seq(7)
    assert not pt.has_seq(7)


def test_adapter_rows_layout():
    pt, c = make_cache(5, 2, {"a": 7})  # N=5, pr=2: V blocks start at row 10
    pt.extend(0, 2)  # page 0
    c.acquire("a")  # ceil(7 / 4) = 2 pages
    assert c.adapter_pages("a").tolist() == [1, 2]
    # page 1: K rows 2,3 then V rows (5+1)*2 = 12,13; page 2: K rows 4,5 then V row 14
    rows = pt.layout.adapter_pool_rows(c.adapter_pages("a"), 7)
    assert rows.tolist() == [2, 3, 12, 13, 4, 5, 14] and rows.dtype == np.int32
    assert c.pool.writes[-1][0].tolist() == rows.tolist()
    assert pt.adapter_count == 2
    assert pt.owner_kind.tolist() == [KV, ADAPTER, ADAPTER, FREE, FREE]
    pt.check_invariants()
    c.check_invariants()


def _snapshot(pt: PageTable, c: PoolCache):
    return (pt.owner_kind.tolist(), pt.owner_id.tolist(), pt.free_list().tolist(),
            {s: (pt.seq_pages(s).tolist(), pt.seq_len(s)) for s in pt.seq_ids()},
            {a: (c.adapter_pages(a).tolist(), c.refcount(a), c.index_of(a)) for a in c.resident()},
            c.resident(), pt.stats(), c.stats(), c.tables.ranks.tolist(), pt.refcount.tolist(), list(c._lru))


def test_out_of_pages_message_and_no_change():
    pt, c = make_cache(4, 1, {"a": 2, "b": 6})
    pt.extend(0, 2)
    c.acquire("a")  # one page (2 rows per page)
    c.release("a")
    before = _snapshot(pt, c)
    with pytest.raises(OutOfPages) as ei:
        pt.extend(1, 3)
    e = ei.value
    assert (e.needed, e.free, e.evictable) == (3, 1, 1)
    assert "needed 3 pages" in str(e) and "1 free" in str(e) and "1 evictable" in str(e)
    assert isinstance(e, RuntimeError)
    assert _snapshot(pt, c) == before and not pt.has_seq(1)
    with pytest.raises(OutOfPages, match="needed 3 pages, 1 free, 1 evictable"):
        c.acquire("b")
    assert _snapshot(pt, c) == before and c.is_resident("a")
    pt.check_invariants()
    c.check_invariants()


def test_kv_allocation_evicts_idle_adapters_and_frees_their_entries():
    """The bug this design fixes: evicting pages for KV must also free the adapter's table entry."""
    pt, c = make_cache(4, 1, {"a": 2, "b": 2}, capacity=2)
    c.acquire("a"), c.release("a")
    c.acquire("b"), c.release("b")
    pt.extend(0, 3)  # 2 free + 1 evicted ("a", the LRU)
    assert c.resident() == ["b"] and c.stats()["swaps_out"] == 1
    assert c.stats()["swaps_in"] - c.stats()["swaps_out"] == len(c.resident())
    assert not c.tables.ranks[c._free_entries].any()
    pt.check_invariants()
    c.check_invariants()


def test_evict_in_use_refused():
    pt, c = make_cache(4, 2, {"a": 3, "b": 16})
    c.acquire("a")
    with pytest.raises(RuntimeError, match="in use"):
        c.evict("a")
    assert c.is_resident("a") and c.evictable_pages() == 0
    with pytest.raises(OutOfPages):
        c.acquire("b")  # would need "a"'s page too
    c.release("a")
    with pytest.raises(RuntimeError):
        c.release("a")
    assert c.evictable_pages() == 1
    c.evict("a")
    assert not c.is_resident("a") and pt.free_count == 4
    with pytest.raises(KeyError):
        c.evict("a")
    with pytest.raises(KeyError):
        c.acquire("nope")
    c.check_invariants()


def test_lru_order():
    pt, c = make_cache(3, 1, {n: 2 for n in "abcde"})
    for n in "abc":
        c.acquire(n), c.release(n)
    assert c.resident() == ["a", "b", "c"]
    c.acquire("a"), c.release("a")
    assert c.resident() == ["b", "c", "a"]
    c.acquire("d"), c.release("d")
    assert c.resident() == ["c", "a", "d"]  # "b" was evicted
    c.acquire("c")  # in use: skipped by eviction
    c.acquire("e")
    assert c.resident() == ["d", "c", "e"]  # "a" was evicted
    c.make_room(1)  # all 3 pages held: the idle "d" goes
    assert c.resident() == ["c", "e"] and pt.free_count == 1
    c.make_room(1)  # already enough free
    assert c.resident() == ["c", "e"]
    c.release("e")
    c.make_room(3)
    assert c.resident() == ["c"] and pt.free_count == 2  # "c" is in use: stops short
    assert c.stats()["swaps_out"] == 4
    c.check_invariants()


def test_table_entries_are_bounded_and_reused():
    pt, c = make_cache(50, 1, {f"a{i}": 2 for i in range(10)}, capacity=3)
    for i in range(3):
        c.acquire(f"a{i}")
    assert not c.can_take("a3")
    with pytest.raises(CacheFull, match="all 3 adapter table entries"):
        c.acquire("a3")  # pages are free, table entries are not
    c.release("a1")
    assert c.can_take("a3")
    c.acquire("a3")  # evicts the idle "a1" for its entry
    assert sorted(c.resident()) == ["a0", "a2", "a3"] and c.index_of("a3") == 1
    assert len(c.tables.ranks) == 3  # the tables never grow
    c.check_invariants()


def test_check_invariants_detects_corruption():
    def fresh():
        pt, c = make_cache(6, 2, {"a": 5})
        pt.extend(0, 3)
        c.acquire("a")
        pt.check_invariants()
        c.check_invariants()
        return pt, c

    pt, c = fresh()
    pt._owner_kind[pt.free_list()[0]] = KV
    with pytest.raises(AssertionError, match="owner_kind"):
        pt.check_invariants()
    pt, c = fresh()
    pt._free_stack[pt._free_count - 1] = pt._free_stack[0]  # duplicate in free list
    with pytest.raises(AssertionError, match="exactly once"):
        pt.check_invariants()
    pt, c = fresh()
    pt._seqs[0].length = 5  # 2 pages can't hold 5 tokens at page_rows 2
    with pytest.raises(AssertionError, match="seq 0"):
        pt.check_invariants()
    pt, c = fresh()
    c._resident["a"].refcount = -1
    with pytest.raises(AssertionError, match="refcount"):
        c.check_invariants()
    pt, c = fresh()
    c._free_entries.append(c.index_of("a"))
    with pytest.raises(AssertionError, match="entries"):
        c.check_invariants()
    pt, c = fresh()
    c.swaps_out += 1  # a swap-out counted without its eviction (the old leak's symptom)
    with pytest.raises(AssertionError, match="swaps_in"):
        c.check_invariants()


def test_blocks_shared_read_only_and_evicted_with_adapters_in_one_lru():
    pt, c = make_cache(8, 2, {"a": 4})
    keys = chain_keys(b"x" * 16, np.arange(7), 2)  # 3 full pages
    pt.extend(0, 7)  # pages 0..3
    assert c.register(0, 0, keys) == 3 and pt.owner_kind.tolist()[:4] == [BLOCK, BLOCK, BLOCK, KV]
    with pytest.raises(ValueError, match="shared prefix block"):
        write_rows(pt, [(0, 5, 7)])  # position 5 lies in page 2, a block
    assert write_rows(pt, [(0, 6, 7)]).tolist() == [6]
    with pytest.raises(ValueError, match="past its sequence"):
        write_rows(pt, [(0, 6, 8)])
    assert c.match(keys).tolist() == [0, 1, 2] and c.match(chain_keys(b"w" * 16, np.arange(7), 2)).tolist() == []
    pt.share(1, c.match(keys[:2]))
    assert pt.refcount.tolist()[:4] == [2, 2, 1, 1] and pt.stats()["pages_kv"] == 4
    pt.extend(1, 5)  # its own page after the shared ones
    assert pt.seq_pages(1).tolist() == [0, 1, 4]
    c.acquire("a"), c.release("a")  # 1 page, idle
    pt.free_seq(0)  # page 2 idle now; 0 and 1 still shared by seq 1
    assert list(c._lru) == [("adapter", "a"), ("block", 2)] and c.evictable_pages() == 2
    pt.free_seq(1)  # its blocks go idle tail first
    assert list(c._lru) == [("adapter", "a"), ("block", 2), ("block", 1), ("block", 0)]
    assert pt.stats()["pages_cached"] == 3 and pt.stats()["pages_kv"] == 0
    pt.extend(2, 2 * 7)  # 7 pages: 4 free + the adapter + blocks 2 and 1, least recently used first
    assert c.resident() == [] and c.match(keys).tolist() == [0]
    pt.check_invariants()
    c.check_invariants()
    pt.free_seq(2)
    c.make_room(8)
    assert pt.free_count == 8 and c.match(keys).tolist() == [] and c.stats()["prefix_blocks"] == 0
    pt.check_invariants()
    c.check_invariants()


def test_register_keeps_the_first_copy_and_an_evicted_middle_block_ends_a_match():
    pt, c = make_cache(10, 1, {})
    keys = chain_keys(b"y" * 16, np.arange(4), 1)
    pt.extend(0, 4)
    pt.extend(1, 4)
    assert c.register(0, 0, keys[:2]) == 2
    assert c.register(1, 0, keys) == 2  # its first two pages hold what seq 0's blocks hold: they stay private
    assert pt.owner_kind[pt.seq_pages(1)].tolist() == [KV, KV, BLOCK, BLOCK]
    assert c.match(keys).tolist() == [0, 1, 6, 7]  # content-addressed: any copy of each page will do
    pt.free_seq(0)
    pt.free_seq(1)
    c.make_room(pt.free_count + 2)  # LRU: seq 0's tail then head go first
    assert c.match(keys).tolist() == [] and c.stats()["prefix_blocks"] == 2  # a lookup stops at the evicted head
    pt.check_invariants()
    c.check_invariants()


def test_block_misuse_is_refused_and_changes_nothing():
    pt, c = make_cache(6, 2, {})
    pt.extend(0, 5)
    before = _snapshot(pt, c)
    with pytest.raises(ValueError, match="full pages"):
        pt.seal(0, [2])  # position 4 is not final: page 2 is not full
    with pytest.raises(ValueError, match="not distinct cached blocks"):
        pt.share(1, pt.seq_pages(0)[:1])  # private KV cannot be shared
    with pytest.raises(ValueError, match="idle blocks"):
        pt.drop_blocks(pt.seq_pages(0)[:1])
    assert _snapshot(pt, c) == before
    c.register(0, 0, chain_keys(b"z" * 16, np.arange(4), 2))
    with pytest.raises(ValueError, match="not all private"):
        pt.seal(0, [0])
    with pytest.raises(ValueError, match="idle blocks"):
        pt.drop_blocks(pt.seq_pages(0)[:1])  # in use by seq 0
    pt._refs[0] = 0  # corruption: a block listed by seq 0 with refcount 0
    with pytest.raises(AssertionError, match="refcounts"):
        pt.check_invariants()


# ----------------------------------------------------------------- state machine
NAMES = ["a0", "a1", "a2", "a3", "a4", "a5"]
DOCS = 2  # sequences hold one of a few token streams, so that prefix keys repeat across them


class CacheMachine(RuleBasedStateMachine):
    """Random KV growth, adapter acquire / release / evict / remove, prefix blocks registered, shared, written
    around and evicted, under a small pool and a small table, against a plain model of what should be
    resident, cached, and in which LRU order."""

    @initialize(n=st.integers(1, 20), pr=st.sampled_from([1, 2, 3, 4]), cap=st.integers(1, 4),
                rows=st.lists(st.integers(1, 12), min_size=len(NAMES), max_size=len(NAMES)))
    def init(self, n, pr, cap, rows):
        self.n, self.pr, self.cap = n, pr, cap
        self.rows = dict(zip(NAMES, rows))
        self.pt, self.c = make_cache(n, pr, self.rows, capacity=cap)
        self.keys = [chain_keys(bytes([d]) * 16, np.arange(60 * pr) % (d + 2), pr) for d in range(DOCS)]
        self.seqs: dict[int, int] = {}  # seq -> length
        self.pages: dict[int, list] = {}  # seq -> its pages
        self.doc: dict[int, int] = {}  # seq -> the token stream it holds
        self.offered: dict[int, int] = {}  # seq -> its leading pages offered to the cache
        self.refs: dict[str, int] = {}  # resident name -> refcount, in LRU order (first = least recent)
        self.blocks: dict[bytes, int] = {}  # key -> page
        self.block_refs: dict[int, int] = {}  # block page -> sequences listing it
        self.lru: dict = {}  # idle adapters and blocks, least recently used first -> pages
        self.version = np.zeros(n, np.int64)  # writes per page
        self.sealed_version: dict[int, int] = {}  # block page -> its version when it became a block
        self.swaps = [0, 0]

    def pages_of(self, name):
        return cdiv(self.rows[name], 2 * self.pr)

    def model_free(self):
        private = sum(len([p for p in ps if p not in self.block_refs]) for ps in self.pages.values())
        return self.n - private - len(self.blocks) - sum(map(self.pages_of, self.refs))

    def model_evict(self, item):
        del self.lru[item]
        kind, x = item
        if kind == "adapter":
            del self.refs[x]
            self.swaps[1] += 1
        else:
            del self.blocks[next(k for k, p in self.blocks.items() if p == x)]
            del self.block_refs[x], self.sealed_version[x]

    def model_match(self, keys):
        out = []
        for k in keys:
            if k not in self.blocks:
                break
            out.append(self.blocks[k])
        return out

    @rule(sid=st.integers(0, 5), delta=st.integers(0, 9), doc=st.integers(0, DOCS - 1))
    def extend(self, sid, delta, doc):
        old = self.seqs.get(sid, 0)
        need = cdiv(old + delta, self.pr) - cdiv(old, self.pr)
        assert self.pt.pages_needed(sid, old + delta) == need
        free, evictable = self.model_free(), sum(self.lru.values())
        if need > free + evictable:
            before = _snapshot(self.pt, self.c)
            with pytest.raises(OutOfPages) as ei:
                self.pt.extend(sid, old + delta)
            assert (ei.value.needed, ei.value.free, ei.value.evictable) == (need, free, evictable)
            assert _snapshot(self.pt, self.c) == before
            return
        for item, k in list(self.lru.items()):  # the least recently used idle things give their pages back
            if free >= need:
                break
            free += k
            self.model_evict(item)
        prefix = self.pt.seq_pages(sid).tolist() if sid in self.seqs else []
        new = self.pt.extend(sid, old + delta)
        assert len(new) == need and self.pt.seq_pages(sid).tolist() == prefix + new.tolist()
        self.seqs[sid] = old + delta
        self.pages[sid] = prefix + new.tolist()
        self.doc.setdefault(sid, doc)
        self.offered.setdefault(sid, 0)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free_seq(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.pt.free_seq(sid)
        for p in reversed(self.pages[sid]):  # idle blocks join the LRU tail first
            if p in self.block_refs:
                self.block_refs[p] -= 1
                if self.block_refs[p] == 0:
                    self.lru[("block", p)] = 1
        for d in (self.seqs, self.pages, self.doc, self.offered):
            del d[sid]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def register(self, data):
        """The scheduler offers a sequence's full pages (their tokens final) to the cache."""
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        first, full = self.offered[sid], self.seqs[sid] // self.pr
        keys = self.keys[self.doc[sid]][first:full]
        expect = 0
        for k, key in enumerate(keys, start=first):
            p = self.pages[sid][k]
            if p not in self.block_refs and key not in self.blocks:
                self.blocks[key], self.block_refs[p], self.sealed_version[p] = p, 1, int(self.version[p])
                expect += 1
        assert self.c.register(sid, first, keys) == expect
        self.offered[sid] = max(first, full)

    @rule(sid=st.integers(0, 7), doc=st.integers(0, DOCS - 1), m=st.integers(0, 12))
    def share(self, sid, doc, m):
        """A new sequence starts with the longest cached prefix of a token stream (admission)."""
        keys = self.keys[doc][:m]
        pages = self.c.match(keys)
        assert pages.tolist() == self.model_match(keys)
        if sid in self.seqs:
            with pytest.raises(ValueError, match="already has pages"):
                self.pt.share(sid, pages)
            return
        self.pt.share(sid, pages)
        for p in pages.tolist():
            if self.block_refs[p] == 0:
                del self.lru[("block", p)]
            self.block_refs[p] += 1
        self.seqs[sid], self.pages[sid] = len(pages) * self.pr, pages.tolist()
        self.doc[sid], self.offered[sid] = doc, len(pages)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def write(self, data):
        """A step writes K/V at some positions of some sequences: never into a block (the batch builder's
        rows come from here)."""
        sids = data.draw(st.lists(st.sampled_from(sorted(self.seqs)), min_size=1, max_size=3, unique=True))
        spans, touched = [], []
        for sid in sids:
            start = data.draw(st.integers(0, self.seqs[sid]))
            end = data.draw(st.integers(start, self.seqs[sid]))
            spans.append((sid, start, end))
            touched += self.pages[sid][start // self.pr: cdiv(end, self.pr)] if end > start else []
        if any(p in self.block_refs for p in touched):
            with pytest.raises(ValueError, match="shared prefix block"):
                write_rows(self.pt, spans)
            return
        rows = write_rows(self.pt, spans)
        assert rows.tolist() == [x for sid, b, e in spans for x in self.pt.kv_rows(sid, b, e).tolist()]
        self.version[rows // self.pr] += 1

    @rule(name=st.sampled_from(NAMES))
    def acquire(self, name):
        if name in self.refs:
            self.c.acquire(name)
            if self.refs[name] == 0:
                del self.lru[("adapter", name)]
            self.refs[name] = self.refs.pop(name) + 1
            return
        need, free, evict = self.pages_of(name), self.model_free(), []
        entry_free = len(self.refs) < self.cap
        for item, k in self.lru.items():
            if free >= need and entry_free:
                break
            if item[0] == "block" and free >= need:
                continue
            evict.append(item)
            free += k
            entry_free = entry_free or item[0] == "adapter"
        if free < need or not entry_free:
            before = _snapshot(self.pt, self.c)
            with pytest.raises(OutOfPages) as ei:
                self.c.acquire(name)
            assert isinstance(ei.value, CacheFull) == (free >= need)
            assert _snapshot(self.pt, self.c) == before
            return
        self.c.acquire(name)
        for item in evict:
            self.model_evict(item)
        self.refs[name] = 1
        self.swaps[0] += 1

    @precondition(lambda self: any(self.refs.values()))
    @rule(data=st.data())
    def release(self, data):
        name = data.draw(st.sampled_from(sorted(n for n, r in self.refs.items() if r)))
        self.c.release(name)
        self.refs[name] = self.refs.pop(name) - 1
        if self.refs[name] == 0:
            self.lru[("adapter", name)] = self.pages_of(name)

    @precondition(lambda self: self.refs)
    @rule(data=st.data(), forget=st.booleans())
    def evict(self, data, forget):
        name = data.draw(st.sampled_from(sorted(self.refs)))
        if self.refs[name]:
            before = _snapshot(self.pt, self.c)
            with pytest.raises(RuntimeError, match="in use"):
                (self.c.forget if forget else self.c.evict)(name)
            assert _snapshot(self.pt, self.c) == before
            return
        (self.c.forget if forget else self.c.evict)(name)
        self.model_evict(("adapter", name))

    @rule(k=st.integers(0, 20))
    def make_room(self, k):
        free = self.model_free()
        for item, n in list(self.lru.items()):
            if free >= k:
                break
            free += n
            self.model_evict(item)
        self.c.make_room(k)

    @invariant()
    def consistent(self):
        pt, c = self.pt, self.c
        pt.check_invariants()
        c.check_invariants()
        assert pt.free_count == self.model_free()
        assert c.evictable_pages() == sum(self.lru.values())
        assert list(c._lru) == list(self.lru)  # one LRU over both kinds, in the model's order
        assert c.resident() == list(self.refs)
        assert {n: c.refcount(n) for n in c.resident()} == self.refs
        assert [c.stats()["swaps_in"], c.stats()["swaps_out"]] == self.swaps
        assert len(c.resident()) <= self.cap
        assert c.stats()["prefix_blocks"] == len(self.blocks)
        refs = pt.refcount
        assert (refs >= 0).all()
        assert {p: int(refs[p]) for p in self.block_refs} == self.block_refs
        assert np.flatnonzero(pt.owner_kind == BLOCK).tolist() == sorted(self.block_refs)
        for p, v in self.sealed_version.items():
            assert self.version[p] == v, f"block {p} was written after it became a block"
        for sid, ps in self.pages.items():
            assert pt.seq_pages(sid).tolist() == ps and pt.seq_len(sid) == self.seqs[sid]
        # every resident adapter's table entry points at exactly the rows its pages hold
        for name in c.resident():
            rows = pt.layout.adapter_pool_rows(c.adapter_pages(name), self.rows[name])
            r = self.rows[name] // 2
            if r:
                j = LORA_MODULES.index("q_proj")
                got = np.concatenate([c.tables.a_rows[j][c.index_of(name), :r, 0],  # r A^T rows, then r B rows
                                      c.tables.b_rows[j][c.index_of(name), :r, 0]])
                assert got.tolist() == rows[: 2 * r].tolist()

    @invariant()
    def rows_disjoint(self):
        """Private KV, each block (once, however many share it) and adapters hold disjoint pool rows."""
        pt, parts = self.pt, []
        pages = {p for ps in self.pages.values() for p in ps} | set(self.block_refs)
        if pages:
            k = pt.layout.kv_rows(np.array(sorted(pages), np.int32), np.arange(len(pages) * self.pr)).astype(np.int64)
            parts += [k, k + pt.layout.v_row_offset]
        for name in self.refs:
            parts.append(pt.layout.adapter_pool_rows(self.c.adapter_pages(name), self.rows[name]).astype(np.int64))
        rows = np.concatenate(parts) if parts else np.empty(0, np.int64)
        assert np.unique(rows).size == rows.size, "rows shared between owners"
        assert rows.size == 0 or (rows.min() >= 0 and rows.max() < pt.layout.pool_rows)

    def teardown(self):
        if not hasattr(self, "pt"):
            return
        for name, r in list(self.refs.items()):
            for _ in range(r):
                self.c.release(name)
            self.c.evict(name)
        for sid in list(self.seqs):
            self.pt.free_seq(sid)
        assert self.pt.free_count + self.pt.idle_block_count == self.n  # no leak: free + cached == total
        self.c.make_room(self.n)
        self.pt.check_invariants()
        self.c.check_invariants()
        assert self.pt.free_count == self.n and self.pt.kv_count == 0 and self.pt.adapter_count == 0
        assert self.pt.block_count == 0 and self.c.stats()["prefix_blocks"] == 0


CacheMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestCacheMachine = CacheMachine.TestCase
