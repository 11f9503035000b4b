"""Tensor parallelism: the device mesh and where each array lives on it.

Base weights follow Megatron over the mesh's `tp` axis: q, k, v, gate, up are split by output columns
and o, down by input rows, so a layer needs one all-reduce after each row-parallel linear. The pool
[L, S, W] is split along W: device d holds its kv heads' columns of every K/V page and W/tp columns of
every adapter row. The host page table stays global.

LoRA adds no collective (`lora_tp="replicated"`, the default). Each module's adapter has one half split
like its base weight and one half whole on every device (`lora_widths`):
- column-parallel (q, k, v, gate, up): x is whole on every device, A is whole, so every device computes
  x @ A itself; B is split by output columns like W and gives exactly the device's output columns.
- row-parallel (o, down): device d holds x's feature slice d and A's matching input rows; with B whole,
  x_d @ A_d @ B is a partial [T, hidden] added into the base partial sum before the all-reduce the base
  needs anyway: the sum over devices is x A B.
`lora_tp="sharded"` splits both halves (each device holds 1/tp of every adapter) and pays for it with a
psum of the [M, T, R] shrink result after every shrink (S-LoRA's O(batch x rank) traffic): 4 more
all-reduces per layer with all seven modules targeted. `layout.pack` puts in device d's columns the part
of each A^T / B row that device uses (memory/layout.py); docs/tensor_parallel.md weighs the two layouts.
Kernels run inside `shard_map` on local slices (model/tp_kernels.py); everything else is jit over arrays
placed with the NamedShardings below.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config import LORA_TP, ConfigError, ModelConfig

TP, DP = "tp", "dp"
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")

POOL = P(None, None, TP)  # [L, S, W]: split along the row width
COLS = P(None, TP)  # [T, D] activations split by features
HEADS = P(None, TP, None)  # [T, heads, head_dim]
REP = P()


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Every split dimension must divide evenly: heads (attention and the pool's kv columns), hidden
    (the row-parallel outputs' LoRA slices) and intermediate (gate/up columns, down rows)."""
    if not isinstance(tp, (int, np.integer)) or tp < 1:
        raise ConfigError(f"tp must be a positive integer, got {tp!r}")
    dims = {"num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size}
    bad = [f"{k}={v}" for k, v in dims.items() if v % tp]
    if bad:
        raise ConfigError(f"tp={tp} must divide {', '.join(bad)} of model {cfg.name!r}; "
                          f"valid tp here: {[t for t in range(1, cfg.num_kv_heads + 1) if _divides(cfg, t)]}")


def _divides(cfg: ModelConfig, t: int) -> bool:
    return all(d % t == 0 for d in (cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size, cfg.intermediate_size))


# The half of each module's adapter that every device holds whole, per lora_tp; the other half (both,
# where none is named) is split like the module's base weight.
WHOLE_HALF = {"replicated": {**{m: "A" for m in COLUMN_PARALLEL}, **{m: "B" for m in ROW_PARALLEL}},
              "sharded": {}}


def lora_widths(cfg: ModelConfig, module: str, tp: int, lora_tp: str = "replicated") -> tuple[int, int]:
    """(elements of an A^T row, of a B row) of `module` that each device holds: the full row of a whole
    half (WHOLE_HALF), 1/tp of it for a split one. A^T rows have d_in elements (A's columns), B rows d_out."""
    if lora_tp not in WHOLE_HALF:
        raise ConfigError(f"lora_tp must be one of {list(LORA_TP)}, got {lora_tp!r}")
    if module not in COLUMN_PARALLEL + ROW_PARALLEL:
        raise ValueError(f"{module!r} is not a LoRA target module")
    d_in, d_out = cfg.module_shape(module)
    whole = WHOLE_HALF[lora_tp].get(module)
    return (d_in if whole == "A" else d_in // tp), (d_out if whole == "B" else d_out // tp)


def make_mesh(cfg: ModelConfig, tp: int, devices: Optional[Sequence] = None) -> Mesh:
    """A (dp=1, tp) mesh over the first `tp` of `devices` (default: all devices, every host's under
    jax.distributed). The dp axis is there for data parallelism later; nothing is split over it yet."""
    check_tp(cfg, tp)
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < tp:
        raise ConfigError(f"tp={tp} needs {tp} devices but only {len(devices)} are available "
                          "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts)")
    grid = np.array(devices[:tp]).reshape(1, tp)
    try:  # Auto axes: jit places what the shard_maps do not (newer jax may default to Explicit)
        from jax.sharding import AxisType

        return Mesh(grid, (DP, TP), axis_types=(AxisType.Auto, AxisType.Auto))
    except (ImportError, TypeError):
        return Mesh(grid, (DP, TP))


def param_spec(path) -> P:
    """PartitionSpec of one model parameter, from the names on its pytree path."""
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    if names & set(COLUMN_PARALLEL):
        return P(None, TP)  # [in, out]: output columns
    if names & set(ROW_PARALLEL):
        return P(TP, None)  # input rows
    return REP  # embeddings, norms, lm_head: small next to the layers, kept whole on every device


def param_sharding(mesh: Optional[Mesh], path):
    """Where one parameter goes: its NamedSharding on `mesh`, or None (the default device) without one."""
    return None if mesh is None else NamedSharding(mesh, param_spec(path))


def place_params(state, mesh: Mesh):
    """Put every parameter on the mesh with its sharding (no move for arrays the loaders put there)."""
    shardings = jax.tree_util.tree_map_with_path(lambda path, _: param_sharding(mesh, path), state)
    return jax.device_put(state, shardings)


def pool_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, POOL)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, REP)


def put(tree, sharding):
    """Host arrays (the same in every process) -> device arrays under `sharding`. Across hosts each
    process fills only its own devices: device_put would first compare the values between processes,
    a collective per array per step."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(one, tree)


def to_host(x) -> np.ndarray:
    """A replicated result as numpy. Across hosts (jax.distributed) an array spans devices this process
    cannot address, and np.asarray refuses it; every device holds the whole value, so read a local one."""
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))
