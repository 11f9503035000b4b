"""Build tiny HF Llama models and PEFT adapters on disk (no hub access)."""
from __future__ import annotations

import torch

MODEL_VARIANTS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "llama3": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def save_tiny_llama(path, seed: int = 0, **overrides) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():  # random norms too, so a wrong norm placement shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def save_peft_adapter(model_dir: str, out_dir, seed: int = 1, **lora_kw) -> str:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    cfg = LoraConfig(init_lora_weights=False, **lora_kw)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return str(out_dir)


def hf_logits(model_dir: str, token_ids, adapter_dir: str | None = None):
    """Reference logits [T, V] from transformers (+ peft)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        out = model(torch.tensor([list(token_ids)]))
    return out.logits[0].numpy()


def hf_greedy(model_dir: str, token_ids, max_new_tokens: int, adapter_dir: str | None = None):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([list(token_ids)]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens)
    return out[0, len(token_ids):].tolist()
