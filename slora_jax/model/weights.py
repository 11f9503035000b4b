"""Model parameters: random init of real shapes, HF safetensors checkpoints, orbax.

HF stores each linear as [out, in]; we keep [in, out] (y = x @ W). Random init
runs as one jitted program so that a 7B..70B model is materialised directly on
the device in seconds, without passing through host memory.
"""
from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .. import parallel
from ..config import ConfigError, ModelConfig
from .llama import Llama

log = logging.getLogger(__name__)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def dtype_of(name: str):
    try:
        return {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}[name]
    except KeyError:
        raise ConfigError(f"dtype must be bfloat16, float16 or float32, got {name!r}") from None


@functools.lru_cache(maxsize=None)
def _normal_fn(shape: tuple, dtype, sharding=None):
    """One small jitted generator per distinct shape: XLA compiles a whole-model init program
    (hundreds of large RNG ops) very slowly, while a 7B model has fewer than ten distinct shapes.
    With a sharding each device generates only its slice (the values do not depend on it)."""
    return jax.jit(lambda key: (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype),
                   out_shardings=sharding)


def random_model(cfg: ModelConfig, dtype=jnp.bfloat16, seed: int = 0, mesh=None) -> Llama:
    """A Llama of cfg's real shapes, N(0, 0.02) matrices and unit norms, generated on the default device,
    or directly in its tensor-parallel shards over `mesh` (a model too big for one device never is on one)."""
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    base = jax.random.PRNGKey(seed)
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        sharding = parallel.param_sharding(mesh, path)
        if "norm" in str(path[-1]):
            value = jnp.ones(var.shape, dtype, device=sharding)
        else:
            value = _normal_fn(tuple(var.shape), jnp.dtype(dtype), sharding)(jax.random.fold_in(base, i))
        leaves.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def abstract_model(cfg: ModelConfig, dtype=jnp.bfloat16) -> Llama:
    return nnx.eval_shape(lambda: Llama(cfg, dtype, rngs=nnx.Rngs(0)))


def _hf_name(path: tuple) -> tuple[str, bool]:
    """Our param path -> (HF tensor name, transpose?)."""
    if path == ("embed",):
        return "model.embed_tokens.weight", False
    if path == ("norm",):
        return "model.norm.weight", False
    if path == ("lm_head",):
        return "lm_head.weight", True
    _, i, leaf = path
    if leaf == "input_norm":
        return f"model.layers.{i}.input_layernorm.weight", False
    if leaf == "post_norm":
        return f"model.layers.{i}.post_attention_layernorm.weight", False
    group = "self_attn" if leaf in _ATTN else "mlp"
    return f"model.layers.{i}.{group}.{leaf}.weight", True


def _checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(model_dir)):
        raise ConfigError(f"{model_dir!r} holds only pickle checkpoints; convert it to safetensors")
    raise ConfigError(f"{model_dir!r} has no model.safetensors or model.safetensors.index.json")


def load_hf_checkpoint(model_dir: str, cfg: ModelConfig, dtype=jnp.bfloat16, mesh=None) -> Llama:
    """Read an HF Llama checkpoint dir (single or sharded safetensors) with a progress bar; with a
    mesh each tensor goes from host memory straight to its tensor-parallel shards."""
    from safetensors import safe_open

    model = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    wanted = {}
    for path, var in nnx.to_flat_state(state):
        name, transpose = _hf_name(tuple(str(p) for p in path))
        wanted[name] = (path, transpose, var.shape)
    values = {}
    files = _checkpoint_files(model_dir)
    with tqdm(total=len(wanted), desc=f"loading {os.path.basename(model_dir.rstrip('/'))}", unit="tensor",
              disable=len(wanted) < 64) as bar:
        for file in files:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    if name not in wanted:
                        continue  # rotary inv_freq buffers and the like
                    path, transpose, shape = wanted[name]
                    arr = f.get_tensor(name)
                    arr = arr.T if transpose else arr
                    if arr.shape != tuple(shape):
                        raise ConfigError(f"{name}: checkpoint shape {arr.shape} != expected {tuple(shape)}")
                    if mesh is None:
                        values[path] = jnp.asarray(arr, dtype)
                    else:
                        values[path] = jax.device_put(arr.astype(jnp.dtype(dtype)),
                                                      parallel.param_sharding(mesh, path))
                    bar.update(1)
    missing = [wanted_name for wanted_name, (p, _, _) in wanted.items() if p not in values]
    if missing:
        raise ConfigError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
    flat = nnx.to_flat_state(state)
    new_state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat])
    return nnx.merge(graphdef, new_state)


def save_params(model: Llama, path: str) -> None:
    """Orbax checkpoint of the params (a directory; overwritten)."""
    import orbax.checkpoint as ocp

    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(path), nnx.to_pure_dict(state), force=True)


def restore_params(path: str, cfg: ModelConfig, dtype=jnp.bfloat16, mesh=None) -> Llama:
    """Restore an orbax checkpoint, each array straight into its shards when a mesh is given."""
    import orbax.checkpoint as ocp

    graphdef, abstract = nnx.split(abstract_model(cfg, dtype))
    target = nnx.to_pure_dict(abstract)
    if mesh is not None:
        target = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.param_sharding(mesh, p)), target)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(os.path.abspath(path), target)
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)


def param_bytes(model: Llama) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
