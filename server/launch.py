"""`serve`: run the HTTP server over one `LLM` (`python -m server`, `slora-jax serve`).

The `slora-jax` console script is `main` here: slora_jax's own commands (`generate`, `bench`, in
`slora_jax.cli`) plus `serve`, which only this package can add since slora_jax never imports it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence, Union

from slora_jax import LLM
from slora_jax import cli as lib_cli

from .app import create_app

log = logging.getLogger("slora_jax.server")


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          adapter_dir: Optional[str] = None, served_model_name: Union[None, str, Sequence[str]] = None,
          log_level: str = "info", warmup: bool = True) -> None:
    """Run the server with uvicorn until interrupted; first compile every step program (`warmup`),
    with a progress bar, so that no client waits for a compile."""
    import uvicorn

    app = create_app(llm, api_key=api_key, adapter_dir=adapter_dir, served_model_name=served_model_name)
    if warmup:
        t0 = time.perf_counter()
        n = llm.warmup(progress=True)
        log.info("warm-up: compiled %d step programs in %.1fs", n, time.perf_counter() - t0)
    shown = f"[{host}]" if ":" in host else host
    names = [a["name"] for a in llm.adapters()]
    print(f"slora-jax: serving {app.state.server.base_name!r} with {len(names)} adapter(s) "
          f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) at http://{shown}:{port}/v1 "
          f"({'API key required' if api_key else 'no API key'}; adapter dir: {adapter_dir or 'none'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


def _serve_args(s: argparse.ArgumentParser) -> None:
    lib_cli._common(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("SLORA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SLORA_API_KEY)")
    s.add_argument("--adapter-dir", help="directory from which adapters load: by route (POST /v1/adapters, "
                                         "/v1/load_lora_adapter), or by name on first use")
    s.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the base model's name(s) in requests and /v1/models (default: the model's)")
    s.add_argument("--chat-template", metavar="FILE", help="a jinja chat template replacing the model's")
    s.add_argument("--no-warmup", action="store_true", help="start without compiling the step programs first")


def _serve(args) -> int:
    if args.adapter_dir and not os.path.isdir(args.adapter_dir):
        raise NotADirectoryError(f"--adapter-dir {args.adapter_dir!r} is not a directory")
    llm = lib_cli.make_llm(args)
    serve(llm, host=args.host, port=args.port, api_key=args.api_key, adapter_dir=args.adapter_dir,
          served_model_name=args.served_model_name, warmup=not args.no_warmup)
    return 0


SERVE: lib_cli.Command = ("OpenAI-compatible HTTP server", _serve_args, _serve)


def main(argv=None) -> int:
    """`slora-jax serve | generate | bench`."""
    return lib_cli.main(argv, commands={"serve": SERVE})


if __name__ == "__main__":
    sys.exit(main())
