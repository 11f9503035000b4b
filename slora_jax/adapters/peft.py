"""Read a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).

Everything is checked before anything is returned, so a refused adapter loads
nothing. Supported: r, lora_alpha, rank_pattern, alpha_pattern (keys matched as
PEFT does: a module-name suffix, or a regex), use_rslora, target_modules (list
or regex), fan_in_fan_out (ignored for Llama's nn.Linear, as PEFT itself does).
Refused: pickle weights, non-LoRA PEFT types, DoRA, LoRA biases,
modules_to_save, modules other than the Llama projections, wrong shapes, ranks
above max_rank, NaN/inf weights.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from ..config import LORA_MODULES, ModelConfig
from ..errors import InvalidAdapter
from .lora import LoraWeights, stack_layers

_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's lookup: the first key that equals a suffix of the module name or matches it as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def read_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isdir(adapter_dir):
        raise InvalidAdapter(f"adapter path {adapter_dir!r} is not a directory")
    if not os.path.exists(path):
        raise InvalidAdapter(f"{adapter_dir!r} has no adapter_config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise InvalidAdapter(f"{path}: invalid JSON ({e})") from None
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InvalidAdapter(f"{adapter_dir!r}: peft_type {peft_type} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise InvalidAdapter(f"{adapter_dir!r}: DoRA adapters (use_dora=true) are not supported")
    if cfg.get("lora_bias"):
        raise InvalidAdapter(f"{adapter_dir!r}: LoRA biases (lora_bias=true) are not supported")
    if cfg.get("modules_to_save"):
        raise InvalidAdapter(f"{adapter_dir!r}: modules_to_save={cfg['modules_to_save']} is not supported "
                           "(the adapter would replace base weights)")
    for key in ("target_parameters", "trainable_token_indices"):
        if cfg.get(key):
            raise InvalidAdapter(f"{adapter_dir!r}: {key}={cfg[key]} is not supported")
    return cfg


def _targets(cfg: dict) -> list[str]:
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        return [m for m in LORA_MODULES if re.fullmatch(tm, m) or re.search(rf"(^|\.){re.escape(m)}$", tm)]
    names = list(tm or [])
    bad = [n for n in names if n.split(".")[-1] not in LORA_MODULES]
    if bad:
        raise InvalidAdapter(f"target_modules {bad} are not supported (supported: {', '.join(LORA_MODULES)})")
    return [n.split(".")[-1] for n in names]


def load_peft_adapter(name: str, adapter_dir: str, cfg: ModelConfig, max_rank: int) -> LoraWeights:
    from safetensors import SafetensorError, safe_open

    pcfg = read_config(adapter_dir)
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.exists(weights):
        pickled = [f for f in os.listdir(adapter_dir) if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
        if pickled:
            raise InvalidAdapter(f"{adapter_dir!r} holds only pickle weights ({pickled[0]}); "
                               "refusing to unpickle: save the adapter with safe_serialization=True")
        raise InvalidAdapter(f"{adapter_dir!r} has no adapter_model.safetensors")
    targets = set(_targets(pcfg))
    r_default = int(pcfg.get("r", 8))
    alpha_default = float(pcfg.get("lora_alpha", r_default))
    rank_pattern = pcfg.get("rank_pattern") or {}
    alpha_pattern = pcfg.get("alpha_pattern") or {}
    rslora = bool(pcfg.get("use_rslora", False))

    tensors: dict = {}
    try:
        with safe_open(weights, framework="numpy") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if not m:
                    raise InvalidAdapter(f"{adapter_dir!r}: tensor {key!r} is not a LoRA A/B weight of a Llama "
                                       f"projection (supported modules: {', '.join(LORA_MODULES)})")
                layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
                if module not in LORA_MODULES:
                    raise InvalidAdapter(f"{adapter_dir!r}: module {module!r} is not supported "
                                       f"(supported: {', '.join(LORA_MODULES)})")
                if layer >= cfg.num_layers:
                    raise InvalidAdapter(f"{adapter_dir!r}: layer {layer} does not exist in a "
                                       f"{cfg.num_layers}-layer base model")
                tensors[(layer, module, ab)] = f.get_tensor(key).astype(np.float32)
    except SafetensorError as e:
        raise InvalidAdapter(f"{weights}: not a valid safetensors file ({e})") from None
    if not tensors:
        raise InvalidAdapter(f"{adapter_dir!r}: adapter_model.safetensors holds no LoRA weights")

    per_module: dict = {}
    for (layer, module, ab), arr in tensors.items():
        if ab == "B":
            continue
        if (layer, module, "B") not in tensors:
            raise InvalidAdapter(f"{adapter_dir!r}: layer {layer} {module} has lora_A but no lora_B")
        if targets and module not in targets:
            raise InvalidAdapter(f"{adapter_dir!r}: weights for {module} but target_modules is {sorted(targets)}")
        a_t, b_t = arr, tensors[(layer, module, "B")]  # PEFT: A [r, in], B [out, r]
        full = f"model.layers.{layer}.{'self_attn' if module.endswith(('q_proj','k_proj','v_proj','o_proj')) else 'mlp'}.{module}"
        r = int(_pattern_value(rank_pattern, full, r_default))
        alpha = float(_pattern_value(alpha_pattern, full, alpha_default))
        d_in, d_out = cfg.module_shape(module)
        if a_t.ndim != 2 or b_t.ndim != 2 or a_t.shape != (r, d_in) or b_t.shape != (d_out, r):
            raise InvalidAdapter(
                f"{adapter_dir!r}: layer {layer} {module} has lora_A {tuple(a_t.shape)} and lora_B "
                f"{tuple(b_t.shape)}; the base model and r={r} need lora_A ({r}, {d_in}) and lora_B ({d_out}, {r})")
        if r > max_rank:
            raise InvalidAdapter(f"{adapter_dir!r}: layer {layer} {module} has rank {r}, above max_rank={max_rank}")
        if not (np.isfinite(a_t).all() and np.isfinite(b_t).all()):
            raise InvalidAdapter(f"{adapter_dir!r}: layer {layer} {module} has NaN or inf weights")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        per_module.setdefault(module, {})[layer] = (a_t.T, b_t.T * scale)
    lw = LoraWeights(name, stack_layers(name, per_module, cfg), source=adapter_dir)
    lw.validate(cfg, max_rank)
    return lw
