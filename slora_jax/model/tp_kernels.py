"""The kernels of a model step run per device, inside `shard_map`, on local slices under tensor
parallelism: local heads, local pool columns (see slora_jax/parallel.py for the partitioning)."""
from __future__ import annotations

import functools
import inspect

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels import KernelSet

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


def shard_kernels(ks: KernelSet, mesh: Mesh) -> KernelSet:
    """The same ops, each run by every device on its local slice (local heads, local pool columns)."""
    tp = mesh.shape[TP]
    sm = functools.partial(shard_map, mesh=mesh)

    def lora_shrink(x, pool, layer, seg_starts, seg_ranks, a_rows, *, partials=False):
        # x is a column-parallel input, whole on every device (row-parallel shrinks happen inside
        # row_linear). Each device contracts its 1/tp of the features against its slice of the A^T rows
        # and the partial [M, T, R] results are summed: the LoRA collective. x enters whole and is sliced
        # here: asking for it split would make XLA split the RMSNorm before it and all-gather its output.
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
        """x @ w (+ LoRA) of o/down: x split by features, w by rows; the output is whole."""
        def body(x, w, pool, layer, *tabs):
            y = x @ w  # this device's partial sum, full width
            if tabs:
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

    return KernelSet(f"{ks.name}+tp{tp}", lora_shrink, lora_expand_group, write_kv, attention_decode,
                     attention_prefill, row_linear)
