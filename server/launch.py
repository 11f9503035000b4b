"""`serve`: run the HTTP server over one `LLM` (`python -m server`, `slora-jax serve`).

The `slora-jax` console script is `main` here: slora_jax's own commands (`generate`, `bench`, in
`slora_jax.cli`) plus `serve`, which only this package can add since slora_jax never imports it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from typing import Optional, Sequence, Union

from slora_jax import LLM, ProcessLost
from slora_jax import cli as lib_cli

from .app import create_app

log = logging.getLogger("slora_jax.server")


EXIT_GRACE_S = 2.0  # after the engine failed for good: time for error answers to reach their clients


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          adapter_dir: Optional[str] = None, served_model_name: Union[None, str, Sequence[str]] = None,
          log_level: str = "info", warmup: bool = True, peer_timeout_s: float = 10.0) -> None:
    """Run the server with uvicorn until interrupted; first compile every step program (`warmup`),
    with a progress bar, so that no client waits for a compile.

    On process 0 of several (jax.distributed), the engine leads the others (`LLM.lead`, which waits
    for them to follow); if one is lost (silent for `peer_timeout_s`, or diverged), requests in flight
    fail, /health answers 503 with the reason, and the process exits with status 1."""
    import uvicorn

    app = create_app(llm, api_key=api_key, adapter_dir=adapter_dir, served_model_name=served_model_name)
    if warmup:
        t0 = time.perf_counter()
        n = llm.warmup(progress=True)
        log.info("warm-up: compiled %d step programs in %.1fs", n, time.perf_counter() - t0)
    if llm.process_count > 1:
        _exit_on_failure(llm)
        try:
            llm.lead(peer_timeout_s)
        except ProcessLost as e:
            _exit_lost(str(e), 0.0)
    shown = f"[{host}]" if ":" in host else host
    names = [a["name"] for a in llm.adapters()]
    print(f"slora-jax: serving {app.state.server.base_name!r} with {len(names)} adapter(s) "
          f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) at http://{shown}:{port}/v1 "
          f"({'API key required' if api_key else 'no API key'}; adapter dir: {adapter_dir or 'none'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


def follow(llm: LLM, peer_timeout_s: float = 10.0) -> None:
    """Every process but 0: no HTTP, the engine mirrors process 0's until it stops (`LLM.follow`); if
    process 0 is lost or this process diverged, exit with status 1."""
    print(f"slora-jax: process {llm.process_index} of {llm.process_count} follows process 0 "
          "(which serves HTTP)", flush=True)
    _exit_on_failure(llm)
    try:
        llm.follow(peer_timeout_s)
    except ProcessLost as e:
        _exit_lost(str(e), 0.0)
    print(f"slora-jax: process 0 stopped serving; process {llm.process_index} exits", flush=True)


def _exit_on_failure(llm: LLM) -> None:
    """Exit once the engine failed for good: a step may be stuck in a collective with the lost process,
    and jax's exit would wait for it at its shutdown barrier, so the process ends itself (os._exit)."""
    threading.Thread(target=lambda: _exit_lost(llm.wait_for_failure(), EXIT_GRACE_S),
                     name="slora-exit-on-failure", daemon=True).start()


def _exit_lost(reason: str, grace_s: float) -> None:
    log.critical("the multi-process engine stopped for good: %s", reason)
    print(f"slora-jax: error: {reason}; exiting", file=sys.stderr, flush=True)
    time.sleep(grace_s)
    logging.shutdown()
    os._exit(1)


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
    s.add_argument("--peer-timeout", type=float, default=10.0, metavar="S",
                   help="several processes: a process silent this long stops the engine for good (default 10)")


def _serve(args) -> int:
    if args.adapter_dir and not os.path.isdir(args.adapter_dir):
        raise NotADirectoryError(f"--adapter-dir {args.adapter_dir!r} is not a directory")
    lib_cli.init_distributed(args)
    llm = lib_cli.make_llm(args)  # every process alike: the same model, adapters and demo adapters
    if llm.process_index > 0:
        if not args.no_warmup:
            llm.warmup()
        follow(llm, args.peer_timeout)
        return 0
    serve(llm, host=args.host, port=args.port, api_key=args.api_key, adapter_dir=args.adapter_dir,
          served_model_name=args.served_model_name, warmup=not args.no_warmup, peer_timeout_s=args.peer_timeout)
    return 0


SERVE: lib_cli.Command = ("OpenAI-compatible HTTP server", _serve_args, _serve)


def main(argv=None) -> int:
    """`slora-jax serve | generate | bench`."""
    return lib_cli.main(argv, commands={"serve": SERVE})


if __name__ == "__main__":
    sys.exit(main())
