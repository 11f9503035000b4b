"""One front end over many processes (engine/multihost.py): process 0 leads, the others mirror its engine.

In one process, a leader and a follower engine (one device each, no collective between them) talk
through an in-memory stand-in for jax.distributed's key-value store: the follower ends in the
leader's state, a follower that diverges or falls silent stops the engine for good with a clear
reason. Then the real thing: `slora-jax serve --tp 2` in two jax.distributed CPU processes, the
`openai` client against process 0 gets a single process's outputs, and a process that stops makes
process 0 fail its requests and exit with a clear message, instead of hanging.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from slora_jax import LLM, ProcessLost, SamplingParams
from slora_jax.cli import add_demo_adapters
from slora_jax.engine import multihost
from tests.test_server import write_peft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = dict(dtype="float32", kernels="xla", num_pages=64, page_rows=16, max_model_len=128, max_running=8,
              max_batch_tokens=128)


class FakeStore:
    """jax.distributed's key-value store in one process: what `multihost.Channel` reads and writes."""

    def __init__(self):
        self.values: dict = {}
        self.cond = threading.Condition()

    def channel(self, process_id: int, num_processes: int = 2) -> "FakeChannel":
        return FakeChannel(self, process_id, num_processes)


class FakeChannel(multihost.Channel):
    def __init__(self, store: FakeStore, process_id: int, num_processes: int):
        self.store, self.ns = store, multihost.NAMESPACE
        self.process_id, self.num_processes = process_id, num_processes

    def _set(self, key, value):
        with self.store.cond:
            self.store.values[key] = value
            self.store.cond.notify_all()

    def publish(self, seq, text):
        self._set(f"{self.ns}/msg/{seq}", text)

    def receive(self, seq, timeout_s):
        with self.store.cond:
            self.store.cond.wait_for(lambda: f"{self.ns}/msg/{seq}" in self.store.values, timeout_s)
            return self.store.values.get(f"{self.ns}/msg/{seq}")

    def put_blob(self, key, data):
        self._set(key, data)

    def get_blob(self, key, timeout_s=60.0):
        return self.store.values[key]

    def beat(self, text):
        self._set(f"{self.ns}/beat/{self.process_id}", text)

    def beats(self):
        return {p: self.store.values.get(f"{self.ns}/beat/{p}") for p in range(1, self.num_processes)}

    def delete(self, key):
        with self.store.cond:
            self.store.values.pop(key, None)

    def barrier(self, name, timeout_s):
        pass


def build(role: type, monkeypatch) -> LLM:
    """A tiny LLM whose engine is `role` (Leader or Follower) in this single process, with the demo adapters."""
    monkeypatch.setattr("slora_jax.api.engine_class", lambda: role)
    llm = LLM("tiny", **ENGINE)
    add_demo_adapters(llm)  # a start-up call made alike on every process, before lead() / follow()
    return llm


def start_following(llm: LLM, channel, timeout_s: float = 5.0) -> dict:
    """Run `follow()` in a thread; the returned dict gets its "error" (or None) when it ends."""
    out: dict = {}

    def run():
        try:
            llm.engine.follow(timeout_s, channel=channel)
            out["error"] = None
        except ProcessLost as e:
            out["error"] = str(e)

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def engine_state(llm: LLM) -> dict:
    e, stats = llm.engine, llm.stats()
    keep = ("pages_free", "pages_kv", "pages_adapter", "adapters_registered", "requests_finished",
            "requests_aborted", "tokens_generated", "prompt_tokens", "steps")
    return {"digest": e.digest, "adapters": sorted(a["name"] for a in llm.adapters()),
            **{k: stats[k] for k in keep}}


def test_a_follower_ends_in_the_leaders_state(tmp_path, monkeypatch):
    """Requests (greedy, unseeded sampling, a stop string), an abort, every kind of adapter change and a
    direct forward, made on the leader only, end in the same state on the follower; stop() releases it."""
    leader, follower = build(multihost.Leader, monkeypatch), build(multihost.Follower, monkeypatch)
    store = FakeStore()
    following = start_following(follower, store.channel(1))
    leader.engine.lead(5.0, channel=store.channel(0))
    rng = np.random.default_rng(0)
    cfg = leader.model_cfg
    leader.load_adapter("peft", write_peft(tmp_path / "peft", cfg, r=4))
    leader.add_adapter("tree", {f"{layer}.o_proj": (rng.normal(0, 0.1, (cfg.hidden_size, 2)),
                                                    rng.normal(0, 0.1, (2, cfg.hidden_size)))
                                for layer in range(cfg.num_layers)}, alpha=4.0)
    leader.add_synthetic_adapters(["syn-0", "syn-1"], rank=4)
    leader.remove_adapter("demo-coder")
    slow = leader.submit("a request to abort", "syn-1", SamplingParams(max_tokens=50, ignore_eos=True))
    slow.abort()
    outs = leader.generate(["hello", "tensor", "parallel", "lora"], adapter=["peft", "tree", None, "demo-poet"],
                           sampling=SamplingParams(max_tokens=12, temperature=0.9, stop=["e"]))
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    leader.logits([1, 2, 3], adapter="peft")
    leader.stop()
    following["thread"].join(30)
    assert following == {"thread": following["thread"], "error": None}, following
    assert engine_state(follower) == engine_state(leader)
    assert slow.finish_reason == "abort"


def test_an_adapter_a_follower_cannot_read_stops_the_engine(tmp_path, monkeypatch):
    """The follower reads PEFT dirs from process 0's path: one it cannot read is a divergence, named as such
    in its error and in process 0's `failure`, and every later call on process 0 raises ProcessLost."""
    leader, follower = build(multihost.Leader, monkeypatch), build(multihost.Follower, monkeypatch)
    store = FakeStore()
    leader.engine.lead(5.0, channel=store.channel(0))
    path = write_peft(tmp_path / "gone", leader.model_cfg)
    leader.load_adapter("gone", path)  # no loop running: the call runs the step that applies it
    shutil.rmtree(path)
    following = start_following(follower, store.channel(1))
    following["thread"].join(30)
    assert "diverged" in following["error"] and "same path" in following["error"], following
    assert leader.wait_for_failure(10) is not None
    assert "process 1 failed" in leader.failure and "loading adapter 'gone'" in leader.failure
    with pytest.raises(ProcessLost):
        leader.submit("hello")


def test_a_silent_follower_fails_requests_in_flight_and_health(monkeypatch):
    """A follower whose heartbeat stops: within the timeout the request in flight ends with
    finish_reason "error" naming the process, the loop stops, and new requests are refused."""
    leader, follower = build(multihost.Leader, monkeypatch), build(multihost.Follower, monkeypatch)
    store = FakeStore()
    following = start_following(follower, store.channel(1), timeout_s=0.5)
    leader.engine.lead(0.5, channel=store.channel(0))
    leader.start()
    handle = leader.submit("a long one", sampling=SamplingParams(max_tokens=100, ignore_eos=True))
    follower.engine._quit.set()  # its heartbeat stops; the follower itself keeps running steps
    t0 = time.monotonic()
    reason = leader.wait_for_failure(10)
    assert reason is not None and time.monotonic() - t0 < 5
    assert "process 1 of 2 stopped responding" in reason, reason
    deadline = time.monotonic() + 5
    while not handle.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle.finish_reason == "error" and "stopped responding" in handle.error
    assert not leader.is_running
    with pytest.raises(ProcessLost, match="stopped responding"):
        leader.submit("hello")
    leader.stop()
    follower.engine._fail("test over")  # its loop sees it at the next poll
    following["thread"].join(30)


def test_a_follower_that_read_other_tokens_reports_it(monkeypatch):
    leader, follower = build(multihost.Leader, monkeypatch), build(multihost.Follower, monkeypatch)
    store = FakeStore()
    leader.engine.lead(5.0, channel=store.channel(0))
    leader.generate("hello", sampling=SamplingParams(max_tokens=3))
    follower.engine.digest = 12345  # as if it had sampled something else
    following = start_following(follower, store.channel(1))
    following["thread"].join(30)
    assert "diverged" in following["error"] and "sampled tokens" in following["error"], following
