"""Segmented multi-LoRA kernels on the GPU: correctness, timings, a small tunables sweep.

    python benchmarks/bench_lora.py --out $OUT

(a) compiles `lora_shrink` / `lora_expand` (interpret=False) and checks them against
    the XLA reference on random bf16 inputs at awkward shapes (odd T, 1-token and
    empty segments, rank 0, padding tokens, ranks up to 128, D not a multiple of W,
    M = 3 fused shrink, tunables other than the defaults) plus one float32 case:
    prints PASS/FAIL and the relative error; padding / rank-0 rows must be exactly 0
    (shrink) or untouched (expand); exit status 1 if any check failed;
(b) times shrink + expand of one 4096-wide projection (Llama-2-7B: pool width W = 4096, bf16
    pool with a random row permutation) for decode batch 32/128/512 with
    all-distinct adapters of rank 8/16/64, and prefill of 4 x 512 tokens with 4
    adapters, for "pallas" (pallas_kernels.gpu.lora, default tunables) and "xla" (the reference); then
    the Llama-3.1-8B pool (W = 1024: each 4096-wide matrix row spans 4 pool rows) at decode
    batch 128/512, ranks 8/16/64;
(c) sweeps a few tunables of each kernel (each variant with the other kernel's defaults),
    within the time budget; the defaults and the one-token mode (block_t = 1) among them; first a
    mixed and a prefill step with the segment tables the engine gives them (`Cfg.sweep_steps`), one
    token a program (the default there) against token blocks.

Rows {kernel, phase, model, batch, rank, context (0), time_us, gbps, read_roofline_fraction,
copy_roofline_fraction, speedup_vs_xla, device, ...} go to <out>/kernels_lora.json (the sweep's
rows too, with phase "...-sweep-shrink" / "...-sweep-expand" and their tunables). bytes = x
read + each distinct adapter row (A and B) read once + y read and written; the fractions divide
bytes / time by the read limit and by the copy bandwidth measured at the start of the run
(common.device_limits). Timing:
common.time_loop (20 calls unrolled inside one jit); each call takes y from the last
as its x, so nothing is hoisted, and the calls rotate among sets of adapter rows
(sized past the L2 cache), so none reads its rows from the cache. Rows of (b) also
carry device_us (every kernel of a call, from a profiler trace: no host launch
gaps, the figure comparable to a CUDA-graph timing), device_read_roofline_fraction (and
device_copy_roofline_fraction), and each
kernel's share (device_us_shrink, device_us_expand; sweep rows too).
"""
from __future__ import annotations

import functools
import gc
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pallas_kernels import reference
from pallas_kernels.gpu import lora


class Cfg:
    """Shapes and modes; `--smoke` shrinks them to run the script on a CPU (interpret)."""

    interpret = False
    d = 4096  # hidden size (the projection is d -> d)
    w = 4096  # pool row width (Llama-2-7B: = d)
    model = "llama-2-7b"
    # the Llama-3.1-8B pool (W = num_kv_heads * head_dim = 1024), decode only: (batches, ranks)
    gqa = dict(model="llama-3.1-8b", w=1024, batches=(128, 512), ranks=(8, 16, 64))
    batches, ranks = (32, 128, 512), (8, 16, 64)
    prefill = (4, 512)  # sequences x tokens, one adapter each
    sweep_decode = ((32, 16), (512, 8), (128, 16), (32, 64), (512, 16), (128, 64), (32, 8), (128, 8),
                    (512, 64))  # most telling first
    sweep_prefill_rank = 16
    # steps as the engine builds them with max_running 384: a prefill or mixed step's tables have a segment
    # per sequence row of its bucket, B = min(T, 384), unused ones empty, so `decode_like` (T <= 8 B) picks
    # one token a program for every step up to 3,072 tokens, prompt chunks included (4,096 with the H200's
    # S1, max_running 385 and so 512 rows). Each
    # shape: (phase, one-token segments, chunks, chunk tokens, segment rows, rank), its defaults against
    # token blocks
    sweep_steps = (("mixed", 256, 2, 256, 384, 8), ("prefill-rows", 0, 4, 512, 384, 8))
    budget_s = 330.0  # the sweep starts no new shape past this
    big = True  # correctness shapes at Llama sizes
    max_sets = 20  # rotated input sets per timing (lora_inputs)

    @classmethod
    def smoke(cls):
        cls.interpret = True
        cls.d = cls.w = 128
        cls.gqa = dict(model="llama-3.1-8b", w=32, batches=(9,), ranks=(8,))
        cls.batches, cls.ranks = (4, 9), (8, 16)
        cls.prefill = (2, 40)
        cls.sweep_decode = ((9, 16),)
        cls.sweep_prefill_rank = 8
        cls.sweep_steps = (("mixed", 6, 1, 20, 12, 8), ("prefill-rows", 0, 2, 40, 12, 8))
        cls.big = False
        cls.max_sets = 3


def _cdiv(a, b):
    return -(-a // b)


# --------------------------------------------------------------------------- inputs
def make_case(seed, *, seg_lens, t, ranks, r, d_in, d_out, w, start0=0, dtype=jnp.bfloat16,
              pool_rows=4096, layers=2):
    """Random pool (rows drawn with repeats) and tables; junk rows for j >= rank."""
    rng = np.random.default_rng(seed)
    ranks = np.asarray(ranks, np.int32)
    m, ns = ranks.shape
    starts = (start0 + np.concatenate([[0], np.cumsum(seg_lens)])).astype(np.int32)
    assert starts[-1] <= t and ranks.max() <= r
    key = jax.random.PRNGKey(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    pool = jax.random.normal(k1, (layers, pool_rows, w), dtype) * jnp.asarray(w ** -0.5, dtype)
    a_rows = rng.integers(0, pool_rows, (m, ns, r, _cdiv(d_in, w))).astype(np.int32)
    b_rows = rng.integers(0, pool_rows, (ns, r, _cdiv(d_out, w))).astype(np.int32)
    return dict(
        x=jax.random.normal(k2, (t, d_in), jnp.float32).astype(dtype),
        y=jax.random.normal(k3, (t, d_out), jnp.float32).astype(dtype),
        v=jnp.asarray(rng.standard_normal((t, r)).astype(np.float32)),
        pool=pool, seg_starts=jnp.asarray(starts), ranks=jnp.asarray(ranks),
        a_rows=jnp.asarray(a_rows), b_rows=jnp.asarray(b_rows),
    )


def dead_tokens(seg_starts, ranks_row, t):
    """Tokens without a LoRA term for one module: padding, before the first segment, rank 0."""
    starts = np.asarray(seg_starts)
    ns = len(starts) - 1
    seg = np.searchsorted(starts, np.arange(t), side="right") - 1
    valid = (seg >= 0) & (seg < ns)
    return ~valid | (np.asarray(ranks_row)[np.clip(seg, 0, ns - 1)] == 0)


# --------------------------------------------------------------------------- (a) correctness
def correctness() -> list[str]:
    failures = []
    d = Cfg.d

    def check(name, c, shrink_kw=None, expand_kw=None, layer=1, tol=1e-2):
        for op, kw in (("shrink", shrink_kw), ("expand", expand_kw)):
            if kw is None:
                continue
            label = f"{op} {name}" + (f" {kw}" if kw else "")
            try:
                t0 = time.perf_counter()
                if op == "shrink":
                    f = jax.jit(lambda x, pool, layer, ss, rk, rows, kw=kw: lora.lora_shrink(
                        x, pool, layer, ss, rk, rows, interpret=Cfg.interpret, **kw))
                    args = (c["x"], c["pool"], jnp.int32(layer), c["seg_starts"], c["ranks"],
                            c["a_rows"])
                    out = jax.block_until_ready(f(*args))
                    with jax.default_matmul_precision("highest"):
                        ref = reference.lora_shrink(*args)
                    dead = np.stack([dead_tokens(c["seg_starts"], rk, out.shape[1])
                                     for rk in np.asarray(c["ranks"])])
                    extra_ok = not np.asarray(out)[dead].any()
                    extra = "" if extra_ok else "; dead rows not 0"
                else:
                    f = jax.jit(lambda y, v, pool, layer, ss, rk, rows, kw=kw: lora.lora_expand(
                        y, v, pool, layer, ss, rk, rows, interpret=Cfg.interpret, **kw))
                    args = (c["y"], c["v"], c["pool"], jnp.int32(layer), c["seg_starts"],
                            c["ranks"][0], c["b_rows"])
                    out = jax.block_until_ready(f(*args))
                    with jax.default_matmul_precision("highest"):
                        ref = reference.lora_expand(*args)
                    dead = dead_tokens(c["seg_starts"], c["ranks"][0], out.shape[0])
                    extra_ok = np.array_equal(np.asarray(out, np.float32)[dead],
                                              np.asarray(c["y"], np.float32)[dead])
                    extra = "" if extra_ok else "; dead rows changed"
                dt = time.perf_counter() - t0
                err = common.rel_err(out, ref)
                ok = err < tol and extra_ok
                print(f"{'PASS' if ok else 'FAIL'} {label}: rel err {err:.2e} (tol {tol:g}{extra}; "
                      f"compile+run {dt:.1f}s)", flush=True)
            except Exception as e:  # a lowering / compile failure is a FAIL, keep going
                ok = False
                print(f"FAIL {label}: {type(e).__name__}: {e}")
                traceback.print_exc(limit=4)
            if not ok:
                failures.append(label)

    rng = np.random.default_rng(0)
    # Decode: 33 one-token segments, ranks 0..16, 4 padding tokens.
    c = make_case(1, seg_lens=[1] * 33, t=37, ranks=[rng.integers(0, 17, 33)], r=16, d_in=d,
                  d_out=d, w=d)
    check("decode T37 NS33 R<=16", c, {}, {})
    check("decode T37 NS33 R<=16", c, dict(k_splits=1, block_d=256), dict(block_r=32, block_d=128))
    one_token = (dict(block_t=1, block_r=8, block_d=512, k_splits=2), dict(block_t=1, block_r=8, block_d=512))
    check("decode T37 NS33 R<=16", c, *one_token)
    # Decode, fused q/k/v shrink (M=3), GQA-like pool width (W = D/4, K_in = 4), k/v out = W.
    ns = 300 if Cfg.big else 20
    c = make_case(2, seg_lens=[1] * ns, t=ns + 5, ranks=rng.integers(0, 65, (3, ns)), r=64,
                  d_in=d, d_out=d // 4, w=d // 4, start0=2)
    check(f"decode M3 NS{ns} R<=64 K_in4", c, {}, {})
    check(f"decode M3 NS{ns} R<=64 K_in4", c, dict(block_t=1, block_r=32, block_d=256, k_splits=4),
          dict(block_t=1, block_r=64, block_d=128))
    # Prefill: long, empty and 1-token segments; D_out = 11008 (K_out = 3, partial last row).
    lens = [300, 0, 257, 1, 400] if Cfg.big else [30, 0, 25, 1, 40]
    d_ff = 11008 if Cfg.big else 344
    c = make_case(3, seg_lens=lens, t=sum(lens) + 42, ranks=[[64, 8, 0, 16, 33]], r=64, d_in=d,
                  d_out=d_ff, w=d)
    check("prefill NS5 R<=64 D_out11008", c, {}, {})
    check("prefill NS5 R<=64 D_out11008", c, dict(k_splits=1, block_t=32),
          dict(block_t=128, block_r=32, num_warps=8))
    # Mixed lengths and ranks 1..128, seg_starts[0] > 0, D_in = 11008 (K_in = 3).
    lens = list(rng.integers(0, 60 if Cfg.big else 12, 17))
    lens[3] = 0
    lens[5] = 1
    c = make_case(4, seg_lens=lens, t=3 + sum(lens) + 7, ranks=[rng.integers(1, 129, 17)],
                  r=128, d_in=d_ff, d_out=d, w=d, start0=3)
    check("mixed NS17 R<=128 D_in11008", c, {}, {})
    check("mixed NS17 R<=128 D_in11008", c, *one_token)
    if Cfg.big:
        # A pool past 4 GiB (2 x 300k rows x 4096 bf16): 64-bit offsets in the row gathers.
        c = make_case(6, seg_lens=[1] * 16, t=16, ranks=[rng.integers(1, 17, 16)], r=16, d_in=d,
                      d_out=d, w=d, pool_rows=300_000)
        check("decode pool 4.9GB", c, {}, {})
        del c
        gc.collect()
    # float32 pool, tiny odd widths.
    c = make_case(5, seg_lens=[3, 0, 1, 9, 1], t=17, ranks=[[20, 3, 0, 7, 1]], r=20, d_in=50,
                  d_out=40, w=24, dtype=jnp.float32, pool_rows=64)
    check("f32 D_in50 D_out40 W24", c, {}, {}, tol=1e-4)
    check("f32 D_in50 D_out40 W24", c, dict(block_t=1, block_r=4, block_d=16, k_splits=2),
          dict(block_t=1, block_r=4, block_d=16), tol=1e-4)
    return failures


# --------------------------------------------------------------------------- (b) timings
L2_FLUSH_BYTES = 256 << 20  # adapter rows touched across the rotated input sets: several times the H200's L2


def lora_inputs(seed, seg_lens, rank, d, w=None):
    """One projection d -> d over a pool of width w (default d), every segment its own adapter (distinct
    pool rows; a matrix row spans d / w pool rows).

    Returns (args, arg_sets, nbytes): args for common.time_loop, and further sets of the
    non-carry args, each naming other pool rows, enough that the rows read by one call are no longer
    in the L2 cache when its set comes round again (METHOD.md: rotate among several input sets).
    """
    w = w or d
    k = _cdiv(d, w)  # pool rows per matrix row
    ns = len(seg_lens)
    t = int(sum(seg_lens))
    n_rows = 2 * ns * rank * k  # pool rows of one set: A and B of every segment's adapter
    n_sets = max(1, min(Cfg.max_sets, _cdiv(L2_FLUSH_BYTES, n_rows * w * 2)))
    key = jax.random.PRNGKey(seed)
    k1, k2 = jax.random.split(key)
    total = n_sets * n_rows + 8
    pool = (jax.random.normal(k1, (2, total, w), jnp.float32) * 0.02).astype(jnp.bfloat16)
    perm = np.random.default_rng(seed).permutation(total)[: n_sets * n_rows].astype(np.int32)
    y = jax.random.normal(k2, (t, d), jnp.bfloat16)
    starts = jnp.asarray(np.concatenate([[0], np.cumsum(seg_lens)]).astype(np.int32))
    # empty segments (a step's unused sequence rows, as the engine pads its tables) have rank 0, as there
    used = int(np.count_nonzero(seg_lens))
    ranks = jnp.asarray(np.where(np.asarray(seg_lens) > 0, rank, 0).reshape(1, ns).astype(np.int32))
    sets = []
    for rows in perm.reshape(n_sets, n_rows):
        a_rows = jnp.asarray(rows[: ns * rank * k].reshape(1, ns, rank, k))
        b_rows = jnp.asarray(rows[ns * rank * k:].reshape(ns, rank, k))
        sets.append((pool, starts, ranks, a_rows, b_rows))
    nbytes = (t * d * 2  # x read
              + 2 * used * rank * d * 2  # A and B rows of the non-empty segments, each distinct row once
              + 2 * t * d * 2)  # y read + written
    return (y, *sets[0]), sets[1:], nbytes


def _both(impl, shrink_kw, expand_kw):
    """One call of shrink + expand: "pallas" (the Triton kernels, with these tunables) or "xla"."""
    if impl == "pallas":
        shrink = functools.partial(lora.lora_shrink, interpret=Cfg.interpret, **shrink_kw)
        expand = functools.partial(lora.lora_expand_group, interpret=Cfg.interpret, **expand_kw)
    else:
        shrink, expand = reference.lora_shrink, reference.lora_expand_group

    def body(y, pool, starts, ranks, a_rows, b_rows):
        # as the model runs it: the expand adds up the shrink's split-K partial sums
        v = shrink(y, pool, 1, starts, ranks, a_rows, partials=True)
        (out,) = expand((y,), v, pool, 1, starts, ranks, (b_rows,))
        return out
    return body


KERNEL_PARTS = ("lora_shrink", "lora_expand")


def _parts(parts: dict) -> dict:
    """A row's per-kernel device times: device_us_shrink, device_us_expand."""
    return {f"device_us_{k.split('_')[1]}": round(v, 2) for k, v in parts.items()}


def _row(kernel, phase, batch, rank, seconds, nbytes, limits, device, model, device_us=None, **extra):
    gbps = nbytes / seconds / 1e9
    row = dict(kernel=kernel, phase=phase, model=model, batch=batch, rank=rank, context=0,
               time_us=round(seconds * 1e6, 2), gbps=round(gbps, 1), **limits.fractions(nbytes, seconds),
               speedup_vs_xla=None, device=device, **limits.row_fields())
    if device_us:  # kernels' device time per call, and the roofline fractions it reaches
        row.update(device_us=round(device_us, 2),
                   **{"device_" + k: v for k, v in limits.fractions(nbytes, device_us * 1e-6).items()})
    row.update(extra)
    return row


def _print(r):
    sp = r["speedup_vs_xla"]
    print(f"{r['phase']:>22} {r['kernel']:<40} B={r['batch']:<4} r={r['rank']:<3} "
          f"{r['time_us']:>9.1f} us {r['gbps']:>7.0f} GB/s  read roof {r['read_roofline_fraction']:.2f}  "
          f"device {format(r['device_us'], '7.1f') + ' us' if r.get('device_us') else '-':>10}  "
          f"vs xla {'-' if sp is None else format(sp, '.2f')}"
          + (f"  (shrink {r['device_us_shrink']:.1f} + expand {r['device_us_expand']:.1f} us)"
             if "device_us_shrink" in r else ""), flush=True)


def time_case(phase, seg_lens, rank, limits, device, *, batch, shrink_sweep=(), expand_sweep=(), model=None,
              w=None):
    """Default tunables, Pallas and the XLA reference (no sweep given), or the sweep's tunables alone.
    `model`, `w`: the pool's model and row width (default: Cfg's, Llama-2-7B)."""
    model, w = model or Cfg.model, w or Cfg.w
    args, arg_sets, nbytes = lora_inputs(len(seg_lens) * 1000 + rank, seg_lens, rank, Cfg.d, w)
    t, ns, d = int(sum(seg_lens)), len(seg_lens), Cfg.d
    extra = dict(tokens=t, segments=ns, pool_width=w)
    rows = []
    sweeping = bool(shrink_sweep or expand_sweep)
    if not sweeping:
        tun = dict(shrink=lora.shrink_defaults(t, ns, 1, rank, d, w),
                   expand=lora.expand_defaults(t, ns, rank, w))
        for impl in ("pallas", "xla"):
            # with the device time of every kernel of a call (profiler trace: the LoRA kernels and
            # XLA's y + delta, or the reference's ops), the figure comparable to a CUDA-graph timing
            s, dev, parts = common.time_loop(_both(impl, {}, {}), args, arg_sets=arg_sets,
                                             split=KERNEL_PARTS)
            rows.append(_row(impl, phase, batch, rank, s, nbytes, limits, device, model, device_us=dev,
                             **(_parts(parts) if impl == "pallas" else {}), **extra))
        rows[0]["tunables"] = tun
        for r in rows:
            r["speedup_vs_xla"] = round(rows[-1]["time_us"] / r["time_us"], 3)
    # each variant of one kernel runs with the other's defaults; the trace gives each kernel's own time
    for kind, sweep_list in (("shrink", shrink_sweep), ("expand", expand_sweep)):
        for tun in sweep_list:
            try:
                body = _both("pallas", tun, {}) if kind == "shrink" else _both("pallas", {}, tun)
                s, dev, parts = common.time_loop(body, args, arg_sets=arg_sets, split=KERNEL_PARTS)
                rows.append(_row(common.tunables_name(kind, tun), f"{phase}-sweep-{kind}", batch, rank, s,
                                 nbytes, limits, device, model, device_us=dev, tunables=tun, **_parts(parts),
                                 **extra))
            except Exception as e:
                print(f"{phase} {kind} {tun}: {type(e).__name__}: {e}")
    del args, arg_sets
    gc.collect()
    return rows


# the defaults first (the sweep's baseline), then one change at a time (k_splits is re-derived unless given)
SHRINK_SWEEP_DECODE = [
    {}, dict(k_splits=1), dict(k_splits=2), dict(k_splits=4), dict(k_splits=8), dict(block_d=512),
    dict(block_r=8), dict(block_r=32), dict(num_warps=8), dict(num_warps=2), dict(block_t=16),
]
EXPAND_SWEEP_DECODE = [
    {}, dict(block_t=1), dict(block_t=16), dict(block_d=512), dict(block_d=256), dict(block_r=16),
    dict(num_warps=2), dict(num_warps=8), dict(block_t=1, block_r=16, block_d=256),
]
SHRINK_SWEEP_PREFILL = [
    {}, dict(k_splits=1), dict(k_splits=2), dict(k_splits=4), dict(k_splits=8),
    dict(block_t=32), dict(block_t=128, num_warps=8), dict(block_d=64), dict(block_d=256),
]
# either kernel on the engine-shaped steps: one token a program (the default there) against token blocks
SWEEP_STEPS = [{}, dict(block_t=16), dict(block_t=32), dict(block_t=64)]
EXPAND_SWEEP_PREFILL = [
    {}, dict(block_t=32), dict(block_t=128), dict(block_d=256), dict(num_warps=8), dict(block_r=16),
]


def timings(run: common.KernelBenchRun) -> None:
    """(b): pallas and xla shrink + expand, decode at every batch x rank, then prefill at every rank
    (Llama-2-7B pool), then decode on the Llama-3.1-8B pool."""
    print(f"== (b) timings, shrink + expand of one {Cfg.d}-wide projection; {run.limits.describe()}")
    for batch in Cfg.batches:
        for rank in Cfg.ranks:
            run.emit(time_case("decode", [1] * batch, rank, run.limits, run.device, batch=batch))
    nseq, chunk = Cfg.prefill
    for rank in Cfg.ranks:
        run.emit(time_case("prefill", [chunk] * nseq, rank, run.limits, run.device, batch=nseq))
    g = Cfg.gqa
    for batch in g["batches"]:
        for rank in g["ranks"]:
            run.emit(time_case("decode", [1] * batch, rank, run.limits, run.device, batch=batch,
                               model=g["model"], w=g["w"]))


def sweep(run: common.KernelBenchRun) -> None:
    """(c): each kernel's tunables at the sweep shapes, most telling first, until the time budget is spent."""
    print("== (c) tunables sweep (each kernel's variants with the other's defaults; device time per kernel)")
    nseq, chunk = Cfg.prefill
    shapes = [(phase, [1] * nd + [tokens] * nc + [0] * (rows - nd - nc), r, nd + nc, SWEEP_STEPS, SWEEP_STEPS)
              for phase, nd, nc, tokens, rows, r in Cfg.sweep_steps]
    shapes += [("decode", [1] * b, r, b, SHRINK_SWEEP_DECODE, EXPAND_SWEEP_DECODE)
               for b, r in Cfg.sweep_decode]
    shapes.append(("prefill", [chunk] * nseq, Cfg.sweep_prefill_rank, nseq, SHRINK_SWEEP_PREFILL,
                   EXPAND_SWEEP_PREFILL))
    for phase, lens, rank, batch, ss, es in shapes:
        if run.elapsed() > Cfg.budget_s:
            print(f"   sweep stopped: past the {Cfg.budget_s:.0f}s budget")
            break
        res = run.emit(time_case(phase, lens, rank, run.limits, run.device, batch=batch,
                                 shrink_sweep=ss, expand_sweep=es))
        for kind in ("shrink", "expand"):
            part = [r for r in res if r["phase"].endswith(kind)]
            if part:
                best = min(part, key=lambda r: r["time_us"])
                print(f"   best {phase} {kind} B={batch} r={rank}: {best['kernel']} "
                      f"{best['time_us']:.1f} us")


def main(argv=None) -> int:
    return common.kernel_bench_main(argv, doc=__doc__, cfg=Cfg, correctness=correctness, timings=timings,
                                    sweep=sweep, print_row=_print, out_file="kernels_lora.json")


if __name__ == "__main__":
    sys.exit(main())
