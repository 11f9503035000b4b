"""The step shapes jit compiles: a ladder of bucket sizes, the powers of two and, from 192 up, the size
halfway between two of them (192, 384, 768, ...).

A step is padded to the smallest bucket that holds it, and from a few hundred rows on its GEMMs are
compute-bound, so padding costs its share of the step: with powers of two alone a saturated S1 step of 385
running sequences ran as 512 rows (H200), and a mixed step of 600 tokens as 1,024. The half sizes bring
the worst case from 2x to 1.5x for a few more programs (warm-up compiles each size with and without LoRA);
below 192 a step is bound by its weight reads, and padding costs little.
"""
from __future__ import annotations

HALF_FROM = 128  # powers of two p >= this have a bucket at 1.5 p after them
ROUND_DOWN_SLACK = 1 / 8  # the default max_running gives up at most this share to fill its bucket


def _pow2(n: int, lo: int) -> int:
    return 1 << max(lo - 1, n - 1, 0).bit_length() if n > lo else lo


def _half(p: int) -> int:
    """The bucket between p / 2 and p, or 0 if there is none."""
    return 3 * p // 4 if p // 2 >= HALF_FROM else 0


def bucket(n: int, lo: int) -> int:
    """The smallest bucket >= n, and >= lo (a power of two)."""
    p = _pow2(n, lo)
    return _half(p) if _half(p) >= max(n, lo) else p


def ladder(lo: int, hi: int) -> list:
    """Every bucket from lo (a power of two) to bucket(hi, lo), ascending."""
    top, out, p = bucket(hi, lo), [], lo
    while p <= 2 * top:  # the half bucket of a power of two past top may still be <= top
        out += [s for s in (_half(p), p) if lo <= s <= top]
        p *= 2
    return out


def fill_down(n: int, lo: int) -> int:
    """n, or the bucket just below it when that gives up at most ROUND_DOWN_SLACK of n: a batch one past a
    bucket would pay for the next one."""
    below = max((s for s in ladder(lo, n) if s <= n), default=n)
    return below if below >= n * (1 - ROUND_DOWN_SLACK) else n
