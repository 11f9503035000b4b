"""The unified pool's geometry (`PoolLayout`), where an adapter's rows go in it, and the waste.

`PoolLayout` is computed once from the model and engine configs and handed to
everything that indexes the pool (the pool array, the page table, the adapter
cache, the batch builder; kernels get its ints through the step input), so the
geometry is decided here and nowhere else.

The pool is ``pool[L, S, W]`` with ``S = 2 * N * page_rows`` rows of width W.
Page ``p`` (``0 <= p < N``) owns two blocks of ``page_rows`` rows: its K block,
rows ``[p * pr, (p + 1) * pr)``, and its V block, rows ``[(N + p) * pr, ...)``.
A page holds either ``page_rows`` tokens of one sequence (token ``i``'s K at
row ``pages[i // pr] * pr + i % pr``, its V ``N * pr`` rows further) or
``2 * page_rows`` rows of one adapter (K block first, then V block).

Pool rows are W = num_kv_heads * head_dim wide: one token's K (or V) for one
layer fills exactly one row, so GQA models waste no KV memory (S-LoRA's page
width H would waste 3/4 of it on Llama-3-8B). An adapter matrix row of width D
(a column of A, a row of B) takes K = ceil(D / W) pool rows, zero-padded. For
each targeted module, in config.LORA_MODULES order, an adapter stores its r
A^T rows (K_in pool rows each) then its r B rows (K_out each); the same flat
row list is used in every layer (the pool has a layer axis).

Under tensor parallelism the pool's columns are split over tp devices, W/tp
each, and a matrix row's K pool rows give every device a local row of
K * W/tp elements. What a device holds of each row follows the lora_tp layout
(parallel.lora_widths): 1/tp of it for a half split like the base weight, the
whole row for a half every device needs whole (A of q, k, v, gate, up and B of
o, down under "replicated"), which then takes K = ceil(D / (W/tp)) pool rows:
about tp times as many as on one device. `module_rows` is that count per module,
computed once into `PoolLayout.module_rows`; `pack` lays the rows out so, and
the kernels read a local row exactly as they read a whole one on one device.

Waste (padding inside adapter rows; KV rows never waste):
- Llama-2-7B (W = 4096, I = 11008): only MLP rows pad, 11008 -> 12288 (10.4%
  of such a row); an adapter on all 7 modules wastes 4.7% of its rows, one on
  q,k,v,o wastes nothing.
- Llama-3-8B (W = 1024): H = 4096 and I = 14336 are multiples of W: 0%.
- Llama-2-13B (W = 5120, I = 13824 -> 15360): 4.5% on all 7 modules, 0% on attention.
Pages add at most one partly filled page per resident adapter.
`waste_report(cfg)` computes these figures.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..config import LORA_MODULES, EngineConfig, ModelConfig
from ..parallel import lora_widths


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def row_width(cfg: ModelConfig) -> int:
    return cfg.kv_size


def rows_per_vector(cfg: ModelConfig, width: int, tp: int = 1) -> int:
    """Pool rows one matrix row (a column of A, a row of B) takes when each device holds `width` elements
    of it in its W/tp columns."""
    return cdiv(width, row_width(cfg) // tp)


def module_rows(cfg: ModelConfig, module: str, tp: int = 1, lora_tp: str = "replicated") -> tuple[int, int]:
    """(pool rows per A^T row, pool rows per B row) of one target module in a pool split over tp devices
    with adapters laid out as `lora_tp` (parallel.LORA_TP); tp=1: the plain layout, whatever lora_tp."""
    return tuple(rows_per_vector(cfg, n, tp) for n in lora_widths(cfg, module, tp, lora_tp))


def all_module_rows(cfg: ModelConfig, tp: int = 1, lora_tp: str = "replicated") -> tuple:
    """`module_rows` of every module in config.LORA_MODULES order: the one source of the adapter row
    geometry (PoolLayout.module_rows, AdapterStore and pack all take it from here)."""
    return tuple(module_rows(cfg, m, tp, lora_tp) for m in LORA_MODULES)


def count_rows(rows_per_module: tuple, ranks: dict) -> int:
    """Flat pool rows of an adapter with these {module: rank}, given `all_module_rows`."""
    return sum(r * sum(rows_per_module[LORA_MODULES.index(m)]) for m, r in ranks.items())


def num_rows(cfg: ModelConfig, ranks: dict, tp: int = 1, lora_tp: str = "replicated") -> int:
    """Flat pool rows of an adapter with these {module: rank}."""
    return count_rows(all_module_rows(cfg, tp, lora_tp), ranks)


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """The pool's geometry, fixed at start-up (see the module docstring)."""

    num_layers: int
    num_pages: int
    page_rows: int
    row_width: int
    pages_per_seq: int  # pages of one max_model_len sequence: the width of a block table
    module_rows: tuple  # per config.LORA_MODULES: (pool rows per A^T row, per B row) (all_module_rows)

    @classmethod
    def create(cls, cfg: ModelConfig, ecfg: EngineConfig, num_pages: int) -> "PoolLayout":
        num_pages, page_rows = int(num_pages), int(ecfg.page_rows)
        if num_pages < 1 or page_rows < 1:
            raise ValueError(f"num_pages and page_rows must be >= 1, got {num_pages} and {page_rows}")
        if 2 * num_pages * page_rows > np.iinfo(np.int32).max:
            raise ValueError(f"pool of 2 * {num_pages} * {page_rows} rows does not fit int32 row indices")
        return cls(cfg.num_layers, num_pages, page_rows, row_width(cfg), cdiv(ecfg.max_model_len, page_rows),
                   all_module_rows(cfg, ecfg.tp, ecfg.lora_tp))

    @property
    def pool_rows(self) -> int:
        """S = 2 * num_pages * page_rows."""
        return 2 * self.num_pages * self.page_rows

    @property
    def shape(self) -> tuple:
        return (self.num_layers, self.pool_rows, self.row_width)

    @property
    def v_row_offset(self) -> int:
        """Add to a K row index to get the V row of the same token."""
        return self.num_pages * self.page_rows

    def kv_pages(self, n_tokens: int) -> int:
        return cdiv(n_tokens, self.page_rows)

    def adapter_rows(self, ranks: dict) -> int:
        """Flat pool rows of an adapter with these {module: rank}."""
        return count_rows(self.module_rows, ranks)

    def adapter_pages(self, n_rows: int) -> int:
        return cdiv(n_rows, 2 * self.page_rows)

    def kv_rows(self, pages: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """int32 pool K row of each token position of a sequence holding `pages`."""
        pr = self.page_rows
        return (pages[positions // pr].astype(np.int64) * pr + positions % pr).astype(np.int32)

    def adapter_pool_rows(self, pages: np.ndarray, n_rows: int) -> np.ndarray:
        """int32 [n_rows]: the pool row of each flat adapter row held in `pages` (K block, then V block)."""
        pr = self.page_rows
        i = np.arange(n_rows, dtype=np.int64)
        page = pages[i // (2 * pr)].astype(np.int64)
        w = i % (2 * pr)
        return np.where(w < pr, page * pr + w, (self.num_pages + page) * pr + (w - pr)).astype(np.int32)


def pack(cfg: ModelConfig, modules: dict, dtype, tp: int = 1, lora_tp: str = "replicated") -> np.ndarray:
    """LoraWeights.modules -> one compact [L, n_rows, W] buffer, ready for one transfer.

    With tp devices the pool's columns are split in tp slices of W/tp; a matrix row's K pool rows then
    give device d a local row of K*W/tp elements, which starts with what device d uses of the matrix row
    (parallel.lora_widths): the d-th 1/tp of it for a split half (A^T rows: the input features device d
    holds; B rows: the output columns it computes), all of it for a whole half. So every device's kernels
    read a local row exactly as the single-device kernels read a whole one; tp=1 is the plain layout
    (element j at pool row j // W, column j % W).
    """
    w = row_width(cfg)
    lw = w // tp
    ranks = {m: modules[m][0].shape[2] for m in LORA_MODULES if m in modules}
    rows_per_module = all_module_rows(cfg, tp, lora_tp)
    out = np.zeros((cfg.num_layers, count_rows(rows_per_module, ranks), w), dtype)
    at = 0
    for m, r in ranks.items():
        a, b = modules[m]  # [L, in, r], [L, r, out]
        ks = rows_per_module[LORA_MODULES.index(m)]
        for mat, n_loc, k in zip((np.swapaxes(a, 1, 2), b), lora_widths(cfg, m, tp, lora_tp), ks):  # [L, r, D]
            n = mat.shape[2]
            local = np.zeros((cfg.num_layers, r, tp, k * lw), np.float32)  # [..., device d, its local row]
            if n_loc == n:  # whole on every device
                local[..., :n] = mat[:, :, None, :]
            else:  # device d: its d-th 1/tp
                local[..., :n_loc] = mat.reshape(cfg.num_layers, r, tp, n_loc)
            # local element c*lw + e of device d sits at pool row c, column d*lw + e
            rows = local.reshape(cfg.num_layers, r, tp, k, lw).transpose(0, 1, 3, 2, 4)
            out[:, at: at + r * k] = rows.reshape(cfg.num_layers, r * k, w)
            at += r * k
    return out


def module_tables(module_rows: tuple, ranks: dict, rows: np.ndarray) -> dict:
    """An adapter's flat pool rows -> {module: (a_rows [r, K_in], b_rows [r, K_out])}, in `pack`'s order.

    module_rows: per config.LORA_MODULES, (pool rows per A^T row, per B row) (`PoolLayout.module_rows`, the
    same `all_module_rows` the adapter was packed with)."""
    out, at = {}, 0
    for m, (k_in, k_out) in zip(LORA_MODULES, module_rows):
        if m not in ranks:
            continue
        r = ranks[m]
        a = rows[at: at + r * k_in].reshape(r, k_in)
        at += r * k_in
        out[m] = (a, rows[at: at + r * k_out].reshape(r, k_out))
        at += r * k_out
    return out


def waste_report(cfg: ModelConfig, modules=LORA_MODULES, tp: int = 1, lora_tp: str = "replicated") -> dict:
    """Fraction of an adapter's pool rows that is padding, for a given target set. Under tp a half every
    device holds whole counts as used in each device's columns: those copies are the layout's price
    (docs/tensor_parallel.md), not padding."""
    used = sum(sum(lora_widths(cfg, m, tp, lora_tp)) for m in modules) * tp
    stored = sum(sum(module_rows(cfg, m, tp, lora_tp)) for m in modules) * row_width(cfg)
    return {"row_width": row_width(cfg), "adapter_waste": 1 - used / stored, "kv_waste": 0.0}
