"""Shared fixtures: tiny HF Llama checkpoints and PEFT adapters written by the tests themselves."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests import hf_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> directory of a saved tiny LlamaForCausalLM (safetensors)."""
    root = tmp_path_factory.mktemp("hf_models")
    return {name: hf_fixtures.save_tiny_llama(root / name, **kw) for name, kw in hf_fixtures.MODEL_VARIANTS.items()}


def pytest_configure(config):
    # Each test builds its own LLM (new jitted functions) over the same few bucket shapes: the persistent
    # compilation cache lets them share compiled programs instead of recompiling on 2 CPU cores.
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
