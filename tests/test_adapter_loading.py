"""Every refusal of the PEFT loader, with its message; a refused adapter registers nothing."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from slora_jax import LLM, AdapterError
from slora_jax.adapters.peft import load_peft_adapter
from slora_jax.config import load_model_config

CFG, _ = load_model_config("tiny")
PREFIX = "base_model.model.model.layers"


def write_adapter(d, r=4, modules=("q_proj", "v_proj"), config=None, tensors=None, nan=False):
    os.makedirs(d, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(modules)}
    cfg.update(config or {})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    if tensors is None:
        rng = np.random.default_rng(0)
        tensors = {}
        for layer in range(CFG.num_layers):
            for m in modules:
                d_in, d_out = CFG.module_shape(m)
                group = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                tensors[f"{PREFIX}.{layer}.{group}.{m}.lora_A.weight"] = rng.normal(size=(r, d_in)).astype(np.float32)
                tensors[f"{PREFIX}.{layer}.{group}.{m}.lora_B.weight"] = rng.normal(size=(d_out, r)).astype(np.float32)
    if nan:
        k = next(iter(tensors))
        tensors[k][0, 0] = np.nan
    save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
    return str(d)


def load(d, max_rank=16):
    return load_peft_adapter("x", d, CFG, max_rank)


def test_valid_adapter_loads(tmp_path):
    lw = load(write_adapter(tmp_path / "ok"))
    assert lw.ranks == {"q_proj": 4, "v_proj": 4}


def test_pickle_only_refused(tmp_path):
    d = write_adapter(tmp_path / "p")
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    open(os.path.join(d, "adapter_model.bin"), "wb").write(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterError, match="pickle weights.*refusing to unpickle"):
        load(d)


def test_missing_files(tmp_path):
    with pytest.raises(AdapterError, match="not a directory"):
        load(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load(str(tmp_path / "empty"))


@pytest.mark.parametrize("config,msg", [
    ({"peft_type": "IA3"}, "peft_type IA3 is not supported"),
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "LoRA biases"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "lm_head"]}, r"target_modules \['lm_head'\] are not supported"),
])
def test_unsupported_configs_refused(tmp_path, config, msg):
    with pytest.raises(AdapterError, match=msg):
        load(write_adapter(tmp_path / "a", config=config))


def test_unsupported_module_weights_refused(tmp_path):
    t = {"base_model.model.lm_head.lora_A.weight": np.zeros((4, 128), np.float32)}
    with pytest.raises(AdapterError, match="not a LoRA A/B weight of a Llama projection"):
        load(write_adapter(tmp_path / "a", tensors=t))


def test_shape_mismatch_refused(tmp_path):
    t = {f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": np.ones((4, 100), np.float32),
         f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": np.ones((128, 4), np.float32)}
    with pytest.raises(AdapterError, match=r"lora_A \(4, 100\).*need lora_A \(4, 128\)"):
        load(write_adapter(tmp_path / "a", modules=("q_proj",), tensors=t))


def test_layer_out_of_range_refused(tmp_path):
    t = {f"{PREFIX}.7.self_attn.q_proj.lora_A.weight": np.ones((4, 128), np.float32),
         f"{PREFIX}.7.self_attn.q_proj.lora_B.weight": np.ones((128, 4), np.float32)}
    with pytest.raises(AdapterError, match="layer 7 does not exist in a 2-layer base model"):
        load(write_adapter(tmp_path / "a", modules=("q_proj",), tensors=t))


def test_rank_above_max_refused(tmp_path):
    with pytest.raises(AdapterError, match="rank 32, above max_rank=16"):
        load(write_adapter(tmp_path / "a", r=32))


def test_nan_refused(tmp_path):
    with pytest.raises(AdapterError, match="NaN or inf"):
        load(write_adapter(tmp_path / "a", nan=True))


def test_corrupt_safetensors_refused(tmp_path):
    d = write_adapter(tmp_path / "a")
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(b"garbage" * 10)
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        load(d)


def test_missing_b_refused(tmp_path):
    t = {f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": np.ones((4, 128), np.float32)}
    with pytest.raises(AdapterError, match="has lora_A but no lora_B"):
        load(write_adapter(tmp_path / "a", modules=("q_proj",), tensors=t))


def test_refused_adapter_registers_nothing(tmp_path):
    llm = LLM("tiny", dtype="float32", kernels="xla", max_rank=16, num_pages=64)
    with pytest.raises(AdapterError):
        llm.load_adapter("bad", write_adapter(tmp_path / "a", r=32))
    assert llm.adapters() == []
    llm.load_adapter("good", write_adapter(tmp_path / "b"))
    with pytest.raises(AdapterError, match="already registered"):
        llm.load_adapter("good", write_adapter(tmp_path / "b"))
    assert [a["name"] for a in llm.adapters()] == ["good"]
    assert llm.stats()["pages_free"] == 64


def test_add_adapter_pytree_validation():
    llm = LLM("tiny", dtype="float32", kernels="xla", max_rank=8, num_pages=64)
    with pytest.raises(AdapterError, match="module 'lm_head' is not supported"):
        llm.add_adapter("a", {"0.lm_head": (np.zeros((128, 2)), np.zeros((2, 320)))})
    with pytest.raises(AdapterError, match="layer 5 out of range"):
        llm.add_adapter("a", {"5.q_proj": (np.zeros((128, 2)), np.zeros((2, 128)))})
    with pytest.raises(AdapterError, match="rank 9, above max_rank=8"):
        llm.add_adapter("a", {"0.q_proj": (np.zeros((128, 9)), np.zeros((9, 128)))})
    with pytest.raises(AdapterError, match=r"needs A \[128, r\]"):
        llm.add_adapter("a", {"0.q_proj": (np.zeros((100, 2)), np.zeros((2, 128)))})
    assert llm.adapters() == []
