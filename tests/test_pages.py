"""Tests of the host page table (slora_jax/memory/pages.py)."""
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

from slora_jax.memory.pages import ADAPTER, FREE, KV, OutOfPages, PageTable


def cdiv(a, b):
    return -(-a // b)


# --------------------------------------------------------------------------- unit tests
def test_slots_page_rows_1():
    pt = PageTable(8, 1)
    assert pt.extend(0, 3).tolist() == [0, 1, 2]
    assert pt.extend(1, 2).tolist() == [3, 4]
    assert pt.pages_needed(0, 5) == 2
    assert pt.extend(0, 5).tolist() == [5, 6]
    assert pt.seq_pages(0).tolist() == [0, 1, 2, 5, 6]
    assert pt.kv_slots(0, 0, 5).tolist() == [0, 1, 2, 5, 6]
    assert pt.kv_slots(0, 3, 5).tolist() == [5, 6]
    assert pt.kv_slots(1, 0, 2).tolist() == [3, 4]
    assert pt.kv_slots(0, 2, 2).tolist() == []
    assert pt.kv_slots(0, 0, 5).dtype == np.int32
    assert pt.v_row_offset == 8 and pt.pool_rows == 16
    pt.free_seq(1)
    assert pt.free_count == 8 - 5
    assert pt.extend(2, 2).tolist() == [3, 4]  # freed pages are reused in their order
    pt.check_invariants()


def test_slots_page_rows_4():
    pt = PageTable(6, 4)
    assert pt.extend(0, 6).tolist() == [0, 1]
    assert pt.extend(1, 3).tolist() == [2]
    assert pt.pages_needed(0, 8) == 0
    assert pt.extend(0, 8).tolist() == []
    assert pt.pages_needed(0, 9) == 1
    assert pt.pages_needed(99, 9) == 3  # unknown sequence: from scratch
    assert pt.extend(0, 9).tolist() == [3]
    assert pt.seq_len(0) == 9
    assert pt.kv_slots(0, 0, 9).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12]
    assert pt.kv_slots(0, 5, 9).tolist() == [5, 6, 7, 12]
    assert pt.kv_slots(1, 0, 3).tolist() == [8, 9, 10]
    assert pt.v_row_offset == 24
    bt = pt.block_table([0, 1], 4)
    assert bt.dtype == np.int32
    assert bt.tolist() == [[0, 1, 3, 0], [2, 0, 0, 0]]
    with pytest.raises(ValueError):
        pt.block_table([0], 2)
    with pytest.raises(ValueError):
        pt.kv_slots(0, 0, 10)
    with pytest.raises(ValueError):
        pt.extend(0, 5)  # shrinking is not supported
    assert pt.kv_count == 4 and pt.free_count == 2 and pt.adapter_count == 0
    pt.check_invariants()


def test_new_seq_empty():
    pt = PageTable(2, 4)
    assert pt.extend(7, 0).tolist() == []
    assert pt.seq_len(7) == 0 and pt.seq_pages(7).tolist() == []
    assert pt.block_table([7], 3).tolist() == [[0, 0, 0]]
    pt.check_invariants()
    pt.free_seq(7)
    assert not pt.has_seq(7)


def test_adapter_rows_layout():
    pt = PageTable(5, 2)  # N=5, pr=2: V blocks start at row 10
    pt.extend(0, 2)  # page 0
    pages, evicted = pt.load_adapter("a", 7)  # ceil(7 / 4) = 2 pages
    assert pages.tolist() == [1, 2] and evicted == []
    # page 1: K rows 2,3 then V rows (5+1)*2 = 12,13; page 2: K rows 4,5 then V row 14
    assert pt.adapter_rows("a").tolist() == [2, 3, 12, 13, 4, 5, 14]
    assert pt.adapter_rows("a").dtype == np.int32
    assert pt.adapter_count == 2 and pt.adapter_n_rows("a") == 7
    assert pt.owner_kind.tolist() == [KV, ADAPTER, ADAPTER, FREE, FREE]
    pt.check_invariants()


def test_out_of_pages_message_and_no_change():
    pt = PageTable(4, 1)
    pt.extend(0, 2)
    pt.load_adapter("a", 2)  # one page (2 rows per page)
    before = _snapshot(pt)
    with pytest.raises(OutOfPages) as ei:
        pt.extend(1, 3)
    e = ei.value
    assert (e.needed, e.free, e.evictable) == (3, 1, 1)
    assert "needed 3 pages" in str(e) and "1 free" in str(e) and "1 evictable" in str(e)
    assert isinstance(e, RuntimeError)
    assert _snapshot(pt) == before
    assert not pt.has_seq(1)
    with pytest.raises(OutOfPages, match="needed 3 pages, 1 free, 1 evictable"):
        pt.load_adapter("b", 6)
    assert _snapshot(pt) == before and pt.is_resident("a")
    pt.check_invariants()


def test_evict_in_use_refused():
    pt = PageTable(4, 2)
    pt.load_adapter("a", 3)
    assert pt.acquire("a") == 1
    with pytest.raises(RuntimeError, match="in use"):
        pt.evict("a")
    assert pt.is_resident("a") and pt.evictable_pages() == 0
    with pytest.raises(OutOfPages):
        pt.load_adapter("b", 4 * 4)  # would need "a"'s page too
    assert pt.release("a") == 0
    with pytest.raises(RuntimeError):
        pt.release("a")
    assert pt.evictable_pages() == 1
    pt.evict("a")
    assert not pt.is_resident("a") and pt.free_count == 4
    with pytest.raises(KeyError):
        pt.evict("a")
    with pytest.raises(KeyError):
        pt.acquire("a")
    pt.load_adapter("c", 1)
    with pytest.raises(ValueError, match="already resident"):
        pt.load_adapter("c", 1)
    pt.check_invariants()


def test_lru_order():
    pt = PageTable(3, 1)
    for n in "abc":
        assert pt.load_adapter(n, 2).evicted == []
    assert pt.resident_adapters() == ["a", "b", "c"]
    pt.acquire("a")
    pt.release("a")
    assert pt.resident_adapters() == ["b", "c", "a"]
    assert pt.load_adapter("d", 2).evicted == ["b"]
    pt.acquire("c")  # in use: skipped by eviction
    assert pt.resident_adapters() == ["a", "d", "c"]
    assert pt.load_adapter("e", 2).evicted == ["a"]
    assert pt.resident_adapters() == ["d", "c", "e"]
    pt.touch("d")
    assert pt.evict_for(1) == ["e"]
    assert pt.evict_for(1) == []  # already enough free
    assert pt.evict_for(3) == ["d"]  # "c" is in use: stops short
    assert pt.free_count == 2 and pt.resident_adapters() == ["c"]
    # multi-page: evicts only as many as needed, LRU first
    pt.release("c")
    pt.evict("c")
    pt.load_adapter("x", 2)
    pt.load_adapter("y", 2)
    pt.load_adapter("z", 2)
    assert pt.load_adapter("w", 4).evicted == ["x", "y"]
    assert pt.stats()["swaps_out"] == 7
    pt.check_invariants()


def test_check_invariants_detects_corruption():
    def fresh():
        pt = PageTable(6, 2)
        pt.extend(0, 3)
        pt.load_adapter("a", 5)
        pt.check_invariants()
        return pt

    pt = fresh()
    pt._owner_kind[pt.free_list()[0]] = KV
    with pytest.raises(AssertionError, match="owner_kind"):
        pt.check_invariants()
    pt = fresh()
    pt._free_stack[pt._free_count - 1] = pt._free_stack[0]  # duplicate in free list
    with pytest.raises(AssertionError, match="exactly once"):
        pt.check_invariants()
    pt = fresh()
    pt._seqs[0].length = 5  # 2 pages can't hold 5 tokens at page_rows 2
    with pytest.raises(AssertionError, match="seq 0"):
        pt.check_invariants()
    pt = fresh()
    pt._refcount["a"] = -1
    with pytest.raises(AssertionError, match="negative"):
        pt.check_invariants()
    pt = fresh()
    pt._adapters["a"].pages = pt.seq_pages(0).copy()  # shares pages with seq 0
    with pytest.raises(AssertionError, match="exactly once"):
        pt.check_invariants()


def _snapshot(pt: PageTable):
    return (
        pt.owner_kind.tolist(),
        pt.owner_id.tolist(),
        pt.free_list().tolist(),
        {s: (pt.seq_pages(s).tolist(), pt.seq_len(s)) for s in pt.seq_ids()},
        {a: (pt.adapter_pages(a).tolist(), pt.adapter_n_rows(a), pt.refcount(a))
         for a in pt.resident_adapters()},
        pt.resident_adapters(),
        pt.stats(),
    )


# ----------------------------------------------------------------- state machine
NAMES = ["a0", "a1", "a2", "a3", "a4", "a5"]


class PageTableMachine(RuleBasedStateMachine):
    @initialize(n=st.integers(1, 20), pr=st.sampled_from([1, 2, 3, 4]))
    def init(self, n, pr):
        self.n, self.pr = n, pr
        self.pt = PageTable(n, pr)
        self.seqs: dict[int, int] = {}  # seq -> length
        self.ads: dict[str, list] = {}  # name -> [n_rows, refcount]
        self.lru: list[str] = []  # least recently used first

    # -- model helpers
    def model_free(self):
        kv = sum(cdiv(l, self.pr) for l in self.seqs.values())
        ad = sum(cdiv(r, 2 * self.pr) for r, _ in self.ads.values())
        return self.n - kv - ad

    def model_evictable(self):
        return sum(cdiv(r, 2 * self.pr) for r, c in self.ads.values() if c == 0)

    def model_evict(self, name):
        del self.ads[name]
        self.lru.remove(name)

    def touch(self, name):
        self.lru.remove(name)
        self.lru.append(name)

    # -- rules
    @rule(sid=st.integers(0, 5), delta=st.integers(0, 9))
    def extend(self, sid, delta):
        old = self.seqs.get(sid, 0)
        new_len = old + delta
        need = cdiv(new_len, self.pr) - cdiv(old, self.pr)
        assert self.pt.pages_needed(sid, new_len) == need
        free = self.model_free()
        if need > free:
            before = _snapshot(self.pt)
            with pytest.raises(OutOfPages) as ei:
                self.pt.extend(sid, new_len)
            assert (ei.value.needed, ei.value.free) == (need, free)
            assert ei.value.evictable == self.model_evictable()
            assert _snapshot(self.pt) == before
            return
        prefix = self.pt.seq_pages(sid).tolist() if sid in self.seqs else []
        new = self.pt.extend(sid, new_len)
        assert len(new) == need
        assert self.pt.seq_pages(sid).tolist() == prefix + new.tolist()
        self.seqs[sid] = new_len

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free_seq(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.pt.free_seq(sid)
        del self.seqs[sid]

    @rule(name=st.sampled_from(NAMES), n_rows=st.integers(1, 12))
    def load_adapter(self, name, n_rows):
        before = _snapshot(self.pt)
        if name in self.ads:
            with pytest.raises(ValueError):
                self.pt.load_adapter(name, n_rows)
            assert _snapshot(self.pt) == before
            return
        need = cdiv(n_rows, 2 * self.pr)
        avail, expect = self.model_free(), []
        for nm in self.lru:
            if avail >= need:
                break
            if self.ads[nm][1] == 0:
                expect.append(nm)
                avail += cdiv(self.ads[nm][0], 2 * self.pr)
        if avail < need:
            with pytest.raises(OutOfPages) as ei:
                self.pt.load_adapter(name, n_rows)
            assert ei.value.needed == need
            assert ei.value.free == self.model_free()
            assert ei.value.evictable == self.model_evictable()
            assert _snapshot(self.pt) == before
            return
        pages, evicted = self.pt.load_adapter(name, n_rows)
        assert evicted == expect
        assert len(pages) == need
        for nm in evicted:
            self.model_evict(nm)
        self.ads[name] = [n_rows, 0]
        self.lru.append(name)

    @precondition(lambda self: self.ads)
    @rule(data=st.data())
    def acquire(self, data):
        name = data.draw(st.sampled_from(sorted(self.ads)))
        assert self.pt.acquire(name) == self.ads[name][1] + 1
        self.ads[name][1] += 1
        self.touch(name)

    @precondition(lambda self: any(c > 0 for _, c in self.ads.values()))
    @rule(data=st.data())
    def release(self, data):
        name = data.draw(st.sampled_from(sorted(n for n, (_, c) in self.ads.items() if c > 0)))
        assert self.pt.release(name) == self.ads[name][1] - 1
        self.ads[name][1] -= 1
        self.touch(name)

    @precondition(lambda self: self.ads)
    @rule(data=st.data())
    def evict(self, data):
        name = data.draw(st.sampled_from(sorted(self.ads)))
        if self.ads[name][1] > 0:
            before = _snapshot(self.pt)
            with pytest.raises(RuntimeError, match="in use"):
                self.pt.evict(name)
            assert _snapshot(self.pt) == before
        else:
            self.pt.evict(name)
            self.model_evict(name)

    @rule(k=st.integers(0, 22))
    def evict_for(self, k):
        free, expect = self.model_free(), []
        if free < k:
            for nm in list(self.lru):
                if self.ads[nm][1] == 0:
                    expect.append(nm)
                    free += cdiv(self.ads[nm][0], 2 * self.pr)
                    if free >= k:
                        break
        assert self.pt.evict_for(k) == expect
        for nm in expect:
            self.model_evict(nm)

    @rule()
    def drain(self):
        self._drain()

    def _drain(self):
        for name, (_, c) in list(self.ads.items()):
            for _ in range(c):
                self.pt.release(name)
            self.pt.evict(name)
        for sid in list(self.seqs):
            self.pt.free_seq(sid)
        self.ads.clear()
        self.seqs.clear()
        self.lru.clear()
        self.pt.check_invariants()
        assert self.pt.free_count == self.n
        assert self.pt.kv_count == 0 and self.pt.adapter_count == 0

    # -- invariants
    @invariant()
    def consistent(self):
        pt = self.pt
        pt.check_invariants()
        free = self.model_free()
        assert pt.free_count == free
        assert pt.kv_count == sum(cdiv(l, self.pr) for l in self.seqs.values())
        assert pt.adapter_count == self.n - free - pt.kv_count
        assert pt.evictable_pages() == self.model_evictable()
        assert pt.resident_adapters() == self.lru
        assert sorted(pt.seq_ids()) == sorted(self.seqs)
        for sid, l in self.seqs.items():
            assert pt.seq_len(sid) == l
        for name, (r, c) in self.ads.items():
            assert pt.is_resident(name) and pt.refcount(name) == c
            assert pt.adapter_n_rows(name) == r
        s = pt.stats()
        assert (s["pages_free"], s["pages_kv"], s["pages_adapter"]) == (
            pt.free_count, pt.kv_count, pt.adapter_count)

    @invariant()
    def rows_disjoint(self):
        pt = self.pt
        parts = []
        for sid, l in self.seqs.items():
            k = pt.kv_slots(sid, 0, l).astype(np.int64)
            parts += [k, k + pt.v_row_offset]
        for name in self.ads:
            parts.append(pt.adapter_rows(name).astype(np.int64))
        rows = np.concatenate(parts) if parts else np.empty(0, np.int64)
        assert rows.size == sum(self.seqs.values()) * 2 + sum(r for r, _ in self.ads.values())
        assert np.unique(rows).size == rows.size, "rows shared between owners"
        assert rows.size == 0 or (rows.min() >= 0 and rows.max() < pt.pool_rows)

    def teardown(self):
        if hasattr(self, "pt"):
            self._drain()


PageTableMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPageTableMachine = PageTableMachine.TestCase
