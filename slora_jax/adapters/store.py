"""Host-memory store of every registered adapter (thousands).

Each adapter is one compact [L, n_rows, W] buffer in the pool's row layout
(memory/layout.py), so a swap-in is one host->device transfer plus one
donated scatter. Buffers live in JAX `pinned_host` memory where the backend
has it: on the H200, host->device runs at ~48 GB/s from pinned buffers and
~9 GB/s from pageable numpy. The host copy is the source of truth; the device
pool only caches resident adapters.

Each entry carries a digest of its weights (`weights_digest`, computed once at
registration): the adapter's identity for the prefix cache, whose KV blocks
are keyed by it and never by the name, so a name re-registered with other
weights never meets the old weights' KV.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import parallel
from ..config import LORA_MODULES, ModelConfig
from ..memory import layout
from .lora import AdapterError, LoraWeights


@dataclasses.dataclass
class AdapterEntry:
    name: str
    ranks: dict  # module -> rank
    n_rows: int
    buffer: object  # [L, n_rows, W]: a pinned_host jax array, or numpy
    source: str = "pytree"
    digest: bytes = b""  # weights_digest: what its KV depends on, never its name

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.buffer.shape)) * self.buffer.dtype.itemsize


def weights_digest(packed: np.ndarray, ranks: dict) -> bytes:
    """16-byte blake2b of an adapter's packed rows (scaling is folded into them), ranks and dtype: equal
    digests mean equal weights, whatever the names."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((sorted(ranks.items()), str(packed.dtype), tuple(packed.shape))).encode())
    if packed.size:
        h.update(np.ascontiguousarray(packed).view(np.uint8))
    return h.digest()


def pinned_sharding(device=None, like=None):
    """A pinned_host sharding on `device`, or None where the backend has no such memory. `like`: a
    device sharding to mirror (a tensor-parallel pool's), so that each device's slice of a buffer is
    pinned next to it and a swap-in is one plain host->device copy per device."""
    device = device or (next(iter(like.addressable_devices)) if like is not None else jax.devices()[0])
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except Exception:
        return None
    if "pinned_host" not in kinds or device.platform == "cpu":
        return None
    if like is not None:
        return like.with_memory_kind("pinned_host")
    return jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")


@functools.lru_cache(maxsize=None)
def _mover(sharding):
    return jax.jit(lambda x: x, out_shardings=sharding)


def to_device(buffer, sharding):
    """Host buffer (numpy or pinned_host array) -> device memory under `sharding`, asynchronously.

    jax 0.11's device_put can refuse a pinned_host buffer bound for its own device ("Memory kind
    mismatch"); an identity jit whose output lives in device memory then does the move."""
    if isinstance(buffer, np.ndarray):
        return parallel.put(buffer, sharding)
    target = sharding.with_memory_kind("device")
    try:
        return jax.device_put(buffer, target)
    except ValueError:
        return _mover(target)(buffer)


class AdapterStore:
    def __init__(self, cfg: ModelConfig, max_rank: int, dtype, pinned: Optional[bool] = None, tp: int = 1,
                 pool_sharding=None, lora_tp: str = "replicated"):
        # tp, lora_tp: buffers are packed for a pool split over tp devices with that adapter layout
        # (layout.pack; the engine's PoolLayout has the same module_rows), and pinned split like the pool
        # (pool_sharding)
        self.cfg, self.max_rank, self.dtype, self.tp, self.lora_tp = cfg, max_rank, jnp.dtype(dtype), tp, lora_tp
        self.module_rows = layout.all_module_rows(cfg, tp, lora_tp)
        self._pinned = pinned_sharding(like=pool_sharding) if pinned is not False else None
        self._entries: dict[str, AdapterEntry] = {}
        self._targeted: set = set()  # modules any adapter ever registered targets (grows only)
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> AdapterEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise AdapterError(f"adapter {name!r} is not registered") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def target_modules(self) -> tuple:
        """The modules (config.LORA_MODULES order) that any adapter registered so far targets. It never
        shrinks: removing an adapter must not change the step programs (each set compiles its own)."""
        return tuple(m for m in LORA_MODULES if m in self._targeted)

    def host_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def _host_buffer(self, packed: np.ndarray):
        if self._pinned is None:
            return packed
        return parallel.put(packed, self._pinned)

    def add(self, lw: LoraWeights, replace: bool = False) -> AdapterEntry:
        lw.validate(self.cfg, self.max_rank)
        packed = layout.pack(self.cfg, lw.modules, self.dtype, self.tp, self.lora_tp)
        entry = AdapterEntry(lw.name, lw.ranks, packed.shape[1], self._host_buffer(packed), lw.source,
                             weights_digest(packed, lw.ranks))
        return self._insert(entry, replace)

    def _insert(self, entry: AdapterEntry, replace: bool) -> AdapterEntry:
        with self._lock:
            if entry.name in self._entries and not replace:
                raise AdapterError(f"adapter {entry.name!r} is already registered")
            self._entries[entry.name] = entry
            self._targeted.update(m for m, r in entry.ranks.items() if r > 0)
        return entry

    def remove(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            raise AdapterError(f"adapter {name!r} is not registered")
        return entry

    def add_synthetic(self, names: Iterable[str], rank: int, modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                      seed: int = 0, std: float = 0.01, shared: bool = False) -> list[AdapterEntry]:
        """Random adapters for benchmarks, generated fast without disk.

        One random template per call; each adapter gets its own buffer: a copy
        of the template with its first row scaled by a per-adapter factor
        (distinct weights; a copy runs at memory speed, bf16 arithmetic in numpy
        does not). `shared=True` makes them all alias one buffer: a swap-in moves
        the same bytes, but host memory holds one copy (benchmarks with more
        adapters than host memory); being the same weights, they then share one
        identity, so one's cached prefix blocks serve the others. The rows are random in the packed
        layout itself, so the A/B they stand for differ with the tp and lora_tp they are packed for
        (layout.pack); under lora_tp="replicated" each device's copy of a whole row is random too, so
        the devices do not agree on one A/B (the step costs the same; benchmarks need no more).
        """
        if rank > self.max_rank:
            raise AdapterError(f"rank {rank} is above max_rank={self.max_rank}")
        ranks = {m: rank for m in LORA_MODULES if m in modules}
        n_rows = layout.count_rows(self.module_rows, ranks)
        rng = np.random.default_rng(seed)
        template = (rng.standard_normal((self.cfg.num_layers, n_rows, layout.row_width(self.cfg)), np.float32)
                    * std).astype(self.dtype)
        out = []
        one = self._host_buffer(template) if shared else None
        # the weights are the template and a factor: digest the template once (thousands of adapters)
        base = weights_digest(template, ranks)
        for i, name in enumerate(names):
            if shared:
                out.append(self._insert(AdapterEntry(name, dict(ranks), n_rows, one, "synthetic-shared", base),
                                        False))
                continue
            packed = template.copy()
            packed[:, 0] = template[:, 0] * self.dtype.type(1.0 + 0.001 * (i % 997))
            digest = hashlib.blake2b(base + b"%d" % (i % 997), digest_size=16).digest()
            out.append(self._insert(AdapterEntry(name, dict(ranks), n_rows, self._host_buffer(packed),
                                                 "synthetic", digest), replace=False))
        return out
