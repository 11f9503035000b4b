"""HF transformers + PEFT baseline: mixed-adapter batches, static batching, FCFS.

The baseline S-LoRA compares with, in its mixed-batch form: one
`LlamaForCausalLM` (random init of the same shape, bf16, on cuda when there is
one) wrapped in a `PeftModel` holding k LoRA adapters of the setting's ranks
(q,k,v,o); each batch row names its adapter through `adapter_names=[...]`
(PEFT's mixed-batch inference, which loops over the distinct adapters of the
batch in every LoRA layer).

The server replays the trace in real time: when idle it takes up to
`max_batch` arrived requests in arrival order, left-pads their prompts to the
longest, runs one prefill and then greedy decode steps until the longest
output is done (static batching: nothing joins a running batch). A row
finishes at its own output length and is then dropped from the batch and the
KV cache (as S-LoRA's PEFT script does). The run stops at `time_limit_s`:
PEFT falls far behind at these rates, so the caller scales it down (fewer
adapters, a shorter trace) and the result says so.

torch is imported lazily; run.py calls this before the JAX engine takes the
device, and the server frees its GPU memory when done. `python -m
slora_jax.bench.peft_baseline --job JOB.json --out OUT.json` runs the same
thing in a child process (run.py's `peft.subprocess` option), for where torch
and JAX should not share one process.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import time
from typing import Optional, Sequence

import numpy as np

from ..config import ModelConfig, load_model_config
from .metrics import RequestRecord, summarize
from .workload import Trace

log = logging.getLogger(__name__)


def _build_model(cfg: ModelConfig, ranks: Sequence[int], modules: Sequence[str], device: str, dtype, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = cfg.to_hf_dict()
    hf.pop("architectures", None)
    hf_cfg = LlamaConfig(**hf)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # create the weights in bf16 directly (no fp32 copy of a 13B model)
    try:
        with torch.device(device):
            base = LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(old)
    base = base.to(device=device, dtype=dtype).eval()
    names = [f"peft-{i:04d}" for i in range(len(ranks))]

    def lora(r):  # PEFT's default init (B = 0) costs the same compute as trained weights
        return LoraConfig(r=int(r), lora_alpha=int(2 * r), lora_dropout=0.0, target_modules=list(modules), bias="none")

    model = get_peft_model(base, lora(ranks[0]), adapter_name=names[0])
    _add_adapters(model, names[1:], ranks[1:], lora)
    model = model.to(device=device, dtype=dtype).eval()
    return model, names


def _add_adapters(model, names: Sequence[str], ranks: Sequence[int], lora) -> None:
    """Add LoRA adapters to a PeftModel; what `add_adapter` ends with, without its cost.

    `PeftModel.add_adapter` re-walks every module of the model (a number that
    grows with the adapters already added) several times per adapter: 100
    adapters on 32 layers take minutes. The adapters' own layers come from
    each LoRA layer's `update_layer`, which is what `add_adapter` calls in the
    end; the config is registered as `add_adapter` does. Falls back to
    `add_adapter` where this PEFT version's `update_layer` differs.
    """
    import inspect

    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    fast = bool(layers) and "config" in inspect.signature(type(layers[0]).update_layer).parameters
    for name, r in zip(names, ranks):
        cfg = lora(r)
        if not fast:
            model.add_adapter(name, cfg)
            continue
        model.peft_config[name] = cfg
        for layer in layers:
            layer.update_layer(name, cfg.r, lora_alpha=cfg.lora_alpha, config=cfg)


class PeftServer:
    """One PEFT model holding adapters 0..k-1 (ranks[i]); `serve` replays a trace whose indices are < k.

    Adapters a batch does not name cost nothing in PEFT's mixed-batch path, so
    one model with the largest k serves every smaller n.
    """

    def __init__(self, cfg: ModelConfig, ranks: Sequence[int], modules: Sequence[str], device: Optional[str] = None,
                 dtype: str = "bfloat16", seed: int = 0):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
        t = time.monotonic()
        self.model, self.names = _build_model(cfg, list(ranks), modules, self.device, tdtype, seed)
        self.setup_s = time.monotonic() - t
        log.info("PEFT baseline: %d adapters built in %.1f s on %s", len(self.names), self.setup_s, self.device)
        with torch.inference_mode():  # warm up (cuBLAS handles, the allocator) outside the timed runs
            x = torch.tensor([[1, 2, 3, 4]], device=self.device)
            self.model(input_ids=x, adapter_names=[self.names[0]], logits_to_keep=1)
        self._sync()

    def _sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def close(self) -> None:
        """Give the GPU memory back (the JAX engine runs next in this process)."""
        import torch

        self.model = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def serve(self, trace: Trace, prompts: Sequence[Sequence[int]], slo_ttft_s: float, max_batch: int = 32,
              time_limit_s: float = 60.0, progress: bool = True) -> dict:
        """Replay `trace` in real time (static batches, FCFS) for at most `time_limit_s`; S-LoRA's metrics."""
        if trace.n_adapters > len(self.names):
            raise ValueError(f"the trace uses {trace.n_adapters} adapters; this server holds {len(self.names)}")
        return _serve(self, trace, prompts, slo_ttft_s, max_batch, time_limit_s, progress)


def _serve(server: PeftServer, trace: Trace, prompts, slo_ttft_s: float, max_batch: int, time_limit_s: float,
           progress: bool) -> dict:
    import torch
    from tqdm import tqdm

    model, names, device, sync = server.model, server.names, server.device, server._sync
    n = len(trace)
    recs = [RequestRecord(0.0, int(trace.prompt_len[i]), int(trace.output_len[i])) for i in range(n)]
    batches, drop_rows = 0, True

    t0 = time.monotonic()
    deadline = t0 + time_limit_s
    queue: collections.deque = collections.deque()
    nxt = 0
    bar = tqdm(total=n, desc="peft", unit="req", mininterval=5, disable=not progress)

    def run_batch(idx: list) -> None:
        nonlocal drop_rows
        plen = max(recs[i].prompt_len for i in idx)
        ids = torch.zeros((len(idx), plen), dtype=torch.long)
        mask = torch.zeros((len(idx), plen), dtype=torch.long)
        for j, i in enumerate(idx):
            p = prompts[i]
            ids[j, plen - len(p):] = torch.as_tensor(p)
            mask[j, plen - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = list(idx)  # trace index of each row of the device batch
        active = set(idx)  # rows still generating
        row_names = [names[int(trace.adapter[i])] for i in rows]
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        adapter_names=row_names, logits_to_keep=1)
            cache = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            now = time.monotonic() - t0
            for i in rows:
                recs[i].first_token, recs[i].generated = now, 1
            while True:
                done = [i for i in rows if i in active and recs[i].generated >= recs[i].output_len]
                if done:
                    now = time.monotonic() - t0
                    for i in done:
                        recs[i].finish = now
                    active.difference_update(done)
                    bar.update(len(done))
                if not active:
                    return
                if done and drop_rows:
                    keep = [k for k, i in enumerate(rows) if i in active]
                    sel = torch.as_tensor(keep, device=device)
                    try:
                        cache.batch_select_indices(sel)
                    except (AttributeError, NotImplementedError):  # keep computing the finished rows
                        drop_rows = False
                    else:
                        tok, mask, pos = tok[sel], mask[sel], pos[sel]
                        rows = [rows[k] for k in keep]
                        row_names = [row_names[k] for k in keep]
                if time.monotonic() > deadline:
                    return
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
                out = model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True, adapter_names=row_names)
                cache = out.past_key_values
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                for i in active:
                    recs[i].generated += 1
                if any(recs[i].generated >= recs[i].output_len for i in active):
                    sync()  # a row finishes at this step: its finish time needs the device done

    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            rel = now - t0
            while nxt < n and trace.arrival_s[nxt] <= rel:
                recs[nxt].arrival = float(trace.arrival_s[nxt])
                queue.append(nxt)
                nxt += 1
            if not queue:
                if nxt >= n:
                    break
                time.sleep(min(0.005, max(0.0, float(trace.arrival_s[nxt]) - rel)))
                continue
            idx = [queue.popleft() for _ in range(min(max_batch, len(queue)))]
            run_batch(idx)
            batches += 1
    finally:
        bar.close()
    end = time.monotonic()
    while nxt < n and trace.arrival_s[nxt] <= end - t0:  # arrived during the last batch: they count (as misses)
        recs[nxt].arrival = float(trace.arrival_s[nxt])
        nxt += 1
    arrived = [recs[i] for i in range(nxt)]
    last_finish = max((r.finish for r in arrived if r.finish is not None), default=None)
    complete = all(r.finish is not None for r in arrived) and nxt == n
    elapsed = (last_finish if complete and last_finish is not None else end - t0)
    summary = summarize(arrived, elapsed, slo_ttft_s)
    summary.update({
        "n_adapters": trace.n_adapters, "trace_requests": n, "trace_duration_s": trace.duration_s,
        "time_limit_s": time_limit_s, "hit_time_limit": not complete, "batches": batches, "max_batch": max_batch,
        "setup_s": server.setup_s, "device": device, "dropped_finished_rows": drop_rows,
        # generated tokens/s over the trace's mean output length: a req/s figure that a cut-off run does not bias
        "token_equivalent_req_s": summary["tokens_per_s"] / float(np.mean(trace.output_len)) if n else None,
    })
    return summary


def run_jobs(cfg: ModelConfig, ranks: Sequence[int], modules: Sequence[str], runs: list, budget_s: float,
             device: Optional[str] = None, dtype: str = "bfloat16", seed: int = 0, progress: bool = True) -> dict:
    """One server (adapters 0..len(ranks)-1) serves each run in turn, within `budget_s` in all.

    `runs`: dicts with n, trace, prompts, slo_ttft_s, max_batch, time_limit_s.
    Returns {n: summary, or {"error": message}}.
    """
    t_end = time.monotonic() + budget_s
    out: dict = {}
    server = PeftServer(cfg, ranks, modules, device, dtype, seed)
    try:
        for run in runs:
            limit = min(float(run["time_limit_s"]), t_end - time.monotonic())
            if limit < 5:
                out[run["n"]] = {"error": "skipped: time budget used up"}
                continue
            out[run["n"]] = server.serve(run["trace"], run["prompts"], float(run["slo_ttft_s"]),
                                         int(run["max_batch"]), limit, progress)
    finally:
        server.close()
    return out


def write_job(path: str, model: str, ranks: Sequence[int], modules: Sequence[str], runs: list, budget_s: float,
              device: Optional[str], dtype: str, seed: int, progress: bool) -> None:
    """The `--job` file for a child process (traces as plain lists)."""
    job = {"model": model, "ranks": [int(r) for r in ranks], "modules": list(modules), "budget_s": budget_s,
           "device": device, "dtype": dtype, "seed": seed, "progress": progress, "runs": [
               {**{k: v for k, v in r.items() if k != "trace"},
                "trace": {"arrival_s": r["trace"].arrival_s.tolist(), "adapter": r["trace"].adapter.tolist(),
                          "prompt_len": r["trace"].prompt_len.tolist(), "output_len": r["trace"].output_len.tolist(),
                          "n_adapters": r["trace"].n_adapters}} for r in runs]}
    with open(path, "w") as f:
        json.dump(job, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="HF PEFT baseline in its own process (see run.py)")
    ap.add_argument("--job", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open(args.job) as f:
        job = json.load(f)
    cfg, _ = load_model_config(job["model"])
    runs = []
    for r in job["runs"]:
        t = r["trace"]
        trace = Trace(np.asarray(t["arrival_s"], np.float64), np.asarray(t["adapter"], np.int64),
                      np.asarray(t["prompt_len"], np.int64), np.asarray(t["output_len"], np.int64), int(t["n_adapters"]))
        runs.append({**r, "trace": trace})
    out = run_jobs(cfg, job["ranks"], job["modules"], runs, float(job["budget_s"]), job["device"], job["dtype"],
                   int(job["seed"]), bool(job["progress"]))
    with open(args.out, "w") as f:
        json.dump({str(k): v for k, v in out.items()}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
