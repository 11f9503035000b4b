"""One of N processes of test_tensor_parallel's multi-host check: jax.distributed over CPU processes
(gloo collectives), one device each, one LLM whose tp spans all of them. Every process serves the same
requests (the engine's host state must stay identical) and prints the results as one JSON line.

python -m tests.tp_worker MODEL_JSON NUM_PROCESSES PROCESS_ID PORT
"""
from __future__ import annotations

import json
import sys

import numpy as np

TOKENS = [1, 17, 5, 99, 42, 3, 64, 7]


def run(model_file: str, tp: int) -> dict:
    """Logits with an adapter and a greedy mixed batch, on a tp-way LLM."""
    from slora_jax import LLM, SamplingParams

    llm = LLM(model_file, tp=tp, dtype="float32", kernels="xla", max_rank=8, num_pages=64, page_rows=4,
              max_model_len=64, max_running=8, max_batch_tokens=64)
    c, rng = llm.model_cfg, np.random.default_rng(0)
    llm.add_adapter("a", {f"{layer}.{m}": (rng.normal(0, 0.1, (c.module_shape(m)[0], 4)),
                                           rng.normal(0, 0.1, (4, c.module_shape(m)[1])))
                          for layer in range(c.num_layers) for m in ("q_proj", "v_proj", "o_proj", "down_proj")})
    prompts, adapters = [TOKENS[:3], TOKENS[2:7]], ["a", None]
    greedy, sampled = (llm.generate(prompts, adapter=adapters,
                                    sampling=SamplingParams(max_tokens=5, ignore_eos=True, temperature=t))
                       for t in (0.0, 0.8))
    return {"logits": llm.logits(TOKENS, adapter="a").tolist(), "greedy": [o.token_ids for o in greedy],
            "sampled": [o.token_ids for o in sampled]}


def main(argv) -> None:
    model_file, nproc, pid, port = argv[0], int(argv[1]), int(argv[2]), argv[3]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    print(json.dumps(run(model_file, jax.device_count())), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
