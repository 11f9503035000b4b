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

from ..memory.cache import AdapterCache
from ..memory.pages import OutOfPages, PageTable
from .request import Request, Status

LOOKAHEAD = 8


@dataclasses.dataclass
class ScheduledStep:
    requests: list  # Request, in batch order
    num_tokens: list  # tokens each computes this step
    aborted: list  # requests dropped by early abort
    preempted: list

    @property
    def is_decode(self) -> bool:
        return all(n == 1 and r.remaining_prefill == 1 for r, n in zip(self.requests, self.num_tokens))


class Scheduler:
    def __init__(self, pages: PageTable, cache: AdapterCache, max_running: int, max_batch_tokens: int,
                 early_abort_s: Optional[float] = None):
        self.pages, self.cache = pages, cache
        self.max_running, self.max_batch_tokens = max_running, max_batch_tokens
        self.early_abort_s = early_abort_s
        self.waiting: collections.deque = collections.deque()
        self.running: list = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step --------------------------------------------------------------------
    def schedule(self) -> Optional[ScheduledStep]:
        aborted = self._early_abort()
        preempted = self._reserve_decodes()
        budget = self.max_batch_tokens - sum(1 for r in self.running if r.remaining_prefill == 1 and not r.complete)
        budget = self._continue_prefills(budget)
        self._admit(budget)
        if not self.running:
            return ScheduledStep([], [], aborted, preempted) if (aborted or preempted) else None
        reqs, ntoks = [], []
        for r in self.running:
            n = self.pages.seq_len(r.id_int) - r.num_computed  # what was reserved for this step
            if n > 0:
                reqs.append(r)
                ntoks.append(n)
        return ScheduledStep(reqs, ntoks, aborted, preempted)

    def _early_abort(self) -> list:
        if self.early_abort_s is None:
            return []
        now = time.monotonic()
        keep, dropped = collections.deque(), []
        for r in self.waiting:
            (dropped if now - r.arrival > self.early_abort_s and not r.num_generated else keep).append(r)
        self.waiting = keep
        return dropped

    def _reserve_decodes(self) -> list:
        """Make room for one more token of every decoding request, preempting the newest if needed."""
        preempted = []
        for r in list(self.running):
            if r.remaining_prefill != 1 or r.complete or r not in self.running:
                continue
            while not self._reserve(r, 1):  # no room even with idle adapters evicted: preempt the newest
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
                if victim is r:
                    break
        return preempted

    def _continue_prefills(self, budget: int) -> int:
        """Reserve pages for the next chunk of requests still in prefill (admitted earlier)."""
        for r in self.running:
            if r.remaining_prefill <= 1 or budget <= 0:
                continue
            n = min(r.remaining_prefill, budget)
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
            n = min(r.remaining_prefill, budget)
            if self._try_admit(r, n):
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

    def _try_admit(self, r: Request, n: int, watermark: Optional[int] = None) -> bool:
        """Make r's adapter resident and reserve KV for its next n tokens, or change nothing and say no."""
        adapter_pages = self.cache.pages_needed(r.adapter) if r.adapter else 0
        kv_pages = self.pages.pages_needed(r.id_int, r.num_computed + n)
        if watermark is None:
            watermark = len(self.running)  # keep a page per running request for its next decode token
        free = self.pages.free_count + self.cache.evictable_pages()
        if kv_pages + adapter_pages + watermark > free or (r.adapter and not self.cache.can_take(r.adapter)):
            return False
        if r.adapter:
            self.cache.acquire(r.adapter)
        if not self._reserve(r, n):  # the check above left room; stay safe if a resident adapter's pages were counted
            if r.adapter:
                self.cache.release(r.adapter)
            return False
        r.status = Status.RUNNING
        return True

    def _reserve(self, r: Request, n: int) -> bool:
        """KV pages for r's next n tokens (the page table evicts idle adapters for them if it must)."""
        try:
            self.pages.extend(r.id_int, r.num_computed + n)
            return True
        except OutOfPages:
            return False

    def admit_now(self, r: Request) -> bool:
        """Admit r for one forward over all its tokens, outside the queue (Engine.logits): the same checks
        as admission, without a decode watermark. Release it with `release`."""
        return self._try_admit(r, r.num_tokens - r.num_computed, watermark=0)

    # -- finishing ---------------------------------------------------------------------
    def preempt(self, r: Request) -> None:
        """Free r's pages and put it back at the head of the queue (recomputed later)."""
        self.running.remove(r)
        self.release(r)
        r.num_computed = 0
        r.status = Status.WAITING
        r.preemptions += 1
        self.waiting.appendleft(r)

    def finish(self, r: Request) -> None:
        if r in self.running:
            self.running.remove(r)
            self.release(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        r.status = Status.FINISHED

    def release(self, r: Request) -> None:
        """Give back r's KV pages and its hold on its adapter."""
        if self.pages.has_seq(r.id_int):
            self.pages.free_seq(r.id_int)
        if r.adapter and r.status == Status.RUNNING:
            self.cache.release(r.adapter)
            r.status = Status.WAITING
