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
