"""One front end over many processes: process 0 leads, every other process mirrors its engine.

Under jax.distributed a tensor-parallel mesh spans the devices of several processes, and each step is
one program that all of them run together on identical host state: the same requests in the same
batch rows, the same pages, the same adapters. Every process builds the same `LLM` and makes the same
start-up calls (adapters, warm-up), as in SPMD use; then process 0 calls `lead()` and serves, and the
others call `follow()`. From then on, what changes the engine from outside its loop (a new request, an
abort, an adapter registered or removed, a direct forward) is a *command*: process 0 queues it, and
at the start of each step, under the engine lock, applies the queued commands and publishes them in
one message; each follower applies the same commands in the same order and runs the same step. The
rest (admission, pages, seeds, stop conditions) is deterministic given that state, and the sampled
tokens are replicated, so the processes stay in step. Scheduling by wall clock (early abort) is
decided on process 0 and sent as aborts.

The channel is jax.distributed's key-value store, served by the coordination service that process 0
already runs: one key per message (`<ns>/msg/<seq>`, JSON; adapter weights added as arrays travel
under their own key as .npz bytes, never pickled). A follower blocks on the next key with a timeout,
so an idle one costs an RPC per second, not a collective per millisecond. Being host-only, the
channel never waits for the device: a device broadcast (multihost_utils.broadcast_one_to_all) would
read its result back every step, stalling the one-step-behind pipeline, and could not time out.

Failure: each follower overwrites a heartbeat key (messages read, and any error) every `beat_s`;
process 0's monitor reads them, deletes the messages that every follower has read, and declares the
engine lost when a heartbeat stops changing for `timeout_s` or reports an error. Then every unfinished
request ends with finish_reason "error", `failure` says why and `failed` is set; nothing is retried,
since a step stuck in a collective with a dead process cannot be interrupted (the server exits). A
follower that diverges (a command ended differently there, e.g. an adapter path it cannot read; or
its sampled tokens differ: each message carries a digest of every token process 0 has read) reports
it and raises `ProcessLost`; one that loses process 0 does too (jax's own error polling usually ends
it first).
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import io
import itertools
import json
import logging
import threading
import time
from concurrent.futures import Future
from typing import Optional

import jax
import numpy as np

from ..adapters.lora import LoraWeights
from ..adapters.peft import load_peft_adapter
from ..errors import ConfigError, ProcessLost, SloraError
from .engine import Engine
from .request import Request, SamplingParams, Status

log = logging.getLogger(__name__)

NAMESPACE = "slora"
POLL_S = 1.0  # an idle follower's wait for the next message before it looks up again
STARTUP_TIMEOUT_S = 600.0  # lead() waits this long for every other process to call follow()
FOLLOWER_IDS = 1 << 48  # a follower's own sequence ids (its copies of process 0's direct forwards) start here
_DIGEST_MOD = (1 << 61) - 1


def engine_class() -> type:
    """The engine an `LLM` builds: `Engine` in one process; under jax.distributed, `Leader` on process 0
    and `Follower` on the others, both plain engines until `lead()` / `follow()`."""
    if jax.process_count() == 1:
        return Engine
    return Leader if jax.process_index() == 0 else Follower


def _status(e: Exception) -> str:
    """A key-value store error's first line, e.g. 'DEADLINE_EXCEEDED: GetKeyValue() timed out ...'."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class Channel:
    """Process 0's messages to the others, and their heartbeats back, in jax.distributed's key-value store."""

    def __init__(self, namespace: str = NAMESPACE):
        from jax._src.distributed import global_state  # jax has no public handle on its key-value store

        self.client = global_state.client
        if self.client is None:
            raise ConfigError("several processes but no jax.distributed client: call jax.distributed.initialize() "
                              "before building the LLM")
        self.ns = namespace
        self.process_id, self.num_processes = jax.process_index(), jax.process_count()

    def publish(self, seq: int, text: str) -> None:
        self.client.key_value_set(f"{self.ns}/msg/{seq}", text)

    def receive(self, seq: int, timeout_s: float) -> Optional[str]:
        """Message `seq`, or None if it did not come within `timeout_s`; ProcessLost if the store is gone."""
        try:
            return self.client.blocking_key_value_get(f"{self.ns}/msg/{seq}", int(timeout_s * 1000))
        except Exception as e:  # a JaxRuntimeError, whose module moved between jax versions
            if _status(e).startswith("DEADLINE_EXCEEDED"):
                return None
            raise ProcessLost(f"process {self.process_id} lost the coordination service on process 0: "
                              f"{_status(e)}") from None

    def put_blob(self, key: str, data: bytes) -> None:
        self.client.key_value_set_bytes(key, data)

    def get_blob(self, key: str, timeout_s: float = 60.0) -> bytes:
        return self.client.blocking_key_value_get_bytes(key, int(timeout_s * 1000))

    def beat(self, text: str) -> None:
        self.client.key_value_set(f"{self.ns}/beat/{self.process_id}", text, allow_overwrite=True)

    def beats(self) -> dict:
        """Each follower's last heartbeat (None before its first)."""
        out = {}
        for p in range(1, self.num_processes):
            try:
                out[p] = self.client.key_value_try_get(f"{self.ns}/beat/{p}")
            except Exception as e:
                if not _status(e).startswith("NOT_FOUND"):
                    raise
                out[p] = None
        return out

    def delete(self, key: str) -> None:
        self.client.key_value_delete(key)

    def barrier(self, name: str, timeout_s: float) -> None:
        """Wait until every process reaches this barrier; ProcessLost if one does not within `timeout_s`."""
        try:
            self.client.wait_at_barrier(f"{self.ns}/{name}", int(timeout_s * 1000))
        except Exception as e:
            raise ProcessLost(f"not every one of the {self.num_processes} processes reached lead()/follow() within "
                              f"{timeout_s:g} s: {_status(e)}") from None


def _beat_interval(timeout_s: float) -> float:
    return max(0.05, min(1.0, timeout_s / 5))


def _check_mesh(engine: Engine) -> None:
    """Every process must hold part of the mesh, or it would have nothing to run in a step."""
    procs = {d.process_index for d in engine.mesh.devices.flat} if engine.mesh is not None else {jax.process_index()}
    if len(procs) != jax.process_count():
        raise ConfigError(f"tp={engine.ecfg.tp} spans the devices of process(es) {sorted(procs)} of "
                          f"{jax.process_count()}: across processes, tp must take every device (tp = "
                          f"{jax.device_count()} here)")


def _request_command(req: Request) -> list:
    return ["request", req.id, req.id_int, [int(t) for t in req.prompt_ids], req.adapter,
            dataclasses.asdict(req.sampling), int(req.seed)]


def _weights_bytes(lw: LoraWeights) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{f"{m}.{part}": np.asarray(x) for m, ab in lw.modules.items() for part, x in zip("AB", ab)})
    return buf.getvalue()


def _weights_from(name: str, data: bytes) -> LoraWeights:
    parts: dict = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        for key in z.files:
            module, part = key.rsplit(".", 1)
            parts.setdefault(module, {})[part] = z[key]
    return LoraWeights(name, {m: (p["A"], p["B"]) for m, p in parts.items()})


def _describe(cmd: list) -> str:
    kind = cmd[0]
    if kind == "request":
        return f"request {cmd[1]!r}"
    if kind in ("load", "weights", "remove"):  # no path: the reason reaches HTTP clients, which see no server path
        return f"{'removing' if kind == 'remove' else 'adding'} adapter {cmd[1]!r}"
    return f"{kind} {cmd[1:]!r}"


class _Mirrored(Engine):
    """What process 0 and its followers share: applying commands, the token digest, failing for good."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel: Optional[Channel] = None  # set by lead() / follow(); until then a plain engine
        self.timeout_s = 10.0
        self.digest = 0  # of every token read so far, in order: equal on every process that is in step
        self._seq = 0  # the next message's number
        self._quit = threading.Event()  # ends the heartbeat / monitor thread
        self._fail_lock = threading.Lock()
        self._error: Optional[str] = None  # a follower's reason to stop, sent in its heartbeat
        self._beats = 0

    def _append(self, r: Request, tok: int, now: float, grammar: Optional[str] = None) -> bool:
        self.digest = (self.digest * 1_000_003 + tok * 8191 + r.id_int) % _DIGEST_MOD
        return super()._append(r, tok, now, grammar)

    def _apply(self, cmd: list, local=None) -> Optional[Exception]:
        """Apply one command here (under the engine lock) and return the error it raised, if any; `local` is
        process 0's own object (its Request, its adapter weights), which the others rebuild from `cmd`."""
        try:
            kind = cmd[0]
            if kind == "request":
                _, rid, n, ids, adapter, sampling, seed = cmd
                req = local or self._request(ids, adapter, SamplingParams(**sampling), rid, id_int=n, seed=seed)
                if adapter is not None and adapter not in self.store:  # removed after it was submitted
                    self._finish(req, "error", error=f"adapter {adapter!r} was removed before the request started")
                else:
                    Engine._accept(self, req)
            elif kind == "abort":
                Engine.abort(self, cmd[1])
            elif kind == "abort_all":
                Engine.abort_all(self)
            elif kind in ("load", "weights"):
                _, name, where, replace = cmd
                if local is None:
                    local = (load_peft_adapter(name, where, self.cfg, self.ecfg.max_rank) if kind == "load"
                             else _weights_from(name, self.channel.get_blob(where)))
                Engine.add_adapter(self, local, replace=replace)
            elif kind == "synthetic":
                _, names, rank, modules, seed, shared = cmd
                Engine.add_synthetic_adapters(self, names, rank, tuple(modules), seed, shared)
            elif kind == "remove":
                Engine.remove_adapter(self, cmd[1])
            else:
                raise ProcessLost(f"unknown command {kind!r} from process 0 (a different slora-jax version?)")
        except Exception as e:
            return e
        return None

    def _fail(self, reason: str) -> None:
        """Stop for good: fail every unfinished request with `reason`, set `failure` and `failed`."""
        with self._fail_lock:
            if self.failure is not None:
                return
            self.failure = reason
        log.error("the multi-process engine stopped: %s", reason)
        self._stop = True  # the background loop ends after the step in progress
        self._new_work.set()
        self._quit.set()
        queued = self._drop_commands(reason)
        locked = self._lock.acquire(timeout=1.0)  # a step stuck in a collective with a lost process holds it for good
        try:
            for r in list(self.requests.values()) + queued:
                if r.finished:
                    continue
                if locked:
                    self._finish(r, "error", error=reason)
                else:  # the stuck step will never touch these again: finish them without the scheduler
                    r.status, r.finish_reason, r.error, r.finish_time = Status.FINISHED, "error", reason, time.monotonic()
                    for cb in r.listeners:
                        cb(r, "")
        finally:
            if locked:
                self._lock.release()
        self.failed.set()

    def _drop_commands(self, reason: str) -> list:
        """Commands not yet applied fail with the engine; returns their requests."""
        return []


class Leader(_Mirrored):
    """Process 0's engine. After `lead()` each step first applies and publishes what changed since the last."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._commands: collections.deque = collections.deque()  # (command, local object, Future or None)
        self._blobs: list = []  # (seq, key): adapter weights to delete once every follower read message seq
        self._blob_ids = itertools.count()
        self._applying: Optional[int] = None  # the thread applying commands: its engine calls go straight through
        self._released = False

    def lead(self, timeout_s: float = 10.0, startup_timeout_s: float = STARTUP_TIMEOUT_S,
             channel: Optional[Channel] = None) -> None:
        if self.channel is not None:
            return
        _check_mesh(self)
        channel = channel or Channel()
        channel.barrier("follow", startup_timeout_s)  # every follower is in follow(), its heartbeat running
        self.channel, self.timeout_s = channel, timeout_s
        self.scheduler.early_abort_s = None  # decided here by process 0's clock instead (_early_aborts)
        threading.Thread(target=self._watch, name="slora-multihost-monitor", daemon=True).start()
        # a script that never calls stop(): release the followers before jax's own exit handler, which
        # waits at a shutdown barrier for every process (atexit runs the last registered first)
        atexit.register(lambda: self._released or self.failure is not None or self.stop())
        log.info("process 0 leads %d follower(s)", channel.num_processes - 1)

    def _direct(self) -> bool:
        """Whether an engine call applies here at once: before lead(), or made while applying a command."""
        return self.channel is None or self._applying == threading.get_ident()

    # -- what changes the engine: queued here, applied and published by the next step ----------------
    def _accept(self, req: Request) -> None:
        if self._direct():
            return super()._accept(req)
        self._queue(_request_command(req), req)

    def abort(self, request_id: str) -> None:
        if self._direct():
            return super().abort(request_id)
        if self.failure is None:  # else it has finished already, with the others
            self._queue(["abort", request_id])

    def abort_all(self) -> None:
        if self._direct():
            return super().abort_all()
        if self.failure is None:
            self._queue(["abort_all"])

    def add_adapter(self, lw: LoraWeights, replace: bool = False):
        if self._direct():
            return super().add_adapter(lw, replace)
        if lw.source != "pytree":  # a PEFT dir: every process reads it from the same path
            return self._call(["load", lw.name, lw.source, replace], lw)
        key = f"{self.channel.ns}/blob/{next(self._blob_ids)}"
        self.channel.put_blob(key, _weights_bytes(lw))
        return self._call(["weights", lw.name, key, replace], lw)

    def add_synthetic_adapters(self, names, rank: int, modules, seed: int = 0, shared: bool = False) -> None:
        if self._direct():
            return super().add_synthetic_adapters(names, rank, modules, seed, shared)
        self._call(["synthetic", list(names), rank, list(modules), seed, shared])

    def remove_adapter(self, name: str) -> None:
        if self._direct():
            return super().remove_adapter(name)
        self._call(["remove", name])

    def logits(self, token_ids: list, adapter: Optional[str]) -> np.ndarray:
        if self._direct():
            return super().logits(token_ids, adapter)
        with self._lock:
            self._publish("logits", [[int(t) for t in token_ids], adapter])
            return super().logits(token_ids, adapter)

    def _queue(self, cmd: list, local=None, future: Optional[Future] = None) -> None:
        if self.failure is not None:
            raise ProcessLost(self.failure)
        self._commands.append((cmd, local, future))
        self._new_work.set()

    def _call(self, cmd: list, local=None):
        """Queue a command and wait until a step applied it; raises what applying it raised."""
        future: Future = Future()
        self._queue(cmd, local, future)
        while not future.done() and not self.running:  # no background loop: run the step that applies it here
            self.step()
        return future.result()

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> list:
        if self.channel is None:
            return super().step()
        with self._lock:
            self._publish("step")
            try:
                return super().step()
            except Exception as e:
                # It may have run elsewhere: the processes can no longer be trusted to hold the same state.
                # A collective's error seldom says which process is gone: give the heartbeats time to tell.
                self.failed.wait(self.timeout_s + 4 * _beat_interval(self.timeout_s))
                self._fail(f"a step failed on process 0: {type(e).__name__}: {e}")
                raise

    def has_work(self) -> bool:
        return bool(self._commands) or super().has_work()

    @property
    def running(self) -> bool:
        return super().running and self.failure is None

    def _publish(self, do: str, args=None) -> None:
        """Apply the queued commands here, then send them, and what to do next, to every follower."""
        if self.failure is not None:
            raise ProcessLost(self.failure)
        if self._released:
            raise ConfigError("process 0 released its followers (stop()): a multi-process engine ends there")
        batch = self._take_commands() + [(["abort", r.id], None, None) for r in self._early_aborts()]
        self._applying = threading.get_ident()
        try:
            errors = [self._apply(cmd, local) for cmd, local, _ in batch]
        finally:
            self._applying = None
        msg = {"do": do, "args": args, "digest": self.digest, "cmds": [cmd for cmd, _, _ in batch],
               "errors": [None if e is None else type(e).__name__ for e in errors]}
        try:
            self.channel.publish(self._seq, json.dumps(msg, default=lambda x: x.item()))  # numpy scalars
        except Exception as e:
            reason = f"process 0 cannot send step {self._seq} to the other processes: {_status(e)}"
            self._fail(reason)
            raise ProcessLost(reason) from None
        self._blobs += [(self._seq, cmd[2]) for cmd, _, _ in batch if cmd[0] == "weights"]
        self._seq += 1
        self._released = do == "stop"
        for (_, _, future), e in zip(batch, errors):
            if future is not None:
                future.set_exception(e) if e is not None else future.set_result(None)

    def _early_aborts(self) -> list:
        """Waiting requests past early_abort_s without a token (the scheduler's rule, by process 0's clock)."""
        limit = self.ecfg.early_abort_s
        if limit is None:
            return []
        now = time.monotonic()
        return [r for r in self.scheduler.waiting if now - r.arrival > limit and not r.num_generated]

    def stop(self) -> None:
        """Stop the background loop and release the followers (their follow() returns): the end of serving."""
        if self.failure is not None:  # its thread may be stuck in a collective for good: do not wait for it
            self._stop = True
            return
        super().stop()
        if self.channel is not None and not self._released and self.failure is None:
            try:
                with self._lock:
                    self._publish("stop")
            except SloraError as e:  # lost meanwhile: `failure` says why
                log.warning("could not release the followers: %s", e)
            self._quit.set()

    def _step_failed(self, error: Exception) -> None:
        if self.channel is None:
            return super()._step_failed(error)
        self._fail(f"a step failed on process 0: {type(error).__name__}: {error}")  # no-op if step() did

    def _take_commands(self) -> list:
        """Every queued command, in order (other threads may queue, and a failing engine drop, meanwhile)."""
        taken = []
        while True:
            try:
                taken.append(self._commands.popleft())
            except IndexError:
                return taken

    def _drop_commands(self, reason: str) -> list:
        queued = []
        for cmd, local, future in self._take_commands():
            if future is not None:
                future.set_exception(ProcessLost(reason))
            if cmd[0] == "request":
                queued.append(local)
        return queued

    # -- the monitor --------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Read the heartbeats every beat; fail the engine if one stops or reports an error; delete the
        messages (and adapter weights) that every follower has read."""
        followers = range(1, self.channel.num_processes)
        start = time.monotonic()
        last = {p: (None, start) for p in followers}  # last heartbeat seen, and when it changed
        read = {p: 0 for p in followers}
        forgotten = 0
        while not self._quit.wait(_beat_interval(self.timeout_s)):
            now = time.monotonic()
            try:
                beats = self.channel.beats()
            except Exception as e:
                return self._fail(f"process 0 cannot read the key-value store: {_status(e)}")
            for p in followers:
                text = beats.get(p)
                if text is not None and text != last[p][0]:
                    last[p] = (text, now)
                    beat = json.loads(text)
                    if beat.get("error"):
                        return self._fail(f"process {p} failed: {beat['error']}")
                    read[p] = beat["read"]
                elif now - last[p][1] > self.timeout_s:
                    return self._fail(
                        f"process {p} of {self.channel.num_processes} stopped responding (no heartbeat for "
                        f"{now - last[p][1]:.1f} s, the limit is {self.timeout_s:g} s): it died or hangs (see its "
                        "log), and no step can run without it")
            forgotten = self._forget(forgotten, min(read.values(), default=self._seq))

    def _forget(self, start: int, upto: int) -> int:
        """Delete messages [start, upto) and the adapter weights they carried; returns where to start next."""
        try:
            for seq in range(start, upto):
                self.channel.delete(f"{self.channel.ns}/msg/{seq}")
            while self._blobs and self._blobs[0][0] < upto:
                self.channel.delete(self._blobs.pop(0)[1])
        except Exception as e:  # the store is going away: the heartbeats will tell
            log.debug("deleting read messages failed: %s", _status(e))
            return start
        return upto


class Follower(_Mirrored):
    """Every other process's engine. `follow()` runs the steps process 0 publishes, and only those."""

    def follow(self, timeout_s: float = 10.0, startup_timeout_s: float = STARTUP_TIMEOUT_S,
               channel: Optional[Channel] = None) -> None:
        """Mirror process 0 until it stops (returns) or is lost, or this process diverges (ProcessLost)."""
        if self.channel is not None:
            raise ConfigError("this process already follows process 0")
        _check_mesh(self)
        self.channel, self.timeout_s = channel or Channel(), timeout_s
        self.scheduler.early_abort_s = None  # process 0 sends its early aborts
        self._ids = itertools.count(FOLLOWER_IDS)
        beats = threading.Thread(target=self._beat, name="slora-multihost-heartbeat", daemon=True)
        beats.start()
        try:
            self.channel.barrier("follow", startup_timeout_s)
            log.info("process %d follows process 0", self.channel.process_id)
            while self._follow_one():
                pass
        except Exception as e:
            reason = e.message if isinstance(e, ProcessLost) else \
                f"a step failed on process {self.channel.process_id}: {type(e).__name__}: {e}"
            self._error = reason
            try:
                self._send_beat()  # process 0 reads why at its next look, instead of waiting for the timeout
            except Exception:
                pass
            self._fail(reason)
            raise ProcessLost(reason) from e
        finally:
            self._quit.set()
            beats.join()

    def _accept(self, req: Request) -> None:
        if self.channel is not None:
            raise ConfigError(f"process {self.channel.process_id} follows process 0: send requests to process 0")
        super()._accept(req)

    def _follow_one(self) -> bool:
        """Receive the next message, apply its commands, do what it says; False once process 0 stops."""
        pid = self.channel.process_id
        with self._lock:
            text = self.channel.receive(self._seq, POLL_S)
            if text is None:
                if self.failure is not None:
                    raise ProcessLost(self.failure)
                return True
            msg = json.loads(text)
            self._seq += 1
            if msg["digest"] != self.digest:
                raise ProcessLost(f"process {pid} diverged from process 0: it read other sampled tokens (token digest "
                                  f"{self.digest} here, {msg['digest']} on process 0)")
            for cmd, theirs in zip(msg["cmds"], msg["errors"]):
                e = self._apply(cmd)
                mine = None if e is None else type(e).__name__
                if mine != theirs:
                    if e is not None:  # the details (a path, say) stay in this process's log
                        log.error("process %d: %s: %s: %s", pid, _describe(cmd), mine, e)
                    here = f"failed here ({mine}, see its log)" if e is not None else "succeeded here"
                    there = f"failed on process 0 ({theirs})" if theirs else "succeeded on process 0"
                    hint = ": every process must read adapters from the same path" if cmd[0] == "load" else ""
                    raise ProcessLost(f"process {pid} diverged from process 0: {_describe(cmd)} {here} but "
                                      f"{there}{hint}")
            if msg["do"] == "stop":
                return False
            if msg["do"] == "logits":
                try:
                    Engine.logits(self, *msg["args"])
                except SloraError:  # raised on process 0 too
                    pass
            else:
                Engine.step(self)
            return True

    def _beat(self) -> None:
        """Overwrite this process's heartbeat every beat; fail if process 0's store stays out of reach."""
        last_ok = time.monotonic()
        while True:
            try:
                self._send_beat()
                last_ok = time.monotonic()
            except Exception as e:
                if time.monotonic() - last_ok > self.timeout_s:
                    return self._fail(f"process {self.channel.process_id} lost process 0 (the coordinator): {_status(e)}")
            if self._quit.wait(_beat_interval(self.timeout_s)):
                return

    def _send_beat(self) -> None:
        self._beats += 1
        self.channel.beat(json.dumps({"n": self._beats, "read": self._seq, "error": self._error}))
