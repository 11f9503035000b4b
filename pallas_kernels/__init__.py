"""Kernels over the unified pool: segmented LoRA and paged attention.

`kernel_set(backend)` is the one place a backend is chosen; the model calls only the `KernelSet` it
returns. Backends:

    "xla"     the pure-jnp references of `reference` (any device)
    "triton"  `gpu.lora` and `gpu.attention`: Pallas' Triton lowering (compiled on a GPU, Pallas'
              interpret mode elsewhere)
    "mosaic"  `tpu.lora` and `tpu.attention`: Pallas' TPU lowering (compiled on a TPU, TPU interpret
              mode elsewhere); shapes the Mosaic kernels cannot tile (pool width or head_dim not a
              multiple of 128, pages that do not start a whole sublane tile, LoRA index tables past
              the SMEM budget) run the reference instead, with a warning
    "auto"    xla on CPU, triton on GPU, mosaic on TPU
    "pallas"  this device's Pallas kernels: mosaic on TPU, else triton (interpret mode on CPU)

"triton-interpret" and "mosaic-interpret" (or ``interpret=True``) force interpret mode.

Layout: `common` (shape helpers, interpret defaults, the argument checks every kernel shares),
`reference` (the jnp specification of every op and of the pool layout), `gpu/` and `tpu/` (one
backend's kernels and their wrappers per module). Nothing here imports `slora_jax`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, Optional

import jax

from . import common, reference
from .gpu import attention as gpu_attention
from .gpu import lora as gpu_lora
from .tpu import attention as tpu_attention
from .tpu import lora as tpu_lora

__all__ = ["BACKENDS", "KernelSet", "kernel_set", "resolve_backend"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "pallas", "xla", "triton", "mosaic", "triton-interpret", "mosaic-interpret")


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """The ops a model step needs; hashable so it can be a static jit argument.

    lora_shrink(x, pool, layer, seg_starts, seg_ranks, a_rows, *, partials=False)
    lora_expand_group(ys, v, pool, layer, seg_starts, seg_ranks, b_rows): the expands of the modules
        sharing one shrink (q, k, v; gate, up; or one module) in one call, taking the shrink's split-K
        partial sums (lora_shrink(..., partials=True))
    write_kv(pool, layer, k, v, kv_rows, *, page_rows, num_pages)
    attention_decode(q, pool, layer, block_tables, lengths, *, page_rows, num_pages, scale)
    attention_prefill(q, pool, layer, block_tables, q_starts, kv_lens, *, page_rows, num_pages, scale)
    row_linear(x, w, pool, layer, lora): x @ W + LoRA of a row-parallel linear (o, down), reduced over
        devices, with lora = (seg_starts, ranks, a_rows, b_rows) or None: set only under tensor
        parallelism (slora_jax/model/tp_kernels.py), where the LoRA term must join the base partial sum;
        None = the model composes a matmul with lora_shrink / lora_expand_group.
    """

    name: str
    lora_shrink: Callable
    lora_expand_group: Callable
    write_kv: Callable
    attention_decode: Callable
    attention_prefill: Callable
    row_linear: Optional[Callable] = None


def resolve_backend(backend: str = "auto", interpret: bool | None = None) -> tuple[str, bool]:
    """(family, interpret) that `kernel_set(backend, interpret)` runs on this device: family "xla"
    (interpret False), "triton" or "mosaic"; interpret None = interpret mode where the device cannot
    compile that family."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels must be one of {list(BACKENDS)}, got {backend!r}")
    device = jax.default_backend()
    if backend.endswith("-interpret"):
        if interpret is False:
            raise ValueError(f"kernels={backend!r} contradicts interpret=False")
        backend, interpret = backend.removesuffix("-interpret"), True
    if backend == "auto":
        backend = {"cpu": "xla", "tpu": "mosaic"}.get(device, "triton")
    elif backend == "pallas":
        backend = "mosaic" if device == "tpu" else "triton"
    if backend == "xla":
        return "xla", False
    if backend == "triton":
        return "triton", common.triton_interpret(interpret)
    return "mosaic", common.mosaic_interpret(interpret) is not False


def kernel_set(backend: str = "auto", interpret: bool | None = None) -> KernelSet:
    """The kernels of `backend` (see the module docstring) on this device; one object per resolved
    (family, interpret), so equal choices give the same static jit argument."""
    return _build(*resolve_backend(backend, interpret))


@functools.lru_cache(maxsize=None)
def _build(family: str, interpret: bool) -> KernelSet:
    if family == "xla":
        return KernelSet("xla", reference.lora_shrink, reference.lora_expand_group, reference.write_kv,
                         reference.paged_attention_decode, reference.paged_attention_prefill)
    name = f"{family}-interpret" if interpret else family
    if family == "triton":
        return KernelSet(
            name,
            functools.partial(gpu_lora.lora_shrink, interpret=interpret),
            functools.partial(gpu_lora.lora_expand_group, interpret=interpret),
            reference.write_kv,  # a donated scatter: XLA already does it in place
            functools.partial(gpu_attention.paged_attention_decode, interpret=interpret),
            functools.partial(gpu_attention.paged_attention_prefill, interpret=interpret),
        )
    return _mosaic(name, interpret)


# --------------------------------------------------------------------------- Mosaic routing
def _routed(op: str, kernel: Callable, fallback: Callable, unsupported: Callable) -> Callable:
    """`kernel(*args, **kw)`, or `fallback(*args, **kw)` with a warning when `unsupported(*args, **kw)`
    says why the kernel cannot take these shapes (a static decision: shapes only, once per trace)."""

    def call(*args, **kw):
        reason = unsupported(*args, **kw)
        if reason:
            log.warning("%s: %s; running the XLA reference", op, reason)
            return fallback(*args, **kw)
        return kernel(*args, **kw)

    call.__name__ = op
    return call


def _shrink_reason(x, pool, layer, seg_starts, seg_ranks, a_rows, **_):
    return tpu_lora.shrink_unsupported(pool.shape, a_rows.shape)


def _expand_reason(ys, v, pool, layer, seg_starts, seg_ranks, b_rows, **_):
    return next(filter(None, (tpu_lora.expand_unsupported(pool.shape, rows.shape) for rows in b_rows)), None)


def _attention_reason(q, pool, *_, page_rows, **__):
    return tpu_attention.unsupported_reason(q, pool, page_rows)


def _mosaic(name: str, interpret: bool) -> KernelSet:
    """The Mosaic kernels, each routed to its reference for shapes it cannot tile. The same rules hold in
    TPU interpret mode, so that mode runs what a TPU would."""
    # module attributes are read at call time (not bound here), so tests can stand in for a kernel
    return KernelSet(
        name,
        _routed("lora_shrink", lambda *a, **k: tpu_lora.lora_shrink(*a, interpret=interpret, **k),
                reference.lora_shrink, _shrink_reason),
        _routed("lora_expand", lambda *a, **k: tpu_lora.lora_expand_group(*a, interpret=interpret, **k),
                reference.lora_expand_group, _expand_reason),
        reference.write_kv,
        _routed("paged_attention_decode",
                lambda *a, **k: tpu_attention.paged_attention_decode(*a, interpret=interpret, **k),
                reference.paged_attention_decode, _attention_reason),
        _routed("paged_attention_prefill",
                lambda *a, **k: tpu_attention.paged_attention_prefill(*a, interpret=interpret, **k),
                reference.paged_attention_prefill, _attention_reason),
    )
