"""`slora-jax serve | generate | bench`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

DEMO_ADAPTERS = {"demo-poet": 4, "demo-coder": 8, "demo-pirate": 16}
ENGINE_FLAGS = ("num_pages", "max_running", "max_batch_tokens", "max_model_len", "page_rows")  # ints
ENGINE_FLOAT_FLAGS = ("mem_fraction", "early_abort_s")


def add_demo_adapters(llm, seed: int = 0) -> list:
    """A few random adapters of different ranks, so the tiny default shows multi-LoRA serving."""
    cfg = llm.model_cfg
    rng = np.random.default_rng(seed)
    for name, r in DEMO_ADAPTERS.items():
        params = {}
        for layer in range(cfg.num_layers):
            for m in ("q_proj", "v_proj", "down_proj"):
                d_in, d_out = cfg.module_shape(m)
                params[f"{layer}.{m}"] = (rng.normal(0, 0.05, (d_in, r)), rng.normal(0, 0.05, (r, d_out)))
        llm.add_adapter(name, params, alpha=2.0 * r)
    return list(DEMO_ADAPTERS)


def _adapter_args(values) -> dict:
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep:
            raise SystemExit(f"--adapter expects NAME=PATH, got {v!r}")
        out[name] = path
    return out


def _engine_kw(args) -> dict:
    kw = {}
    for key in ENGINE_FLAGS + ENGINE_FLOAT_FLAGS:
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
    if getattr(args, "sync_steps", False):
        kw["async_steps"] = False
    return kw


def _make_llm(args):
    from .api import LLM

    llm = LLM(args.model or "tiny", tp=args.tp, max_rank=args.max_rank, dtype=args.dtype, kernels=args.kernels,
              **_engine_kw(args))
    for name, path in _adapter_args(args.adapter).items():
        llm.load_adapter(name, path)
    if not args.model and not args.adapter:
        add_demo_adapters(llm)
    return llm


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF Llama dir or preset in configs/ (default: the embedded tiny model)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="PEFT LoRA dir to register (repeatable)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--max-rank", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"])
    p.add_argument("--kernels", default=None, choices=["auto", "pallas", "xla"])
    for key in ENGINE_FLAGS:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="share of the device memory left after the weights that the pool takes")
    p.add_argument("--early-abort-s", type=float, default=None,
                   help="drop requests still waiting for their first token after this many seconds")
    p.add_argument("--sync-steps", action="store_true",
                   help="read each step's tokens before building the next (default: one step behind)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="slora-jax", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _common(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("SLORA_API_KEY"))
    s.add_argument("--adapter-dir", help="directory under which POST /v1/adapters may load adapters")
    g = sub.add_parser("generate", help="generate from prompts on the command line")
    _common(g)
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("--use", help="adapter name to use (default: base model)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    b = sub.add_parser("bench", help="S-LoRA workload benchmark")
    b.add_argument("--config", required=True, help="configs/bench-*.json")
    b.add_argument("--out", default="benchmarks/results")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a bench option")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.cmd == "generate":
        from .engine.request import SamplingParams

        llm = _make_llm(args)
        sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        for out in llm.generate(args.prompt, adapter=args.use, sampling=sp):
            print(json.dumps({"prompt_tokens": len(out.prompt_token_ids), "text": out.text,
                              "token_ids": out.token_ids, "finish_reason": out.finish_reason, "error": out.error}))
        return 0
    if args.cmd == "serve":
        from server.app import serve

        llm = _make_llm(args)
        serve(llm, host=args.host, port=args.port, api_key=args.api_key, adapter_dir=args.adapter_dir)
        return 0
    if args.cmd == "bench":
        from .bench.run import run_from_config

        run_from_config(args.config, args.out, dict(kv.split("=", 1) for kv in args.set))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
