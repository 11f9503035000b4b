"""One prefill step that holds several requests (different adapters and base-model rows) at once."""
from __future__ import annotations

import numpy as np

from slora_jax import SamplingParams
from slora_jax.engine.request import Request
from slora_jax.engine.scheduler import ScheduledStep


def mixed_prefill_logits(llm, rows) -> tuple[np.ndarray, list]:
    """Last-token logits of one prefill step holding every (tokens, adapter) row, in row order, and the
    adapters in the order the batch builder put the rows (segments by adapter)."""
    eng = llm.engine
    reqs = []
    for i, (toks, a) in enumerate(rows):
        r = Request(f"m{i}", 1000 + i, toks, a, SamplingParams(), 0)
        assert eng.scheduler.admit_now(r)
        reqs.append(r)
    try:
        inp, _, ordered = eng.builder.build(ScheduledStep(reqs, [len(t) for t, _ in rows], [], []))
        assert inp.lora is not None
        logits, eng.pool.array = eng.runner.logits(eng.pool.array, inp)
        logits = np.asarray(logits)
        return np.stack([logits[ordered.index(r)] for r in reqs]), [r.adapter for r in ordered]
    finally:
        for r in reqs:
            eng.scheduler.release(r)
