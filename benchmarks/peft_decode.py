"""HF transformers + PEFT decode throughput, the baseline of bench_decode.py (run as its subprocess).

Llama-7B shape, random bf16 weights on the GPU, batch 32, input 256, fixed output length; no LoRA,
one rank-8 q,k,v,o adapter for every row, and 32 distinct rank-8 adapters in one batch (PEFT's
mixed-batch `adapter_names`). Writes <out>/peft_decode.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input", type=int, default=256)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "llama-7b.json")
    with open(cfg_path) as f:
        d = {k: v for k, v in json.load(f).items() if k not in ("name", "engine")}
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**d)).eval()
    ids = torch.randint(3, 32000, (args.batch, args.input), device="cuda")
    gen = dict(max_new_tokens=args.output, min_new_tokens=args.output, do_sample=False, pad_token_id=0)

    def timed(m, new_tokens, **kw):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.generate(ids, **{**gen, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def run(m, name, **kw):
        """Decode tokens/s: the difference of a generate of 2 + output tokens and one of 2 tokens, so the
        prefill (32 x 256 prompt tokens, most of a 16-token generate without LoRA) is not in it, as it is
        not in the engine's decode rows. The whole generate's tokens/s is kept as `<name>_with_prefill`."""
        with torch.no_grad():
            # warm up at the timed shapes (a short prompt left cuBLAS heuristics and caches cold for the
            # first timed call: "none", timed first, came out slower than "one")
            timed(m, 2, **kw)
            short = timed(m, 2, **kw)
            long = timed(m, 2 + args.output, **kw)
        res[f"{name}_with_prefill"] = args.batch * (2 + args.output) / long
        res[name] = args.batch * args.output / max(long - short, 1e-9)
        print(name, res[name], "with prefill", res[f"{name}_with_prefill"], flush=True)

    res = {"batch": args.batch, "input": args.input, "output": args.output, "rank": args.rank,
           "device": torch.cuda.get_device_name()}
    run(model, "none")
    lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False)
    pm = get_peft_model(model, lcfg, adapter_name="a0").eval()
    run(pm, "one")
    for i in range(1, args.batch):
        pm.add_adapter(f"a{i}", lcfg)
    run(pm, "distinct", adapter_names=[f"a{i}" for i in range(args.batch)])
    with open(os.path.join(args.out, "peft_decode.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
