"""Serving throughput through HTTP, and what HTTP costs against `LLM.generate` on the same trace.

N closed-loop clients (in a separate process, so their Python does not share
the server's GIL) stream `/v1/completions` from an in-process uvicorn server
for T seconds, each sending its next request as soon as the last one ends.
Requests come from a deterministic trace: prompt lengths uniform in a range,
a fixed output length (ignore_eos, greedy), the adapter of each request drawn
as floor(n * X), X ~ power(alpha) over n synthetic adapters (S-LoRA's
workload; n = 0 serves the base model). Then the server stops and the same
requests that completed over HTTP run twice in this process: with at most N in
flight (the HTTP run's concurrency, without HTTP) and through `LLM.generate`
all at once (the engine's own ceiling, batches as full as it allows).

Reported: req/s and output tok/s each way, client-side TTFT and latency
percentiles over HTTP (TTFT = the first SSE chunk; the server sends one chunk
per token), and `http_throughput_loss` = 1 - HTTP req/s / in-process req/s at
the same concurrency: what the HTTP layer costs.

    python benchmarks/bench_http.py --model configs/llama-7b.json --adapters 100 --rank 16 \\
        --clients 64 --duration 60 --out $OUT/bench_http.json

Needs only the package's own dependencies plus fastapi, uvicorn and httpx.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# -- the trace (pure numpy: the client process regenerates it) -------------------------------------------
def trace_item(i: int, seed: int, vocab: int, special: tuple, input_len: tuple, n_adapters: int,
               alpha: float) -> tuple[list, str | None]:
    """Request i of the trace: (prompt token ids, adapter name or None)."""
    rng = np.random.default_rng([seed, i])
    n = int(rng.integers(input_len[0], input_len[1] + 1))
    ids = rng.integers(0, vocab, n)
    for s in special:  # keep BOS/EOS out of the body of the prompt
        ids[ids == s] = (s + 1) % vocab
    adapter = None
    if n_adapters:
        adapter = f"syn-{min(int(n_adapters * rng.power(alpha)), n_adapters - 1)}"
    return [int(t) for t in ids], adapter


def percentile(xs: list, q: float):
    return float(np.percentile(xs, q)) if xs else None


# -- the client process ----------------------------------------------------------------------------------
async def _one(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    chunks = 0
    error = None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        error = data["error"].get("message")
                        break
                    if data.get("choices"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    return {"start": t0, "ttft": None if first is None else first - t0, "latency": end - t0, "chunks": chunks,
            "error": error}


async def _load(base: str, n_clients: int, duration: float, start_index: int, trace_kw: dict,
                output_len: int) -> tuple[list, float]:
    import httpx

    counter = iter(range(start_index, 1 << 40))
    results: list = []
    limits = httpx.Limits(max_connections=n_clients + 8, max_keepalive_connections=n_clients + 8)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(600.0)) as client:
        t_begin = time.perf_counter()
        deadline = t_begin + duration

        async def worker():
            while time.perf_counter() < deadline:
                i = next(counter)
                ids, adapter = trace_item(i, **trace_kw)
                body = {"model": adapter or "base", "prompt": ids, "max_tokens": output_len, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                res = await _one(client, "/v1/completions", body)
                res["index"] = i
                results.append(res)

        await asyncio.gather(*(worker() for _ in range(n_clients)))
        elapsed = time.perf_counter() - t_begin
    return results, elapsed


def client_main(conn, base, n_clients, duration, start_index, trace_kw, output_len):
    results, elapsed = asyncio.run(_load(base, n_clients, duration, start_index, trace_kw, output_len))
    conn.send((results, elapsed))
    conn.close()


def run_clients(base: str, n_clients: int, duration: float, start_index: int, trace_kw: dict,
                output_len: int) -> tuple[list, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=client_main, args=(child, base, n_clients, duration, start_index, trace_kw, output_len))
    proc.start()
    child.close()
    out = parent.recv()
    proc.join()
    return out


def summarize(results: list, elapsed: float, output_len: int) -> dict:
    ok = [r for r in results if r["error"] is None]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    lat = [r["latency"] for r in ok]
    itl = [(r["latency"] - r["ttft"]) / (r["chunks"] - 1) for r in ok if r["ttft"] is not None and r["chunks"] > 1]
    return {
        "requests": len(ok), "errors": len(results) - len(ok),
        "first_errors": [r["error"] for r in results if r["error"]][:3],
        "elapsed_s": elapsed, "req_s": len(ok) / elapsed, "output_tok_s": len(ok) * output_len / elapsed,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
        "itl_mean_s": statistics.fmean(itl) if itl else None,
    }


# -- the server side -------------------------------------------------------------------------------------
def start_server(llm):
    import uvicorn

    from server.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(llm), log_level="warning", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def closed_loop(llm, items, clients: int, sp) -> dict:
    """The requests of `items` through the engine in this process, at most `clients` in flight at once:
    the HTTP run's concurrency without HTTP, so that the difference is what the server costs."""
    eng = llm.engine
    todo, inflight, done = list(items), [], []
    t0 = time.perf_counter()
    while todo or inflight:
        while todo and len(inflight) < clients:
            prompt, adapter = todo.pop(0)
            inflight.append(eng.add_request(prompt, adapter, sp))
        eng.step()
        done += [r for r in inflight if r.finished]
        inflight = [r for r in inflight if not r.finished]
    elapsed = time.perf_counter() - t0
    ok = [r for r in done if r.finish_reason in ("stop", "length")]
    ttft = [r.first_token_time - r.arrival for r in ok if r.first_token_time is not None]
    return {"requests": len(ok), "errors": len(done) - len(ok), "elapsed_s": elapsed, "req_s": len(ok) / elapsed,
            "output_tok_s": sum(len(r.output_ids) for r in ok) / elapsed, "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99)}


def wait_idle(llm, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        s = llm.stats()
        if s["requests_running"] == 0 and s["requests_waiting"] == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine did not drain: {s}")
        time.sleep(0.1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/llama-7b.json", help="preset or HF dir (random weights for presets)")
    ap.add_argument("--adapters", type=int, default=100, help="synthetic adapters (0: base model only)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=1.0, help="power-law alpha of adapter popularity (1: uniform)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of measured load")
    ap.add_argument("--warmup", type=float, default=10.0,
                    help="seconds of load first (not measured): adapters resident, connections open")
    ap.add_argument("--input-len", default="64,512", help="prompt tokens: LO,HI (uniform)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--max-rank", type=int, default=None, help="default: --rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bench_http.json")
    for key in ("num_pages", "max_running", "max_batch_tokens", "max_model_len", "page_rows"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    args = ap.parse_args(argv)

    from benchmarks import common
    from slora_jax import LLM, SamplingParams

    overrides = {k: getattr(args, k) for k in ("num_pages", "max_running", "max_batch_tokens", "max_model_len",
                                               "page_rows") if getattr(args, k) is not None}
    lo, hi = (int(x) for x in args.input_len.split(","))
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, kernels=args.kernels, max_rank=args.max_rank or max(args.rank, 1),
              **overrides)
    names = [f"syn-{i}" for i in range(args.adapters)]
    if names:
        llm.add_synthetic_adapters(names, args.rank)
    print(f"model {llm.model_cfg.name} + {len(names)} adapters (rank {args.rank}) ready in "
          f"{time.perf_counter() - t0:.1f}s; engine {llm.engine_cfg}", flush=True)
    if hi + args.output_len > llm.engine_cfg.max_model_len:
        raise SystemExit(f"input {hi} + output {args.output_len} tokens exceed max_model_len "
                         f"{llm.engine_cfg.max_model_len}")
    special = tuple(t for t in (llm.model_cfg.bos_token_id, *llm.model_cfg.eos_token_ids) if t is not None)
    trace_kw = {"seed": args.seed, "vocab": llm.model_cfg.vocab_size, "special": special, "input_len": (lo, hi),
                "n_adapters": args.adapters, "alpha": args.alpha}

    t0 = time.perf_counter()
    print(f"compiled {llm.engine.warmup()} step programs in {time.perf_counter() - t0:.1f}s", flush=True)
    server, thread, base = start_server(llm)
    print(f"serving at {base}", flush=True)
    try:
        if args.warmup > 0:  # compile the step shapes this load reaches; warm-up requests use other trace items
            results, elapsed = run_clients(base, args.clients, args.warmup, 1 << 30, trace_kw, args.output_len)
            print(f"warm-up: {summarize(results, elapsed, args.output_len)}", flush=True)
            wait_idle(llm)
        before = llm.stats()
        results, elapsed = run_clients(base, args.clients, args.duration, 0, trace_kw, args.output_len)
        after = llm.stats()
    finally:
        server.should_exit = True
        thread.join(120)
    http = summarize(results, elapsed, args.output_len)
    http["engine_steps"] = after["steps"] - before["steps"]
    http["preemptions"] = after["preemptions"] - before["preemptions"]
    http["swaps_in"] = after["swaps_in"] - before["swaps_in"]
    print(f"http: {http}", flush=True)

    done = sorted(r["index"] for r in results if r["error"] is None)
    items = [trace_item(i, **trace_kw) for i in done]
    sp = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    warm = items[: 2 * llm.engine_cfg.max_running]  # compile the all-at-once shapes before timing
    llm.generate([p for p, _ in warm], adapter=[a for _, a in warm], sampling=sp)
    before = llm.stats()
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in items], adapter=[a for _, a in items], sampling=sp)
    gen_elapsed = time.perf_counter() - t0
    after = llm.stats()
    ok = [o for o in outs if o.finish_reason in ("stop", "length")]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    generate = {"requests": len(ok), "errors": len(outs) - len(ok), "elapsed_s": gen_elapsed,
                "req_s": len(ok) / gen_elapsed, "output_tok_s": sum(len(o.token_ids) for o in ok) / gen_elapsed,
                "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
                "ttft_note": "all requests queued at t=0, so TTFT includes queueing",
                "engine_steps": after["steps"] - before["steps"],
                "preemptions": after["preemptions"] - before["preemptions"]}
    print(f"generate: {generate}", flush=True)

    closed = closed_loop(llm, items, args.clients, sp)
    print(f"in-process, {args.clients} in flight: {closed}", flush=True)

    # what HTTP costs: the same requests at the same concurrency without it
    loss = 1.0 - http["req_s"] / closed["req_s"] if closed["req_s"] else None
    report = {
        "bench": "http", "device": common.device_name(), "commit": common.git_commit(),
        "config": {**vars(args), "engine": {k: getattr(llm.engine_cfg, k) for k in (
            "num_pages", "page_rows", "max_running", "max_batch_tokens", "max_model_len", "max_rank", "kernels",
            "dtype")}},
        "http": http, "in_process_same_concurrency": closed, "generate": generate, "http_throughput_loss": loss,
    }
    common.write_json(args.out, report)
    print(f"\n{'':10}{'req/s':>9}{'tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}\n"
          f"{'HTTP':10}{http['req_s']:9.2f}{http['output_tok_s']:10.0f}{http['ttft_p50_s'] or 0:10.3f}"
          f"{http['ttft_p99_s'] or 0:10.3f}\n"
          f"{'in-proc':10}{closed['req_s']:9.2f}{closed['output_tok_s']:10.0f}\n"
          f"{'generate':10}{generate['req_s']:9.2f}{generate['output_tok_s']:10.0f}\n"
          f"throughput lost to HTTP: {100 * (loss or 0):.1f}%   -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
