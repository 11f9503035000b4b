"""Ragged batch -> StepInput in a small fixed set of bucket shapes.

Shapes are padded so that jit compiles a bounded number of programs: a decode
step has B sequences (one token each) with B a bucket size (slora_jax/buckets.py:
powers of two and, from 192 up, the sizes halfway between) up to
max_running; a prefill (mixed) step has T tokens, a bucket size up to
max_batch_tokens, and min(T, B_max) sequence rows. Segments NS = B, rank
R = max_rank and the page-table width M = pages of one max_model_len sequence
are fixed (the kernels loop only over a sequence's real length, so a wide
table costs nothing but its few bytes). So there are about log2(max_running) decode
and log2(max_batch_tokens) prefill shapes, each with and without LoRA, all
compiled by `Engine.warmup()`. A step's sampled tokens come back padded to
`max_b` rows, so the next step takes them as one fixed-shape input (`feed`
says which token rows read them). Requests are ordered by their adapter's
table entry so tokens of one adapter form one contiguous segment. The host work is numpy
over the batch; Python loops only over requests, never over tokens or pages.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ..buckets import bucket, ladder
from ..memory.cache import PoolCache
from ..memory.pages import PageTable
from ..model.inputs import LoraInput, StepInput
from .scheduler import ScheduledStep


@dataclasses.dataclass
class SamplingArrays:
    temperature: np.ndarray  # [B] float32, 0 = greedy
    top_p: np.ndarray  # [B] float32
    top_k: np.ndarray  # [B] int32, 0 = off
    seeds: np.ndarray  # [B] uint32
    counters: np.ndarray  # [B] int32 tokens generated so far (folds into the key)


jax.tree_util.register_dataclass(
    SamplingArrays, data_fields=["temperature", "top_p", "top_k", "seeds", "counters"], meta_fields=[])


def max_batch_rows(max_running: int) -> int:
    """Sequence rows of the largest bucket: the length of every step's sampled-token output."""
    return bucket(max_running, 4)


class BatchBuilder:
    def __init__(self, pages: PageTable, cache: PoolCache, max_running: int, max_batch_tokens: int):
        self.pages, self.cache = pages, cache
        self.width = pages.layout.pages_per_seq
        self.max_b = max_batch_rows(max_running)
        self.max_t = bucket(max_batch_tokens, 16)

    def decode_sizes(self) -> list:
        return ladder(4, self.max_b)

    def prefill_sizes(self) -> list:
        return ladder(16, self.max_t)

    def _bucket(self, decode: bool, n_seqs: int, n_tokens: int) -> tuple[int, int]:
        """(B, T) bucket of a step."""
        if decode:
            b = bucket(n_seqs, 4)
            return b, b
        t = bucket(n_tokens, 16)
        return min(t, self.max_b), t

    def build(self, step: ScheduledStep) -> tuple[StepInput, SamplingArrays, list]:
        entries = [self.cache.index_of(r.adapter) if r.adapter else -1 for r in step.requests]
        order = sorted(range(len(step.requests)), key=lambda i: entries[i])
        reqs = [step.requests[i] for i in order]
        ntok = np.array([step.num_tokens[i] for i in order], np.int32)
        entry_arr = np.array([entries[i] for i in order], np.int32)
        decode = step.is_decode
        nb = len(reqs)
        b, t = self._bucket(decode, nb, int(ntok.sum()))
        if nb > b:  # more sequences than sequence rows for this token count: use the next token bucket
            b, t = self.max_b, bucket(max(int(ntok.sum()), self.max_b), 16)

        tokens = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        kv_rows = np.full(t, -1, np.int32)
        q_starts = np.zeros(b + 1, np.int32)
        q_starts[1: nb + 1] = np.cumsum(ntok)
        q_starts[nb + 1:] = q_starts[nb]
        kv_lens = np.zeros(b, np.int32)
        feed = np.full(t, -1, np.int32)
        lo = np.fromiter((r.num_computed for r in reqs), np.int32, nb)
        kv_lens[:nb] = lo + ntok
        known = np.minimum(ntok, np.fromiter((len(r.prompt_ids) + len(r.output_ids) for r in reqs), np.int32, nb) - lo)
        fed = np.flatnonzero(known < ntok)  # the last token was sampled by the step in flight: the device feeds it
        if fed.size:
            assert (known[fed] == ntok[fed] - 1).all() and all(reqs[i].pending == 1 for i in fed), \
                [(reqs[i].id, int(lo[i]), int(ntok[i]), int(known[i]), reqs[i].pending) for i in fed]
            feed[q_starts[fed] + ntok[fed] - 1] = [reqs[i].pending_row for i in fed]
        for i in np.flatnonzero(known > 0).tolist():  # prompt chunks; tokens read since they were sampled
            s, k, start = int(q_starts[i]), int(known[i]), int(lo[i])
            tokens[s: s + k] = reqs[i].known_ids(start, start + k)
        seq_ids = [r.id_int for r in reqs]
        block_tables = np.zeros((b, self.width), np.int32)
        block_tables[:nb] = self.pages.block_table(seq_ids, self.width)
        # each token's position and pool row (never in a shared block), numpy over the step's tokens
        total = int(q_starts[nb])
        seq_of = np.repeat(np.arange(nb), ntok)
        positions[:total] = (kv_lens[:nb] - ntok)[seq_of] + np.arange(total) - q_starts[:nb][seq_of]
        kv_rows[:total] = self.pages.batch_write_rows(seq_ids, block_tables[:nb], seq_of, positions[:total])
        logit_rows = np.arange(b, dtype=np.int32) if decode else np.maximum(q_starts[1:] - 1, 0)

        inp = StepInput(tokens, positions, kv_rows, block_tables, kv_lens, q_starts, logit_rows,
                        self._lora(entry_arr, q_starts, b), feed, decode, self.pages.page_rows,
                        num_pages=self.pages.num_pages)
        return inp, self._sampling(reqs, b), reqs

    def dummy(self, decode: bool, size: int, lora: bool) -> tuple[StepInput, SamplingArrays]:
        """An all-padding step of one bucket (writes nothing to the pool): for warm-up compiles."""
        b, t = (size, size) if decode else (min(size, self.max_b), size)
        q_starts = np.zeros(b + 1, np.int32)
        lo = None
        if lora:
            lo = self._lora(np.zeros(1, np.int32), q_starts, b)
            lo.ranks[:] = 0
        inp = StepInput(np.zeros(t, np.int32), np.zeros(t, np.int32), np.full(t, -1, np.int32),
                        np.zeros((b, self.width), np.int32), np.zeros(b, np.int32), q_starts,
                        np.arange(b, dtype=np.int32) if decode else np.zeros(b, np.int32), lo,
                        np.full(t, -1, np.int32), decode, self.pages.page_rows, num_pages=self.pages.num_pages)
        return inp, self._sampling([], b)

    def _lora(self, entry_arr: np.ndarray, q_starts: np.ndarray, b: int):
        """Segment tables: one segment per run of requests with the same adapter table entry (-1 = none)."""
        if not (entry_arr >= 0).any():
            return None
        nb = len(entry_arr)
        starts = np.flatnonzero(np.r_[True, entry_arr[1:] != entry_arr[:-1]]) if nb else np.zeros(0, int)
        seg_entry = np.full(b, -1, np.int32)
        seg_entry[: len(starts)] = entry_arr[starts]
        seg_starts = np.full(b + 1, q_starts[nb], np.int32)
        seg_starts[: len(starts)] = q_starts[starts]
        tab = self.cache.tables
        safe = np.maximum(seg_entry, 0)
        has = (seg_entry >= 0)[:, None]
        ranks = np.where(has, tab.ranks[safe], 0).T.astype(np.int32)  # [7, NS]
        a_rows = tuple(t[safe] for t in tab.a_rows)
        b_rows = tuple(t[safe] for t in tab.b_rows)
        return LoraInput(seg_starts, ranks, a_rows, b_rows, self.cache.store.target_modules())

    @staticmethod
    def _sampling(reqs: list, b: int) -> SamplingArrays:
        # one pass over the requests; float64 holds every column exactly (seeds < 2**32)
        table = np.zeros((b, 5), np.float64)
        table[:, 1] = 1.0  # top_p of padding rows
        if reqs:
            table[: len(reqs)] = [(r.sampling.temperature, r.sampling.top_p, r.sampling.top_k, r.seed & 0xFFFFFFFF,
                                   r.num_generated) for r in reqs]  # num_generated counts tokens in flight
            # a valid request may ask for a top_k past the vocabulary (no cut) or a temperature past float32's
            # range (uniform): clamped, so that no cast wraps around
            np.minimum(table[:, 0], np.finfo(np.float32).max, out=table[:, 0])
            np.minimum(table[:, 2], np.iinfo(np.int32).max, out=table[:, 2])
        return SamplingArrays(table[:, 0].astype(np.float32), table[:, 1].astype(np.float32),
                              table[:, 2].astype(np.int32), table[:, 3].astype(np.uint32),
                              table[:, 4].astype(np.int32))
