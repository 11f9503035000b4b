"""Checkpoint loading (single and sharded safetensors), orbax round trip, config parsing."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from slora_jax import LLM
from slora_jax.config import ConfigError, ModelConfig, load_model_config
from slora_jax.model.weights import load_hf_checkpoint, random_model, restore_params, save_params


def _flat(model):
    return {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_sharded_checkpoint_equals_single(hf_models, tmp_path):
    src = hf_models["gqa"]
    cfg, _ = load_model_config(src)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    out = tmp_path / "sharded"
    out.mkdir()
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out / fname))
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: fn for fn, ks in shards.items() for k in ks}}, f)
    with open(os.path.join(src, "config.json")) as f:
        (out / "config.json").write_text(f.read())
    a = _flat(load_hf_checkpoint(src, cfg, np.float32))
    b = _flat(load_hf_checkpoint(str(out), cfg, np.float32))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # HF [out, in] is stored transposed as [in, out]
    np.testing.assert_array_equal(a[("layers", "0", "q_proj")], tensors["model.layers.0.self_attn.q_proj.weight"].T)


def test_checkpoint_errors(hf_models, tmp_path):
    cfg, _ = load_model_config(hf_models["mha"])
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="only pickle checkpoints"):
        load_hf_checkpoint(str(tmp_path / "pickle"), cfg)
    tensors = load_file(os.path.join(hf_models["mha"], "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    (tmp_path / "partial").mkdir()
    save_file(tensors, str(tmp_path / "partial" / "model.safetensors"))
    with pytest.raises(ConfigError, match="missing 1 tensors"):
        load_hf_checkpoint(str(tmp_path / "partial"), cfg)


def test_orbax_round_trip(tmp_path):
    cfg, _ = load_model_config("tiny")
    model = random_model(cfg, np.float32, seed=3)
    save_params(model, str(tmp_path / "ckpt"))
    restored = restore_params(str(tmp_path / "ckpt"), cfg, np.float32)
    a, b = _flat(model), _flat(restored)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    llm = LLM("tiny", dtype="float32", kernels="xla", params=str(tmp_path / "ckpt"), num_pages=64)
    ref = LLM("tiny", dtype="float32", kernels="xla", seed=3, num_pages=64)
    np.testing.assert_allclose(llm.logits([256, 1, 2, 3]), ref.logits([256, 1, 2, 3]), rtol=1e-6)


def test_random_init_real_shapes_abstractly():
    """7B..70B shapes are right (checked abstractly: no memory is allocated)."""
    for name, n_params in [("llama-7b", 6.74e9), ("llama3-8b", 8.03e9), ("llama-13b", 13.0e9), ("llama-70b", 70.6e9)]:
        cfg, _ = load_model_config(name)
        assert abs(cfg.num_params() - n_params) / n_params < 0.01, name
        from slora_jax.model.weights import abstract_model

        state = nnx.state(abstract_model(cfg))
        total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
        assert total == cfg.num_params(), name


def test_hf_config_spellings():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    c = ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}})
    assert c.rope_theta == 1234.0 and c.rope_scaling is None and c.num_kv_heads == 2 and c.head_dim == 4
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 5e5}
    c = ModelConfig.from_hf_dict({**base, "rope_parameters": llama3, "eos_token_id": [3, 4]})
    assert c.rope_scaling["rope_type"] == "llama3" and c.rope_theta == 5e5 and c.eos_token_ids == (3, 4)
    with pytest.raises(ConfigError, match="rope scaling type 'yarn'"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        ModelConfig.from_hf_dict({**base, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="missing the key 'vocab_size'"):
        ModelConfig.from_hf_dict({k: v for k, v in base.items() if k != "vocab_size"})
