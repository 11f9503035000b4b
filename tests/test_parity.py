"""Our Llama + LoRA logits against HF transformers + peft on the same weights (float32)."""
from __future__ import annotations

import numpy as np
import pytest

from slora_jax import LLM, SamplingParams
from tests import hf_fixtures
from tests.mixed_batch import mixed_prefill_logits

TOKENS = [1, 17, 5, 99, 42, 3, 64, 7, 120, 33, 8, 15, 77, 91, 2, 45, 9]

ADAPTERS = {
    # name -> LoraConfig kwargs: different ranks, target sets, rank/alpha patterns, rsLoRA
    "qv_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]),
    "patterns": dict(r=6, lora_alpha=12, target_modules=["q_proj", "o_proj", "down_proj"],
                     rank_pattern={"o_proj": 3, "layers.1.self_attn.q_proj": 2},
                     alpha_pattern={"down_proj": 5.0}),
    "rslora_regex": dict(r=5, lora_alpha=7, use_rslora=True, target_modules=r".*\.(k_proj|up_proj)"),
}


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def adapters(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {(m, a): hf_fixtures.save_peft_adapter(hf_models[m], root / f"{m}-{a}", seed=i, **kw)
            for m in hf_models for i, (a, kw) in enumerate(ADAPTERS.items())}


def new_llm(model_dir) -> LLM:
    return LLM(model_dir, dtype="float32", kernels="xla", max_rank=16, num_pages=160, page_rows=4, max_model_len=128,
               max_running=8, max_batch_tokens=64)


@pytest.fixture(scope="module")
def llms(hf_models, adapters):
    out = {}
    for m, d in hf_models.items():
        llm = new_llm(d)
        for a in ADAPTERS:
            llm.load_adapter(a, adapters[(m, a)])
        out[m] = llm
    return out


@pytest.mark.parametrize("model", list(hf_fixtures.MODEL_VARIANTS))
def test_base_logits_match_transformers(model, hf_models, llms):
    ours = llms[model].logits(TOKENS)
    ref = hf_fixtures.hf_logits(hf_models[model], TOKENS)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("model", list(hf_fixtures.MODEL_VARIANTS))
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_lora_logits_match_peft(model, adapter, hf_models, adapters, llms):
    ours = llms[model].logits(TOKENS, adapter=adapter)
    ref = hf_fixtures.hf_logits(hf_models[model], TOKENS, adapters[(model, adapter)])
    base = hf_fixtures.hf_logits(hf_models[model], TOKENS)
    assert rel_err(ref, base) > 1e-2, "the adapter must change the logits for this test to mean anything"
    assert rel_err(ours, ref) < 1e-4


def test_mixed_batch_rows_equal_rows_alone(llms):
    """One prefill batch with several adapters and base-model rows: each row's logits equal it alone."""
    llm = llms["gqa"]
    eng = llm.engine
    rows = [(TOKENS[:7], "qv_r4"), (TOKENS[3:14], None), (TOKENS[:5], "all_r8"), (TOKENS[2:11], "patterns"),
            (TOKENS[1:4], "qv_r4"), (TOKENS[5:16], "rslora_regex")]
    alone = [llm.logits(t, adapter=a)[-1] for t, a in rows]
    logits, order = mixed_prefill_logits(llm, rows)
    assert len(set(order)) == 5
    for i in range(len(rows)):
        assert rel_err(logits[i], alone[i]) < 1e-5, (i, rows[i][1])
    eng.pages.check_invariants()


def test_greedy_generation_matches_transformers(hf_models, adapters, llms):
    llm = llms["mha"]
    prompt = TOKENS[:9]
    for a in (None, "all_r8"):
        ref = hf_fixtures.hf_greedy(hf_models["mha"], prompt, 12, adapters[("mha", a)] if a else None)
        out = llm.generate([prompt], adapter=a, sampling=SamplingParams(max_tokens=12, ignore_eos=True))[0]
        assert out.token_ids == ref, a
    assert llm.stats()["pages_kv"] == 0


def test_lora_launches_only_for_targeted_modules(hf_models, adapters):
    """With only q/v adapters registered the step runs no LoRA for k, o or the MLP (the modules ride in
    the step input as static metadata) and still matches PEFT; a later adapter widens the set."""
    m = "gqa"
    llm = new_llm(hf_models[m])
    llm.load_adapter("qv_r4", adapters[(m, "qv_r4")])
    assert llm.engine.store.target_modules() == ("q_proj", "v_proj")
    ref = hf_fixtures.hf_logits(hf_models[m], TOKENS, adapters[(m, "qv_r4")])
    assert rel_err(llm.logits(TOKENS, adapter="qv_r4"), ref) < 1e-4
    llm.load_adapter("patterns", adapters[(m, "patterns")])
    llm.engine.remove_adapter("patterns")  # the set never shrinks: no program changes on removal
    assert llm.engine.store.target_modules() == ("q_proj", "v_proj", "o_proj", "down_proj")
    assert rel_err(llm.logits(TOKENS, adapter="qv_r4"), ref) < 1e-4
