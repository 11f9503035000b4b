"""Host-side LoRA weights in one canonical form, whatever their source.

`LoraWeights.modules[m] = (A, B)` with A: [L, in, r_m], B: [L, r_m, out] as
float32 numpy, the scaling (alpha / r, or alpha / sqrt(r) for rsLoRA, per layer
and module) already folded into B. Folding makes rank/alpha patterns that vary
by layer exact at no cost, so the kernels' per-segment scale is 1 for adapters
from PEFT. A layer an adapter does not touch holds zeros (a zero A row
contributes nothing); a module it does not target is absent.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..config import LORA_MODULES, ModelConfig
from ..errors import AdapterError, InvalidAdapter  # noqa: F401  (AdapterError: the base, for the store)


@dataclasses.dataclass
class LoraWeights:
    name: str
    modules: dict  # module -> (A [L, in, r], B [L, r, out]) float32, scaling folded into B
    source: str = "pytree"

    @property
    def ranks(self) -> dict:
        return {m: a.shape[2] for m, (a, _) in self.modules.items()}

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    def validate(self, cfg: ModelConfig, max_rank: int) -> None:
        if not self.modules:
            raise InvalidAdapter(f"adapter {self.name!r} targets no module")
        for m, (a, b) in self.modules.items():
            if m not in LORA_MODULES:
                raise InvalidAdapter(f"adapter {self.name!r}: module {m!r} is not supported (supported: "
                                   f"{', '.join(LORA_MODULES)})")
            d_in, d_out = cfg.module_shape(m)
            r = a.shape[2]
            if a.shape != (cfg.num_layers, d_in, r) or b.shape != (cfg.num_layers, r, d_out):
                raise InvalidAdapter(
                    f"adapter {self.name!r}: {m} has A {a.shape[1:]} and B {b.shape[1:]}, but the base model "
                    f"needs A [{d_in}, r] and B [r, {d_out}]")
            if r < 1:
                raise InvalidAdapter(f"adapter {self.name!r}: {m} has rank 0")
            if r > max_rank:
                raise InvalidAdapter(f"adapter {self.name!r}: {m} has rank {r}, above max_rank={max_rank}")
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise InvalidAdapter(f"adapter {self.name!r}: {m} has NaN or inf weights")


def from_pytree(name: str, params: dict, cfg: ModelConfig, alpha: float | None = None) -> LoraWeights:
    """`params["<layer>.<module>"] = (A [in, r], B [r, out])`; scaling = alpha / r (alpha defaults to r)."""
    per_module: dict = {}
    for key, pair in params.items():
        try:
            layer_s, module = key.split(".", 1)
            layer = int(layer_s)
            a, b = pair
        except (ValueError, TypeError):
            raise InvalidAdapter(f"adapter {name!r}: key {key!r} must be '<layer>.<module>' mapping to (A, B)") from None
        if module not in LORA_MODULES:
            raise InvalidAdapter(f"adapter {name!r}: module {module!r} is not supported")
        if not 0 <= layer < cfg.num_layers:
            raise InvalidAdapter(f"adapter {name!r}: layer {layer} out of range 0..{cfg.num_layers - 1}")
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise InvalidAdapter(f"adapter {name!r}: {key} needs A [in, r] and B [r, out], got {a.shape} and {b.shape}")
        scale = (alpha if alpha is not None else a.shape[1]) / a.shape[1]
        per_module.setdefault(module, {})[layer] = (a, b * scale)
    return LoraWeights(name, stack_layers(name, per_module, cfg), "pytree")


def stack_layers(name: str, per_module: dict, cfg: ModelConfig) -> dict:
    """{module: {layer: (A, B)}} -> {module: (A [L,in,r], B [L,r,out])}, zero-padding smaller ranks."""
    out = {}
    for module, layers in per_module.items():
        d_in, d_out = cfg.module_shape(module)
        r = max(a.shape[1] for a, _ in layers.values())
        big_a = np.zeros((cfg.num_layers, d_in, r), np.float32)
        big_b = np.zeros((cfg.num_layers, r, d_out), np.float32)
        for layer, (a, b) in layers.items():
            if a.shape[0] != d_in or b.shape[1] != d_out:
                raise InvalidAdapter(
                    f"adapter {name!r}: layer {layer} {module} has A {a.shape} and B {b.shape}, but the base "
                    f"model needs A [{d_in}, r] and B [r, {d_out}]")
            big_a[layer, :, : a.shape[1]] = a
            big_b[layer, : b.shape[0], :] = b
        out[module] = (big_a, big_b)
    return out
