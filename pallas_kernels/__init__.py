"""Kernels over the unified pool: segmented LoRA and paged attention.

One entry point per op; `kernel_set(mode)` picks the implementation:
"xla" runs the pure-jnp references, "pallas" the Pallas kernels (compiled on
GPU/TPU, interpret mode on CPU), "auto" Pallas on accelerators and the
references on CPU. On a TPU backend the `attention` entry points route decode
and prefill to the Mosaic kernels (`attention_tpu`, `attention_tpu_prefill`),
falling back to the references for shapes those cannot tile.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax

from . import reference


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """The ops a model step needs; hashable so it can be a static jit argument."""

    name: str
    lora_shrink: Callable
    # the expands of the modules sharing one shrink (q, k, v; gate, up; or one module) in one launch,
    # taking the shrink's split-K partial sums (lora_shrink(..., partials=True))
    lora_expand_group: Callable
    write_kv: Callable
    attention_decode: Callable
    attention_prefill: Callable
    # x @ W + LoRA of a row-parallel linear (o, down), reduced over devices: set only under tensor
    # parallelism (slora_jax.parallel), where the LoRA term must join the base partial sum; None = the
    # model composes a matmul with lora_shrink/lora_expand_group
    row_linear: Optional[Callable] = None


def resolve_mode(mode: str) -> str:
    if mode not in ("auto", "pallas", "xla"):
        raise ValueError(f"kernels must be 'auto', 'pallas' or 'xla', got {mode!r}")
    if mode == "auto":
        return "xla" if jax.default_backend() == "cpu" else "pallas"
    return mode


@functools.lru_cache(maxsize=None)
def kernel_set(mode: str = "auto") -> KernelSet:
    mode = resolve_mode(mode)
    if mode == "xla":
        return KernelSet(
            "xla",
            reference.lora_shrink,
            reference.lora_expand_group,
            reference.write_kv,
            reference.paged_attention_decode,
            reference.paged_attention_prefill,
        )
    from . import attention, lora

    return KernelSet(
        "pallas",
        lora.lora_shrink,
        lora.lora_expand_group,
        reference.write_kv,  # a donated scatter: XLA already does it in place
        attention.paged_attention_decode,
        attention.paged_attention_prefill,
    )
