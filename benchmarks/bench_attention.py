"""Paged attention kernels on the GPU: correctness, timings, a small tunables sweep.

    python benchmarks/bench_attention.py --out $OUT

(a) compiles each kernel (interpret=False) and checks it against the XLA reference
    on random inputs at awkward shapes: prints PASS/FAIL and the relative error;
    the exit status is 1 if any check failed (the timings still run);
(b) times decode (Llama-7B MHA: 32 heads, head_dim 128, W 4096, bf16, page_rows 16,
    random page permutation, one layer) at context 512/2048/8192 x batch 32/128 for
    our kernel, jax's upstream `pallas.ops.gpu.paged_attention` on its own layout
    ([kv_heads, pages, page_size, head_dim]) and the XLA reference (skipped where its
    gather would pass ~10 GB); the same for Llama-3-8B GQA (32 q / 8 kv heads) at
    context 2048/8192; and prefill of 4 x 512 new tokens (and 4 x 512 tokens after a
    1536-token prefix, and 4 x 2048 new tokens), reported against the bf16 matmul rate too;
(c) sweeps a few tunables of our kernels at two decode shapes and the prefill shape
    (kernel names "pallas:<tunables>"; the fastest per shape is printed).

Options: --no-sweep (skip (c)), --check-only (only (a)), --smoke (tiny shapes in
interpret mode: runs the whole script on a CPU, to check the script itself).
speedup_vs_xla / speedup_vs_upstream: that baseline's time over the row's time at the
same shape (null where the baseline was not run).

Rows {kernel, phase, model, batch, rank, context, time_us, gbps, read_roofline_fraction,
copy_roofline_fraction, speedup_vs_xla, speedup_vs_upstream, device, ...} go to
<out>/kernels_attention.json (model: llama-2-7b for the MHA shapes, llama-3.1-8b for GQA).
bytes = K and V read once + q read + out written; the fractions divide bytes / time by the read
limit and the copy bandwidth measured at the start of the run (common.device_limits); prefill rows
also carry tflops and flop_fraction (causal FLOPs / time over the bf16 matmul rate measured then).
Timing: common.time_loop (a loop inside one jit).
"""
from __future__ import annotations

import gc
import os
import sys
import time
import traceback
import warnings

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pallas_kernels import reference
from pallas_kernels.gpu import attention

GATHER_LIMIT = 10e9  # skip the XLA reference where its gathered K/V would pass this
LLAMA7B = dict(hq=32, hkv=32, hd=128)
LLAMA3_8B = dict(hq=32, hkv=8, hd=128)


class Cfg:
    """Shapes and modes; `--smoke` shrinks them to run the script on a CPU (interpret)."""

    interpret = False
    mha, gqa = LLAMA7B, LLAMA3_8B
    batches, contexts, gqa_contexts = (32, 128), (512, 2048, 8192), (2048, 8192)
    prefill = ((512, 4, 0), (512, 4, 1536), (2048, 4, 0))  # (chunk, sequences, prefix)
    # mixed steps as a saturated server runs them: (decode rows, their context, prompt chunks, chunk tokens)
    mixed = ((256, 512, 2, 256), (384, 512, 4, 128))
    sweep_shapes = ((128, 2048, "mha"), (32, 2048, "gqa"))
    upstream_kw: dict = {}
    max_len = None  # clip correctness lengths (smoke)
    flops = True  # the prefill rows need the matmul rate (common.device_limits)

    @classmethod
    def smoke(cls):
        cls.interpret = True
        cls.mha, cls.gqa = dict(hq=4, hkv=4, hd=16), dict(hq=8, hkv=2, hd=16)
        cls.batches, cls.contexts, cls.gqa_contexts = (2,), (64,), (64,)
        cls.prefill = ((16, 2, 0), (16, 2, 32), (32, 2, 0))
        cls.mixed = ((4, 32, 1, 16),)
        cls.sweep_shapes = ((2, 64, "mha"), (2, 64, "gqa"))
        cls.upstream_kw = dict(interpret=True, k_splits=1)
        cls.max_len = 40


def _upstream():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import paged_attention as up
        return up.paged_attention
    except Exception as e:  # removed in some jax version
        print(f"upstream paged_attention unavailable: {e}")
        return None


# --------------------------------------------------------------------------- inputs
def decode_inputs(key, batch, ctx, hq, hkv, hd, page_rows, dtype=jnp.bfloat16, lengths=None,
                  layers=1, extra_pages=3):
    """Pool [layers, S, W] with a random page permutation; every sequence ctx tokens."""
    max_pages = -(-ctx // page_rows)
    num_pages = batch * max_pages + extra_pages
    k1, k2, k3 = jax.random.split(key, 3)
    pool = jax.random.normal(k1, (layers, 2 * num_pages * page_rows, hkv * hd), dtype)
    perm = jax.random.permutation(k2, num_pages)[: batch * max_pages].astype(jnp.int32)
    bt = perm.reshape(batch, max_pages)
    q = jax.random.normal(k3, (batch, hq, hd), dtype)
    if lengths is None:
        lengths = jnp.full((batch,), ctx, jnp.int32)
    return q, pool, bt, jnp.asarray(lengths, jnp.int32)


def prefill_inputs(key, chunks, prefixes, hq, hkv, hd, page_rows, dtype=jnp.bfloat16,
                   lead=0, pad=0, layers=1):
    chunks = np.asarray(chunks)
    kv = chunks + np.asarray(prefixes)
    max_pages = int(-(-kv.max() // page_rows))
    nseq = len(chunks)
    num_pages = nseq * max_pages + 2
    k1, k2, k3 = jax.random.split(key, 3)
    pool = jax.random.normal(k1, (layers, 2 * num_pages * page_rows, hkv * hd), dtype)
    perm = jax.random.permutation(k2, num_pages)[: nseq * max_pages].astype(jnp.int32)
    bt = perm.reshape(nseq, max_pages)
    q_starts = jnp.asarray(np.concatenate([[0], np.cumsum(chunks)]) + lead, jnp.int32)
    tokens = int(lead + chunks.sum() + pad)
    q = jax.random.normal(k3, (tokens, hq, hd), dtype)
    return q, pool, bt, q_starts, jnp.asarray(kv, jnp.int32)


# --------------------------------------------------------------------------- (a) correctness
def correctness() -> list[str]:
    failures = []
    key = jax.random.PRNGKey(0)

    def check(name, fn_ours, fn_ref, tol):
        try:
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn_ours())
            dt = time.perf_counter() - t0
            with jax.default_matmul_precision("highest"):
                ref = fn_ref()
            err = common.rel_err(out, ref)
            ok = err < tol
            print(f"{'PASS' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:g}; "
                  f"compile+run {dt:.1f}s)")
        except Exception as e:  # a lowering / compile failure is a FAIL, keep going
            ok = False
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
        if not ok:
            failures.append(name)

    mha, gqa = Cfg.mha, Cfg.gqa
    clip = (lambda xs: [min(x, Cfg.max_len) for x in xs]) if Cfg.max_len else (lambda xs: xs)
    dec_cases = [
        ("decode mha pr16 bf16", mha, 16, [0, 1, 16, 17, 1999], jnp.bfloat16, {}),
        ("decode mha pr16 bf16 split3 bk32", mha, 16, [0, 1, 16, 17, 1999], jnp.bfloat16,
         dict(num_splits=3, block_kv=32)),
        ("decode gqa pr1 bf16", gqa, 1, [4097, 0, 1, 33, 2048, 5, 700], jnp.bfloat16, {}),
        ("decode gqa7 hd64 pr64 bf16 bk128", dict(hq=28, hkv=4, hd=64), 64, [65, 64, 1000],
         jnp.bfloat16, dict(block_kv=128, num_warps=8, num_stages=3)),
        ("decode mha pr8 f32", dict(hq=8, hkv=8, hd=64), 8, [1, 300, 0, 77], jnp.float32, {}),
    ]
    for i, (name, heads, pr, lengths, dtype, tun) in enumerate(dec_cases):
        lengths = clip(lengths)
        ctx = max(lengths)
        q, pool, bt, n = decode_inputs(jax.random.fold_in(key, i), len(lengths), ctx, **heads,
                                       page_rows=pr, dtype=dtype, lengths=lengths, layers=3)
        kw = dict(page_rows=pr, num_pages=pool.shape[1] // (2 * pr), scale=heads["hd"] ** -0.5)
        f = jax.jit(lambda q, pool, layer, bt, n, tun=tun, kw=kw: attention.paged_attention_decode(
            q, pool, layer, bt, n, interpret=Cfg.interpret, **kw, **tun))
        check(name, lambda: f(q, pool, jnp.int32(2), bt, n),
              lambda: reference.paged_attention_decode(q, pool, 2, bt, n, **kw),
              1e-2 if dtype == jnp.bfloat16 else 1e-4)

    pre_cases = [
        ("prefill mha pr16 bf16", mha, 16, [0, 1, 100, 300], [5, 0, 50, 700], 0, 19,
         jnp.bfloat16, {}),
        ("prefill gqa pr8 bf16 lead", gqa, 8, [257, 3, 64], [0, 1000, 17], 2, 5,
         jnp.bfloat16, {}),
        ("prefill gqa pr16 bf16 bq128 w8", gqa, 16, [513, 1, 0, 90], [0, 7, 3, 2000], 0,
         1, jnp.bfloat16, dict(block_q=128, num_warps=8, num_stages=3)),
        ("prefill gqa hd32 pr4 f32", dict(hq=8, hkv=2, hd=32), 4, [37, 1, 12], [0, 60, 5], 0, 3,
         jnp.float32, {}),
    ]
    for i, (name, heads, pr, chunks, prefixes, lead, pad, dtype, tun) in enumerate(pre_cases):
        chunks, prefixes = clip(chunks), clip(prefixes)
        q, pool, bt, qs, kv = prefill_inputs(jax.random.fold_in(key, 100 + i), chunks, prefixes,
                                             **heads, page_rows=pr, dtype=dtype, lead=lead,
                                             pad=pad, layers=2)
        kw = dict(page_rows=pr, num_pages=pool.shape[1] // (2 * pr), scale=heads["hd"] ** -0.5)
        f = jax.jit(lambda q, pool, layer, bt, qs, kv, tun=tun, kw=kw:
                    attention.paged_attention_prefill(q, pool, layer, bt, qs, kv,
                                                      interpret=Cfg.interpret, **kw, **tun))
        check(name, lambda: f(q, pool, jnp.int32(1), bt, qs, kv),
              lambda: reference.paged_attention_prefill(q, pool, 1, bt, qs, kv, **kw),
              1e-2 if dtype == jnp.bfloat16 else 1e-4)
    return failures


# --------------------------------------------------------------------------- (b) timings
def _model(heads) -> str:
    """The Llama whose attention shape this is (the GQA shape is Llama-3.1-8B's)."""
    return "llama-3.1-8b" if heads["hkv"] < heads["hq"] else "llama-2-7b"


def _row(kernel, phase, batch, ctx, seconds, nbytes, limits, device, heads, flops=None, **extra):
    gbps = nbytes / seconds / 1e9
    row = dict(kernel=kernel, phase=phase, model=_model(heads), heads=f"{heads['hq']}/{heads['hkv']}",
               batch=batch, rank=0, context=ctx, time_us=round(seconds * 1e6, 2), gbps=round(gbps, 1),
               **limits.fractions(nbytes, seconds), speedup_vs_xla=None, speedup_vs_upstream=None,
               device=device, **limits.row_fields())
    if flops is not None:
        row["tflops"] = round(flops / seconds / 1e12, 1)
        if limits.matmul_flops:
            row.update(flop_fraction=round(flops / seconds / limits.matmul_flops, 4),
                       matmul_tflops=round(limits.matmul_flops / 1e12, 1))
    row.update(extra)
    return row


def _fill_speedups(rows):
    t = {r["kernel"]: r["time_us"] for r in rows}
    for r in rows:
        if "xla" in t:
            r["speedup_vs_xla"] = round(t["xla"] / r["time_us"], 3)
        if "upstream" in t:
            r["speedup_vs_upstream"] = round(t["upstream"] / r["time_us"], 3)
    return rows


def _print(r):
    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"
    print(f"{r['phase']:>14} {r['kernel']:<34} B={r['batch']:<4} ctx={r['context']:<5} "
          f"{r['time_us']:>9.1f} us {r['gbps']:>7.0f} GB/s  read roof {r['read_roofline_fraction']:.2f}  "
          f"vs xla {f(r['speedup_vs_xla'], '.2f')}  vs upstream "
          f"{f(r['speedup_vs_upstream'], '.2f')}", flush=True)


def time_decode(batch, ctx, heads, limits, device, upstream, *, tunables=(), with_baselines=True,
                phase="decode", page_rows=16):
    """Rows for our kernel (default + each tunables dict), upstream and XLA at one shape."""
    hkv, hd = heads["hkv"], heads["hd"]
    q, pool, bt, n = decode_inputs(jax.random.PRNGKey(batch * 7 + ctx), batch, ctx, **heads,
                                   page_rows=page_rows)
    layer = jnp.int32(0)
    kw = dict(page_rows=page_rows, num_pages=pool.shape[1] // (2 * page_rows), scale=hd ** -0.5)
    nbytes = 2 * batch * ctx * hkv * hd * 2 + 2 * q.size * 2
    rows = []
    for tun in tunables or ({},):  # the default tunables unless sweeping
        name = common.tunables_name("pallas", tun)
        try:
            s = common.time_loop(
                lambda q, pool, layer, bt, n, tun=tun: attention.paged_attention_decode(
                    q, pool, layer, bt, n, interpret=Cfg.interpret, **kw, **tun),
                (q, pool, layer, bt, n))
            rows.append(_row(name, phase, batch, ctx, s, nbytes, limits, device, heads, tunables=tun))
        except Exception as e:
            print(f"{phase} {name} B={batch} ctx={ctx}: {type(e).__name__}: {e}")
    if with_baselines:
        if batch * ctx * hkv * hd * 2 * (2 + 4) <= GATHER_LIMIT:
            s = common.time_loop(
                lambda q, pool, layer, bt, n: reference.paged_attention_decode(
                    q, pool, layer, bt, n, **kw), (q, pool, layer, bt, n))
            rows.append(_row("xla", phase, batch, ctx, s, nbytes, limits, device, heads))
        del pool
        gc.collect()
        if upstream is not None:
            try:
                pages = batch * ctx // page_rows
                k1, k2 = jax.random.split(jax.random.PRNGKey(1))
                kp = jax.random.normal(k1, (hkv, pages, page_rows, hd), jnp.bfloat16)
                vp = jax.random.normal(k2, (hkv, pages, page_rows, hd), jnp.bfloat16)
                s = common.time_loop(lambda q, kp, vp, bt, n: upstream(q, kp, vp, bt, n,
                                                                       **Cfg.upstream_kw),
                                     (q, kp, vp, bt, n))
                rows.append(_row("upstream", phase, batch, ctx, s, nbytes, limits, device, heads))
                del kp, vp
            except Exception as e:
                print(f"upstream B={batch} ctx={ctx}: {type(e).__name__}: {e}")
    gc.collect()
    return _fill_speedups(rows)


def time_prefill(chunk, nseq, prefix, heads, limits, device, *, tunables=(), phase="prefill"):
    hq, hkv, hd = heads["hq"], heads["hkv"], heads["hd"]
    q, pool, bt, qs, kv = prefill_inputs(jax.random.PRNGKey(3), [chunk] * nseq, [prefix] * nseq,
                                         **heads, page_rows=16)
    layer = jnp.int32(0)
    kw = dict(page_rows=16, num_pages=pool.shape[1] // (2 * 16), scale=hd ** -0.5)
    ctx = chunk + prefix
    nbytes = 2 * nseq * ctx * hkv * hd * 2 + 2 * q.size * 2
    # causal FLOPs: 4 * hd * Hq * sum over queries of keys seen
    keys = nseq * (chunk * prefix + chunk * (chunk + 1) / 2)
    flops = 4 * hd * hq * keys
    rows = []
    for tun in tunables or ({},):  # the default tunables unless sweeping
        name = common.tunables_name("pallas", tun)
        try:
            s = common.time_loop(
                lambda q, pool, layer, bt, qs, kv, tun=tun: attention.paged_attention_prefill(
                    q, pool, layer, bt, qs, kv, interpret=Cfg.interpret, **kw, **tun),
                (q, pool, layer, bt, qs, kv), iters=10)
            rows.append(_row(name, phase, nseq, ctx, s, nbytes, limits, device, heads, flops=flops,
                             tokens=nseq * chunk, tunables=tun))
        except Exception as e:
            print(f"{phase} {name}: {type(e).__name__}: {e}")
    if not tunables and nseq * chunk * ctx * hkv * hd * 2 * (2 + 4) <= GATHER_LIMIT:
        s = common.time_loop(
            lambda q, pool, layer, bt, qs, kv: reference.paged_attention_prefill(
                q, pool, layer, bt, qs, kv, **kw), (q, pool, layer, bt, qs, kv), iters=10)
        rows.append(_row("xla", phase, nseq, ctx, s, nbytes, limits, device, heads, flops=flops,
                         tokens=nseq * chunk))
    return _fill_speedups(rows)


def time_mixed(decodes, ctx, nchunks, chunk, heads, limits, device):
    """A mixed step (running decodes at `ctx` beside fresh prompt chunks) through the prefill op, its one-row
    sequences through the decode kernel (the default) and through the prefill kernel: the same run's rows."""
    hkv, hd = heads["hkv"], heads["hd"]
    chunks, prefixes = [1] * decodes + [chunk] * nchunks, [ctx - 1] * decodes + [0] * nchunks
    q, pool, bt, qs, kv = prefill_inputs(jax.random.PRNGKey(5), chunks, prefixes, **heads, page_rows=16,
                                         pad=(-sum(chunks)) % 64)
    kw = dict(page_rows=16, num_pages=pool.shape[1] // (2 * 16), scale=hd ** -0.5)
    nbytes = 2 * int(np.asarray(kv).sum()) * hkv * hd * 2 + 2 * q.size * 2
    rows = []
    for single in (True, False):
        s = common.time_loop(
            lambda q, pool, layer, bt, qs, kv, single=single: attention.paged_attention_prefill(
                q, pool, layer, bt, qs, kv, interpret=Cfg.interpret, decode_single_rows=single, **kw),
            (q, pool, jnp.int32(0), bt, qs, kv), iters=10)
        rows.append(_row("pallas" if single else "pallas:decode_single_rows=False", "mixed", decodes + nchunks,
                         ctx, s, nbytes, limits, device, heads, tokens=decodes + nchunks * chunk,
                         decode_rows=decodes, chunk=chunk))
    return rows


DECODE_SWEEP = [  # the defaults (block_kv 64, 4 warps, 2 stages, auto splits) are in (b)
    dict(block_kv=32, num_warps=4, num_stages=3),
    dict(block_kv=64, num_warps=4, num_stages=3),
    dict(block_kv=64, num_warps=8, num_stages=2),
    dict(block_kv=128, num_warps=4, num_stages=2),
    dict(block_kv=128, num_warps=8, num_stages=3),
    dict(block_kv=64, num_warps=4, num_stages=2, num_splits=1),
    dict(block_kv=64, num_warps=4, num_stages=2, num_splits=4),
]
PREFILL_SWEEP = [  # the defaults (block_q 64, block_kv 64, 4 warps, 2 stages) are in (b)
    dict(block_q=64, block_kv=32, num_warps=4, num_stages=3),
    dict(block_q=128, block_kv=64, num_warps=8, num_stages=2),
    dict(block_q=128, block_kv=64, num_warps=8, num_stages=3),
    dict(block_q=128, block_kv=32, num_warps=4, num_stages=2),
]


def timings(run: common.KernelBenchRun) -> None:
    """(b): decode MHA, decode GQA and prefill, each against upstream and XLA where they run."""
    print(f"== (b) timings; {run.limits.describe()}")
    upstream = _upstream()
    for batch in Cfg.batches:
        for ctx in Cfg.contexts:
            run.emit(time_decode(batch, ctx, Cfg.mha, run.limits, run.device, upstream))
    for batch in Cfg.batches:
        for ctx in Cfg.gqa_contexts:
            run.emit(time_decode(batch, ctx, Cfg.gqa, run.limits, run.device, upstream, phase="decode-gqa"))
    for chunk, nseq, prefix in Cfg.prefill:
        run.emit(time_prefill(chunk, nseq, prefix, Cfg.mha, run.limits, run.device))
    for heads in (Cfg.mha, Cfg.gqa):
        for shape in Cfg.mixed:
            run.emit(time_mixed(*shape, heads, run.limits, run.device))


def sweep(run: common.KernelBenchRun) -> None:
    """(c): our kernels' tunables at the sweep shapes; prints the fastest per shape."""
    print("== (c) tunables sweep")
    for batch, ctx, kind in Cfg.sweep_shapes:
        heads = Cfg.mha if kind == "mha" else Cfg.gqa
        tunables = DECODE_SWEEP + [dict(block_kv=64, num_warps=4, num_stages=2,
                                        num_splits=8)] * (kind == "gqa")
        phase = f"decode-{kind}-sweep"
        res = run.emit(time_decode(batch, ctx, heads, run.limits, run.device, None, tunables=tunables,
                                   with_baselines=False, phase=phase))
        if res:
            best = min(res, key=lambda r: r["time_us"])
            print(f"   best {phase} B={batch} ctx={ctx}: {best['kernel']}")
    chunk, nseq, prefix = Cfg.prefill[0]
    res = run.emit(time_prefill(chunk, nseq, prefix, Cfg.mha, run.limits, run.device,
                                tunables=PREFILL_SWEEP, phase="prefill-sweep"))
    if res:
        print(f"   best prefill: {min(res, key=lambda r: r['time_us'])['kernel']}")


def main(argv=None) -> int:
    return common.kernel_bench_main(argv, doc=__doc__, cfg=Cfg, correctness=correctness, timings=timings,
                                    sweep=sweep, print_row=_print, out_file="kernels_attention.json")


if __name__ == "__main__":
    sys.exit(main())
