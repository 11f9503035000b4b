"""The kernels of a model step run per device, inside `shard_map`, on local slices under tensor
parallelism: local heads, local pool columns (see slora_jax/parallel.py for the partitioning). Under
lora_tp="replicated" no LoRA op has a collective of its own; under "sharded" every shrink ends in one."""
from __future__ import annotations

import functools
import inspect

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels import KernelSet

from ..config import LORA_TP, ConfigError
from ..parallel import COLS, HEADS, POOL, REP, TP


def shard_map(f, mesh: Mesh, in_specs, out_specs):
    """`jax.shard_map` (jax >= 0.7) or the older `jax.experimental.shard_map`. Replication checking is
    off: the Pallas kernels inside have no rules for it, and every replicated output is a psum."""
    if hasattr(jax, "shard_map"):
        params = inspect.signature(jax.shard_map).parameters
        check = {"check_vma": False} if "check_vma" in params else {"check_rep": False}
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **check)
    from jax.experimental.shard_map import shard_map as legacy

    return legacy(f, mesh, in_specs, out_specs, check_rep=False)


def shard_kernels(ks: KernelSet, mesh: Mesh, lora_tp: str = "replicated") -> KernelSet:
    """The same ops, each run by every device on its local slice (local heads, local pool columns), for
    adapter rows laid out in the pool as `lora_tp` (parallel.lora_widths says what each device holds)."""
    if lora_tp not in LORA_TP:
        raise ConfigError(f"lora_tp must be one of {list(LORA_TP)}, got {lora_tp!r}")
    tp = mesh.shape[TP]
    whole = lora_tp == "replicated"
    sm = functools.partial(shard_map, mesh=mesh)

    def lora_shrink(x, pool, layer, seg_starts, seg_ranks, a_rows, *, partials=False):
        # x is a column-parallel input, whole on every device (row-parallel shrinks happen inside
        # row_linear). x enters whole: asking for it split would make XLA split the RMSNorm before it and
        # all-gather its output.
        if whole:  # every device holds the whole A^T rows and computes x @ A itself: the same everywhere
            f = functools.partial(ks.lora_shrink, partials=partials)
            return sm(f, in_specs=(REP, POOL, REP, REP, REP, REP), out_specs=REP)(
                x, pool, layer, seg_starts, seg_ranks, a_rows)

        # sharded: each device contracts its 1/tp of the features against its slice of the A^T rows and
        # the partial [M, T, R] results are summed: the LoRA collective
        def body(x, pool, layer, seg_starts, seg_ranks, a_rows):
            n = x.shape[1] // tp
            x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(TP) * n, n, axis=1)
            return jax.lax.psum(ks.lora_shrink(x, pool, layer, seg_starts, seg_ranks, a_rows), TP)
        v = sm(body, in_specs=(REP, POOL, REP, REP, REP, REP), out_specs=REP)(
            x, pool, layer, seg_starts, seg_ranks, a_rows)
        return v[None] if partials else v  # summed before the psum: the collective stays [M, T, R]

    def lora_expand_group(ys, v, pool, layer, seg_starts, seg_ranks, b_rows):
        # column-parallel outputs: device d's B-row slice is exactly its output columns; no collective
        ys, b_rows = tuple(ys), tuple(b_rows)
        specs = ((COLS,) * len(ys), REP, POOL, REP, REP, REP, (REP,) * len(b_rows))
        return sm(ks.lora_expand_group, in_specs=specs, out_specs=(COLS,) * len(ys))(
            ys, v, pool, layer, seg_starts, seg_ranks, b_rows)

    # the pool is split along its width only: every device's slice has the global page geometry
    def write_kv(pool, layer, k, v, kv_rows, *, page_rows, num_pages):
        f = functools.partial(ks.write_kv, page_rows=page_rows, num_pages=num_pages)
        return sm(f, in_specs=(POOL, REP, COLS, COLS, REP), out_specs=POOL)(pool, layer, k, v, kv_rows)

    def attention_decode(q, pool, layer, block_tables, lengths, *, page_rows, num_pages, scale):
        f = functools.partial(ks.attention_decode, page_rows=page_rows, num_pages=num_pages, scale=scale)
        return sm(f, in_specs=(HEADS, POOL, REP, REP, REP), out_specs=HEADS)(q, pool, layer, block_tables, lengths)

    def attention_prefill(q, pool, layer, block_tables, q_starts, kv_lens, *, page_rows, num_pages, scale):
        f = functools.partial(ks.attention_prefill, page_rows=page_rows, num_pages=num_pages, scale=scale)
        return sm(f, in_specs=(HEADS, POOL, REP, REP, REP, REP), out_specs=HEADS)(
            q, pool, layer, block_tables, q_starts, kv_lens)

    def row_linear(x, w, pool, layer, lora):
        """x @ w (+ LoRA) of o/down: x split by features, w by rows; the output is whole. The LoRA term
        joins this device's partial sum before the one all-reduce of the base linear."""
        def body(x, w, pool, layer, *tabs):
            y = x @ w  # this device's partial sum, full width
            if tabs and whole:
                # A split by input rows like w: x_d @ A_d is this device's part of x @ A. B whole: expanding
                # it over the full width adds x_d A_d B to the partial sum, and the sum over devices is x A B
                seg_starts, ranks, a_rows, b_rows = tabs
                v = ks.lora_shrink(x, pool, layer, seg_starts, ranks[None], a_rows[None], partials=True)
                (y,) = ks.lora_expand_group((y,), v, pool, layer, seg_starts, ranks[None], (b_rows,))
            elif tabs:
                seg_starts, ranks, a_rows, b_rows = tabs
                v = jax.lax.psum(ks.lora_shrink(x, pool, layer, seg_starts, ranks[None], a_rows[None])[0], TP)
                # device d's B-row slice holds output columns d*n:(d+1)*n: add them into its partial sum,
                # so the base all-reduce below also carries the LoRA term (counted once, by device d)
                n = y.shape[1] // tp
                lo = jax.lax.axis_index(TP) * n
                part = jax.lax.dynamic_slice_in_dim(y, lo, n, axis=1)
                (part,) = ks.lora_expand_group((part,), v[None], pool, layer, seg_starts, ranks[None], (b_rows,))
                y = jax.lax.dynamic_update_slice_in_dim(y, part, lo, axis=1)
            return jax.lax.psum(y, TP)
        tabs = () if lora is None else tuple(lora)
        return sm(body, in_specs=(COLS, P(TP, None), POOL, REP) + (REP,) * len(tabs), out_specs=REP)(
            x, w, pool, layer, *tabs)

    return KernelSet(f"{ks.name}+tp{tp}-{lora_tp}", lora_shrink, lora_expand_group, write_kv, attention_decode,
                     attention_prefill, row_linear)
