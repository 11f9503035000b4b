"""Model and engine configuration: frozen dataclasses read from JSON.

`ModelConfig` reads an HF Llama `config.json` (Llama 2 MHA, Llama 3 GQA with
llama3 rope scaling; transformers 4 `rope_scaling`/`rope_theta` and
transformers 5 `rope_parameters` spellings) or one of our presets in
`configs/`, which use the same keys plus an optional `"engine"` section of
EngineConfig defaults. A model dir's `generation_config.json` adds its eos ids to
config.json's (Llama 3 Instruct stops at `<|eot_id|>`, listed only there).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from .buckets import fill_down
from .errors import ConfigError

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# The linear layers LoRA may target, in the order adapter rows are laid out in the pool.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# How adapters are laid out over tensor-parallel devices (EngineConfig.lora_tp; slora_jax/parallel.py).
LORA_TP = ("replicated", "sharded")

# XLA command buffers (CUDA graphs) for the step programs, by EngineConfig.command_buffers. "default": what
# this jax and XLA do unless told; "off": none; "on": every command type XLA can capture, the Pallas kernels'
# custom calls included, however short the run of them (options of the step programs; no XLA_FLAGS needed).
# On an H100, "on" changed a Llama-3.1-8B decode step at batch 32 by under 1 % (BENCHMARKS.md), so the
# default stays; the option is there for devices and XLA versions where launches do cost the device.
COMMAND_BUFFERS = {
    "default": {},
    "off": {"xla_gpu_enable_command_buffer": ""},
    "on": {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN", "xla_gpu_graph_min_graph_size": 1},
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: Optional[int] = 1
    eos_token_ids: tuple = (2,)
    name: str = "llama"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA-targetable linear."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]

    def num_params(self) -> int:
        per_layer = sum(a * b for a, b in (self.module_shape(m) for m in LORA_MODULES)) + 2 * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size + head + self.hidden_size

    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "llama") -> "ModelConfig":
        arch = d.get("model_type", "llama")
        if arch not in ("llama", "mistral"):
            raise ConfigError(f"model_type {arch!r} is not supported (only Llama-architecture models)")
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            rope_params = dict(d.get("rope_parameters") or {})
            scaling = d.get("rope_scaling") or None
            if scaling is None and rope_params.get("rope_type", "default") != "default":
                scaling = rope_params
            if scaling is not None:
                scaling = dict(scaling)
                kind = scaling.get("rope_type", scaling.get("type"))
                if kind not in ("llama3", "default"):
                    raise ConfigError(f"rope scaling type {kind!r} is not supported (only 'llama3')")
                scaling = None if kind == "default" else {**scaling, "rope_type": "llama3"}
            eos = d.get("eos_token_id", 2)
            eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(d.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
                rope_scaling=scaling,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos,
                name=name,
            )
        except KeyError as e:
            raise ConfigError(f"config is missing the key {e.args[0]!r}") from None

    def to_hf_dict(self) -> dict:
        d = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "hidden_act": "silu",
        }
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d

    def rope_inv_freq(self):
        """Inverse RoPE frequencies [head_dim/2] as float64 numpy (llama3 scaling applied)."""
        import numpy as np

        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        s = self.rope_scaling
        if not s:
            return inv
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return np.where(medium, smoothed, scaled)


# The most sequences the default `max_running` lets run at once: its decode buckets (buckets.ladder up to
# it) are compiled in warm-up, so the cap bounds warm-up time, not what a device's memory could hold.
MAX_RUNNING_CAP = 512


def default_max_running(num_pages: int, page_rows: int, seq_len: int, cap: int = MAX_RUNNING_CAP) -> int:
    """How many sequences of `seq_len` tokens the KV pages hold at once, at least 1 and at most `cap`; just a
    batch bucket when that is close below (buckets.fill_down)."""
    pages_per_seq = max(1, math.ceil(seq_len / page_rows))
    return fill_down(max(1, min(cap, num_pages // pages_per_seq)), 4)


@dataclass(frozen=True)
class EngineConfig:
    """Serving knobs. `num_pages=None` sizes the pool from `mem_fraction` of free device memory;
    `max_running=None` runs as many sequences as those pages hold (`with_pages`), so a device with
    more memory runs a larger batch."""

    num_pages: Optional[int] = None
    mem_fraction: float = 0.85
    page_rows: int = 16
    max_rank: int = 64
    max_running: Optional[int] = None  # None: default_max_running(num_pages, ...) once the pool is sized
    max_batch_tokens: int = 2048
    max_model_len: Optional[int] = None  # None: the model's max_position_embeddings, capped by the pool (LLM)
    # the sequence length the default max_running plans a page budget for (None: max_model_len // 2);
    # the scheduler still admits by the pages actually free, so this only sets the batch's upper bound
    running_seq_len: Optional[int] = None
    early_abort_s: Optional[float] = None  # drop waiting requests older than this (S-LoRA's early abort)
    # entries of the LoRA kernels' adapter tables: the most adapters resident at once (None: what the pool
    # could hold, capped; memory/cache.py default_capacity). Fixed at start-up so churn never recompiles.
    max_resident_adapters: Optional[int] = None
    kernels: str = "auto"  # a pallas_kernels backend: auto | pallas | xla | triton | mosaic (pallas_kernels.kernel_set)
    dtype: str = "auto"  # auto: float32 on CPU (exact against HF), bfloat16 on accelerators (LLM resolves it)
    seed: int = 0
    tp: int = 1
    # adapters over the tp devices (parallel.py, docs/tensor_parallel.md): "replicated" = LoRA adds no
    # collective, each device holding one half of every module whole; "sharded" = each device holds 1/tp
    # of every adapter and every LoRA shrink ends in an all-reduce
    lora_tp: str = "replicated"
    # dispatch step N+1 before reading step N's tokens (docs/ARCHITECTURE.md, the host loop); False: read each step's
    # tokens before scheduling the next (simpler to reason about, the device idles while the host works)
    async_steps: bool = True
    # keep full KV pages as cached prefix blocks and reuse them for requests that start alike (memory/cache.py)
    prefix_cache: bool = True
    # XLA command buffers (CUDA graphs) for the step programs: default | on | off (COMMAND_BUFFERS above)
    command_buffers: str = "default"

    def with_pages(self, num_pages: int) -> "EngineConfig":
        """This config once the pool is sized: `num_pages` set, and `max_running` (if None) resolved to the
        sequences of `running_seq_len` tokens those pages hold, up to MAX_RUNNING_CAP. The engine calls it
        where it chooses the number of pages, before it builds anything sized by max_running (the batch
        buckets, the sampled-token rows, the scheduler)."""
        running = self.max_running
        if running is None:
            running = default_max_running(num_pages, self.page_rows, self.running_seq_len or self.max_model_len // 2)
        return dataclasses.replace(self, num_pages=int(num_pages), max_running=int(running))

    def __post_init__(self):
        if self.lora_tp not in LORA_TP:
            raise ConfigError(f"lora_tp must be one of {list(LORA_TP)}, got {self.lora_tp!r}")
        if self.command_buffers not in COMMAND_BUFFERS:
            raise ConfigError(f"command_buffers must be one of {list(COMMAND_BUFFERS)}, "
                              f"got {self.command_buffers!r}")

    def replace(self, **kw: Any) -> "EngineConfig":
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown engine option(s): {sorted(unknown)}")
        return dataclasses.replace(self, **kw)


def resolve_preset(path_or_name: str) -> str:
    """'tiny' or 'configs/tiny.json' or a model dir -> an existing path."""
    if os.path.exists(path_or_name):
        return path_or_name
    cand = os.path.join(CONFIGS_DIR, path_or_name if path_or_name.endswith(".json") else path_or_name + ".json")
    if os.path.exists(cand):
        return cand
    raise ConfigError(f"no model directory or config preset named {path_or_name!r}")


def load_model_config(path_or_name: str) -> tuple[ModelConfig, dict]:
    """Returns (ModelConfig, engine defaults from the preset's "engine" section)."""
    path = resolve_preset(path_or_name)
    cfg_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(cfg_file):
        raise ConfigError(f"{path!r} has no config.json")
    with open(cfg_file) as f:
        d = json.load(f)
    name = os.path.basename(os.path.normpath(path)).removesuffix(".json")
    cfg = ModelConfig.from_hf_dict(d, name=d.get("name", name))
    extra = _generation_eos_ids(path) if os.path.isdir(path) else ()
    if extra:
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + extra)))
    return cfg, dict(d.get("engine", {}))


def _generation_eos_ids(model_dir: str) -> tuple:
    """The eos ids of a model dir's generation_config.json (an int or a list), () without one."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(path):
        return ()
    try:
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"{path}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return tuple(ids)
