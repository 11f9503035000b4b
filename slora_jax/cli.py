"""The library's commands, `generate` and `bench`, and the parser that front ends extend.

The `slora-jax` console script is `server.launch:main`, which adds `serve` to this parser through
`main(argv, commands=...)`: slora_jax never imports the server (docs/ARCHITECTURE.md). Errors print
one line and exit 1 (2 for usage errors, as argparse does); no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Optional

import numpy as np

from .errors import AdapterNotFound, ConfigError, SloraError

DEMO_ADAPTERS = {"demo-poet": 4, "demo-coder": 8, "demo-pirate": 16}
ENGINE_FLAGS = ("num_pages", "max_running", "max_batch_tokens", "max_model_len", "page_rows")  # ints
ENGINE_FLOAT_FLAGS = ("mem_fraction", "early_abort_s")

# name -> (help, add its arguments to a subparser, run it with the parsed args and return the exit status)
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


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
        if not sep or not name or not path:
            raise ConfigError(f"--adapter expects NAME=PATH, got {v!r}")
        out[name] = path
    return out


def _engine_kw(args) -> dict:
    kw = {}
    for key in ENGINE_FLAGS + ENGINE_FLOAT_FLAGS:
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
    if getattr(args, "sync_steps", False):
        kw["async_steps"] = False
    if getattr(args, "no_prefix_cache", False):
        kw["prefix_cache"] = False
    return kw


def make_llm(args):
    """The `LLM` the common flags describe, with its --adapter dirs (the tiny default gets demo adapters)."""
    from .api import LLM

    template = None
    if getattr(args, "chat_template", None):
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                template = f.read()
        except OSError as e:
            raise ConfigError(f"--chat-template: cannot read {args.chat_template!r} ({e.strerror})") from None
    adapters = _adapter_args(args.adapter)
    llm = LLM(args.model or "tiny", tp=args.tp, max_rank=args.max_rank, dtype=args.dtype, kernels=args.kernels,
              chat_template=template, **_engine_kw(args))
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    if not args.model and not args.adapter:
        add_demo_adapters(llm)
    return llm


def init_distributed(args) -> None:
    """Join jax.distributed (before anything starts jax) if the flags or environment ask for several processes.

    --coordinator, --num-processes, --process-id default to $JAX_COORDINATOR_ADDRESS (which jax reads
    itself), $JAX_NUM_PROCESSES and $JAX_PROCESS_ID; `--distributed` initializes with none of them and
    lets jax detect them (Slurm, Open MPI, Cloud TPU, Kubernetes: jax.distributed.initialize's own rules)."""
    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    nproc = args.num_processes if args.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = args.process_id if args.process_id is not None else _env_int("JAX_PROCESS_ID")
    if not (args.distributed or coordinator or nproc is not None or pid is not None):
        return
    import jax

    jax.distributed.initialize(coordinator, nproc, pid)
    logging.getLogger("slora_jax").info("process %d of %d joined jax.distributed (%d devices in all, %d here)",
                                        jax.process_index(), jax.process_count(), jax.device_count(),
                                        jax.local_device_count())


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name} must be an integer, got {value!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF Llama dir or preset in configs/ (default: the embedded tiny model)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="PEFT LoRA dir to register (repeatable)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--max-rank", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float32", "float16"],
                   help="default auto: float32 on CPU, bfloat16 on GPU/TPU")
    for key in ENGINE_FLAGS:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help="default: the model's max_position_embeddings" if key == "max_model_len" else None)
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="share of the device memory left after the weights that the pool takes")
    p.add_argument("--early-abort-s", type=float, default=None,
                   help="drop requests still waiting for their first token after this many seconds")
    p.add_argument("--sync-steps", action="store_true",
                   help="read each step's tokens before building the next (default: one step behind)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="recompute every prompt (default: reuse the KV of cached prefixes, keyed by adapter weights)")
    p.add_argument("--kernels", default=None, choices=["auto", "pallas", "xla", "triton", "mosaic"])
    d = p.add_argument_group("several processes (jax.distributed; --tp then spans every process's devices)")
    d.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address for jax.distributed (default: $JAX_COORDINATOR_ADDRESS)")
    d.add_argument("--num-processes", type=int, default=None, help="default: $JAX_NUM_PROCESSES")
    d.add_argument("--process-id", type=int, default=None, help="this process's index (default: $JAX_PROCESS_ID)")
    d.add_argument("--distributed", action="store_true",
                   help="join jax.distributed even without the three above (jax detects Slurm, Open MPI, TPU, ...)")


def _generate_args(g: argparse.ArgumentParser) -> None:
    _common(g)
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("--use", help="adapter name to use (default: base model)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)


def _generate(args) -> int:
    from .engine.request import SamplingParams

    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    init_distributed(args)  # several processes: each runs the same calls (SPMD), process 0 prints
    llm = make_llm(args)
    if args.use and not llm.has_adapter(args.use):
        raise AdapterNotFound(f"--use: no adapter named {args.use!r} (registered: "
                              f"{', '.join(a['name'] for a in llm.adapters()) or 'none'})")
    failed = 0
    for out in llm.generate(args.prompt, adapter=args.use, sampling=sp):
        if llm.process_index == 0:
            print(json.dumps({"prompt_tokens": len(out.prompt_token_ids), "text": out.text,
                              "token_ids": out.token_ids, "finish_reason": out.finish_reason, "error": out.error}))
        failed += out.finish_reason == "error"
    if failed:
        print(f"slora-jax: error: {failed} of {len(args.prompt)} prompt(s) failed (see \"error\")", file=sys.stderr)
    return 1 if failed else 0


def _bench_args(b: argparse.ArgumentParser) -> None:
    b.add_argument("--config", required=True, help="configs/bench-*.json")
    b.add_argument("--out", default="benchmarks/results")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a bench option")


def _bench(args) -> int:
    from .bench.run import run_from_config

    overrides = {}
    for kv in args.set:
        key, sep, value = kv.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {kv!r}")
        overrides[key] = value
    run_from_config(args.config, args.out, overrides)
    return 0


COMMANDS: dict[str, Command] = {
    "generate": ("generate from prompts on the command line", _generate_args, _generate),
    "bench": ("S-LoRA workload benchmark", _bench_args, _bench),
}


def main(argv=None, commands: Optional[dict[str, Command]] = None) -> int:
    """Run one command; `commands` adds a front end's own (the server adds `serve`)."""
    table = {**(commands or {}), **COMMANDS}
    ap = argparse.ArgumentParser(prog="slora-jax", description="Serve many LoRA adapters over one base Llama.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, (help_text, add_args, _) in table.items():
        add_args(sub.add_parser(name, help=help_text))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return table[args.cmd][2](args)
    except (SloraError, OSError, ValueError) as e:  # bad input or files: the message says it, no traceback
        logging.getLogger("slora_jax").debug("command failed", exc_info=True)
        print(f"slora-jax: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
