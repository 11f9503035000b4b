"""Continuous batching: which requests run in the next step, and how many tokens each.

Every step carries all running decodes (one token each) plus prefill chunks of
admitted requests within the token budget (`max_batch_tokens`), so a long
prompt is split over several steps and never stalls the decodes. Admission is
FCFS, bounded by `max_running`, by KV pages for the first chunk and by the
adapter being resident or swappable in; within a short look-ahead it admits
requests whose adapters are already resident when the head cannot be admitted.
When decodes run out of pages, the most recently admitted request is
preempted (its pages freed, recomputed later): a transiently full pool is
never an error. With `early_abort_s`, waiting requests that can no longer get
their first token within that SLO are dropped (S-LoRA's early abort).

Prefix cache (memory/cache.py): at admission a request looks up the longest
run of its leading full pages that is cached, shares those blocks and starts
computing after them (`num_computed`); at least its last token is always
computed, so a step samples the next one. A request's full pages become
blocks once their tokens are known on the host and the steps writing them
have been dispatched (at the next schedule, and when it finishes): any later
step reads them through the donated pool, so after the writes.

In async mode a request's newest token may still be on the device when the
next step is scheduled: `Request.num_tokens` counts it, so a decode reserves
the page for the position after it, and a request whose last token by length
is in flight (`complete`) is not scheduled again: its read finishes it.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Optional

import numpy as np

from ..memory.cache import PoolCache, chain_keys
from ..memory.pages import OutOfPages, PageTable
from .request import Request, Status

LOOKAHEAD = 8


@dataclasses.dataclass
class ScheduledStep:
    requests: list  # Request, in batch order
    num_tokens: list  # tokens each computes this step
    aborted: list  # requests dropped by early abort
    preempted: list
    decode: Optional[bool] = None  # every request computes its one last token (None: work it out)

    @property
    def is_decode(self) -> bool:
        if self.decode is None:
            self.decode = all(n == 1 and r.remaining_prefill == 1 for r, n in zip(self.requests, self.num_tokens))
        return self.decode


class Scheduler:
    def __init__(self, pages: PageTable, cache: PoolCache, max_running: int, max_batch_tokens: int,
                 early_abort_s: Optional[float] = None, prefix_cache: bool = True):
        self.pages, self.cache = pages, cache
        self.max_running, self.max_batch_tokens = max_running, max_batch_tokens
        self.early_abort_s = early_abort_s
        self.prefix_cache = prefix_cache
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        # tokens of admitted requests looked up in the prefix cache, and found there
        self.counters = {"prefix_query_tokens": 0, "prefix_hit_tokens": 0}

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step --------------------------------------------------------------------
    def schedule(self) -> Optional[ScheduledStep]:
        for r in self.running:
            self._cache_pages(r)
        aborted = self._early_abort()
        preempted, decodes = self._reserve_decodes()
        budget = self._continue_prefills(self.max_batch_tokens - decodes)
        self._admit(budget)
        if not self.running:
            return ScheduledStep([], [], aborted, preempted) if (aborted or preempted) else None
        reqs, ntoks, decode = [], [], True
        for r in self.running:
            n = self.pages.seq_len(r.id_int) - r.num_computed  # what was reserved for this step
            if n > 0:
                reqs.append(r)
                ntoks.append(n)
                decode = decode and n == 1 and r.remaining_prefill == 1
        return ScheduledStep(reqs, ntoks, aborted, preempted, decode)

    def _early_abort(self) -> list:
        if self.early_abort_s is None:
            return []
        now = time.monotonic()
        keep, dropped = collections.deque(), []
        for r in self.waiting:
            (dropped if now - r.arrival > self.early_abort_s and not r.num_generated else keep).append(r)
        self.waiting = keep
        return dropped

    def _reserve_decodes(self) -> tuple[list, int]:
        """Make room for one more token of every decoding request, preempting the newest if needed.
        Returns (the preempted, how many decodes still run)."""
        preempted, reserved = [], []
        gone: set = set()  # preempted in this pass (a set: `in self.running` would scan the list each time)
        for r in list(self.running):
            if r in gone or r.remaining_prefill != 1 or r.complete:
                continue
            reserved.append(r)
            while not self._reserve(r, 1):  # no room even with idle adapters evicted: preempt the newest
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
                gone.add(victim)
                if victim is r:
                    break
        return preempted, sum(r not in gone for r in reserved)

    def _continue_prefills(self, budget: int) -> int:
        """Reserve pages for the next chunk of requests still in prefill (admitted earlier)."""
        for r in self.running:
            if budget <= 0:
                break
            left = r.remaining_prefill
            if left <= 1:
                continue
            n = min(left, budget)
            if self._reserve(r, n):  # all or nothing: a chunk that does not fit waits a step
                budget -= n
        return budget

    def _admit(self, budget: int) -> None:
        skipped = 0
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_running and i < LOOKAHEAD:
            r = self.waiting[i]
            if r.complete:  # preempted with its last token in flight: reading it finishes the request
                i += 1
                continue
            n = self._try_admit(r, budget)
            if n:
                del self.waiting[i]
                self.running.append(r)
                budget -= n
                continue
            skipped += 1
            if skipped > 1 and not self._resident(r):
                break  # pool is tight: do not keep skipping ahead
            i += 1

    def _resident(self, r: Request) -> bool:
        return r.adapter is None or self.cache.is_resident(r.adapter)

    def _try_admit(self, r: Request, budget: int, watermark: Optional[int] = None, reuse: bool = True) -> int:
        """Share r's cached prefix, make its adapter resident and reserve KV for the next tokens (at most
        `budget`); returns how many it computes this step, or changes nothing and returns 0."""
        hit = self._lookup(r) if reuse and self.prefix_cache else np.empty(0, np.int32)
        done = len(hit) * self.pages.page_rows
        n = min(r.num_tokens - done, budget)
        adapter_pages = self.cache.pages_needed(r.adapter) if r.adapter else 0
        kv_pages = self.pages.pages_needed(r.id_int, done + n) - len(hit)
        if watermark is None:
            watermark = len(self.running)  # keep a page per running request for its next decode token
        taken = int(np.count_nonzero(self.pages.refcount[hit] == 0))  # idle blocks it shares stop being evictable
        free = self.pages.free_count + self.cache.evictable_pages() - taken
        if kv_pages + adapter_pages + watermark > free or (r.adapter and not self.cache.can_take(r.adapter)):
            return 0
        self.pages.share(r.id_int, hit)  # first: eviction for the adapter or the KV must not take them
        r.num_computed, r.pages_registered, r.cached_tokens = done, len(hit), done
        if r.adapter:
            self.cache.acquire(r.adapter)
        if not self._reserve(r, n):  # the check above left room; stay safe if a resident adapter's pages were counted
            if r.adapter:
                self.cache.release(r.adapter)
            self.pages.free_seq(r.id_int)
            r.num_computed = r.pages_registered = 0
            return 0
        if reuse and self.prefix_cache:
            self.counters["prefix_query_tokens"] += r.num_tokens
            self.counters["prefix_hit_tokens"] += done
        r.status = Status.RUNNING
        return n

    # -- prefix cache --------------------------------------------------------------------
    def _keys(self, r: Request, n_pages: int) -> list:
        """r's chain keys of its first n_pages pages (computed once per request, its tokens never change)."""
        have, pr = len(r.page_keys), self.pages.page_rows
        if have < n_pages:
            parent = r.page_keys[-1] if have else self.cache.identity(r.adapter)
            r.page_keys += chain_keys(parent, r.all_ids[have * pr: n_pages * pr], pr)
        return r.page_keys[:n_pages]

    def _lookup(self, r: Request) -> np.ndarray:
        """Pages of r's longest cached prefix: whole pages of tokens known on the host, short of its last token."""
        limit = min(len(r.prompt_ids) + len(r.output_ids), r.num_tokens - 1) // self.pages.page_rows
        return self.cache.match(self._keys(r, limit))

    def _cache_pages(self, r: Request) -> None:
        """Offer r's full pages whose tokens are known and computed (by dispatched steps) to the cache."""
        if not self.prefix_cache:
            return
        full = min(r.num_computed, len(r.prompt_ids) + len(r.output_ids)) // self.pages.page_rows
        if full > r.pages_registered:
            self.cache.register(r.id_int, r.pages_registered, self._keys(r, full)[r.pages_registered:])
            r.pages_registered = full

    def _reserve(self, r: Request, n: int) -> bool:
        """KV pages for r's next n tokens (the cache evicts idle adapters or blocks for them if it must)."""
        try:
            self.pages.extend(r.id_int, r.num_computed + n)
            return True
        except OutOfPages:
            return False

    def admit_now(self, r: Request) -> bool:
        """Admit r for one forward over all its tokens, outside the queue (Engine.logits): the same checks
        as admission, without a decode watermark. Release it with `release`."""
        return self._try_admit(r, r.num_tokens - r.num_computed, watermark=0, reuse=False) > 0

    # -- finishing ---------------------------------------------------------------------
    def preempt(self, r: Request) -> None:
        """Free r's pages and put it back at the head of the queue (recomputed later, but for what of it
        the prefix cache still holds then)."""
        self.running.remove(r)
        self.release(r)
        r.num_computed = r.pages_registered = 0
        r.status = Status.WAITING
        r.preemptions += 1
        self.waiting.appendleft(r)

    def finish(self, r: Request, cache: bool = True) -> None:
        """cache=False: r's pages may hold garbage (its step failed): none become cached blocks."""
        if r in self.running:
            self.running.remove(r)
            self.release(r, cache)
        elif r in self.waiting:
            self.waiting.remove(r)
        r.status = Status.FINISHED

    def release(self, r: Request, cache: bool = True) -> None:
        """Give back r's KV pages (its full computed ones stay as cached blocks) and its hold on its adapter."""
        if self.pages.has_seq(r.id_int):
            if cache:
                self._cache_pages(r)
            self.pages.free_seq(r.id_int)
        if r.adapter and r.status == Status.RUNNING:
            self.cache.release(r.adapter)
            r.status = Status.WAITING
