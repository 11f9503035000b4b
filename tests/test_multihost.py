"""One front end over many processes (engine/multihost.py): process 0 leads, the others mirror its engine.

In one process, a leader and a follower engine (one device each, no collective between them) talk
through an in-memory stand-in for jax.distributed's key-value store: the follower ends in the
leader's state, a follower that diverges or falls silent stops the engine for good with a clear
reason. Then the real thing: `slora-jax serve --tp 2` in two jax.distributed CPU processes, the
`openai` client against process 0 gets a single process's outputs, and a process that stops makes
process 0 fail its requests and exit with a clear message, instead of hanging.
"""
from __future__ import annotations

import os
import re
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
from starlette.testclient import TestClient

from server import create_app
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
    assert "process 1 failed" in leader.failure and "adding adapter 'gone'" in leader.failure
    assert path not in leader.failure  # it reaches HTTP clients, which see no server path
    with pytest.raises(ProcessLost):
        leader.submit("hello")


def test_a_silent_follower_fails_requests_in_flight_and_health(monkeypatch):
    """A follower whose heartbeat stops: within the timeout the request in flight ends with
    finish_reason "error" naming the process, the loop stops, /health answers 503 with the reason, and
    new requests are refused."""
    leader, follower = build(multihost.Leader, monkeypatch), build(multihost.Follower, monkeypatch)
    store = FakeStore()
    following = start_following(follower, store.channel(1), timeout_s=0.5)
    leader.engine.lead(0.5, channel=store.channel(0))
    real_step = leader.engine.step

    def slow_step():  # 100 tokens take >= 2 s: the request is still running when the heartbeat is missed
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(leader.engine, "step", slow_step)
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
    health = TestClient(create_app(leader)).get("/health")
    assert health.status_code == 503 and "process 1 of 2 stopped responding" in health.json()["error"]["message"]
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


# -- two real processes ---------------------------------------------------------------------------
SERVE_FLAGS = ["--kernels", "xla", "--dtype", "float32", "--num-pages", "64", "--page-rows", "16",
               "--max-model-len", "128", "--max-running", "8", "--max-batch-tokens", "128", "--no-warmup"]
PEER_TIMEOUT_S = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, procs: list, logs: list, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs):
            assert p.poll() is None, f"a process exited ({p.returncode}):\n{log.read_text()[-4000:]}"
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail("process 0 did not become healthy:\n" + "\n---\n".join(log.read_text()[-3000:] for log in logs))


def start_cluster(tmp_path, adapter_dir) -> tuple:
    """`slora-jax serve --tp 2` in two jax.distributed CPU processes (one device each); (base url, procs, logs)."""
    coordinator, port = free_port(), free_port()
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    # the persistent compilation cache the test process uses (conftest.py): the processes share compiles
    cache = os.path.join(ROOT, ".jax_cache")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1",
           "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    procs = []
    for i, log in enumerate(logs):
        cmd = [sys.executable, "-m", "server", "serve", "--tp", "2", "--coordinator", f"127.0.0.1:{coordinator}",
               "--num-processes", "2", "--process-id", str(i), "--port", str(port), "--adapter-dir",
               str(adapter_dir), "--peer-timeout", str(PEER_TIMEOUT_S), *SERVE_FLAGS]
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, procs, logs)
    except BaseException:
        stop_cluster(procs)
        raise
    return base, procs, logs


def stop_cluster(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(30)


def fail_mid_stream(client, procs: list, logs: list, sig: int, reason: str) -> None:
    """Stop process 1 with `sig` while a stream runs: the stream gets an error event, and process 0 exits
    with status 1 and a last line that gives the `reason` (a regex) within the timeout, plus slack."""
    stream = client.completions.create(model="base", prompt="a long one", max_tokens=110, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    procs[1].send_signal(sig)
    t0 = time.monotonic()
    with pytest.raises(openai.APIError, match=reason):
        for _ in chunks:
            pass
    assert procs[0].wait(timeout=PEER_TIMEOUT_S + 30) == 1
    assert time.monotonic() - t0 < PEER_TIMEOUT_S + 30
    last = [line for line in logs[0].read_text().splitlines() if line.startswith("slora-jax: error:")]
    assert last and re.search(reason, last[-1]), logs[0].read_text()[-3000:]


def test_serve_across_two_processes(tmp_path):
    """The openai client against process 0 gets what one process serves, including an adapter loaded by
    path through POST /v1/adapters (read by both processes) and a stream; then process 1 hangs (SIGSTOP,
    as a stuck GPU process would: no error from any collective) mid-stream, and process 0 fails loudly."""
    adapter_dir = tmp_path / "adapters"
    ref = LLM("tiny", **ENGINE)  # the single-process reference
    add_demo_adapters(ref)
    ref.load_adapter("alice", write_peft(adapter_dir / "alice", ref.model_cfg, r=4, seed=3))

    def expect(prompt, adapter, **sampling):
        return ref.generate(prompt, adapter=adapter, sampling=SamplingParams(**sampling))[0].text

    base, procs, logs = start_cluster(tmp_path, adapter_dir)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        r = httpx.post(base + "/v1/adapters", json={"name": "alice", "path": "alice"}, timeout=120)
        assert r.status_code == 200, r.text
        got = client.completions.create(model="alice", prompt="Hello there", max_tokens=12, temperature=0)
        assert got.choices[0].text == expect("Hello there", "alice", max_tokens=12)
        got = client.completions.create(model="demo-poet", prompt="many adapters", max_tokens=10, temperature=0.8,
                                        seed=7)
        assert got.choices[0].text == expect("many adapters", "demo-poet", max_tokens=10, temperature=0.8, seed=7)
        stream = client.completions.create(model="alice", prompt="one front end", max_tokens=16, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == expect("one front end", "alice",
                                                                                 max_tokens=16)
        assert httpx.delete(base + "/v1/adapters/alice", timeout=120).status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="alice", prompt="gone", max_tokens=2)
        fail_mid_stream(client, procs, logs, signal.SIGSTOP, "process 1 of 2 stopped responding")
    finally:
        stop_cluster(procs)


def test_a_killed_process_fails_process_0_loudly(tmp_path):
    """Process 1 killed mid-stream: the collective in flight fails at once on CPU (gloo), and process 0
    waits for the heartbeats to name the process that is gone (or, late, gives the collective's error)."""
    base, procs, logs = start_cluster(tmp_path, tmp_path)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        fail_mid_stream(client, procs, logs, signal.SIGKILL,
                        "process 1 of 2 stopped responding|a step failed on process 0")
    finally:
        stop_cluster(procs)
