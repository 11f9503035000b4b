"""S-LoRA's benchmark: workload generator (workload.py), metrics (metrics.py), the real-time replay with
its base-only and HF PEFT baselines (run.py, peft_baseline.py), and the report (report.py).

Entry points: `slora-jax bench --config configs/bench-S1.json` (run.run_from_config) and
`python -m slora_jax.bench.report` (report.write_report).
"""
from .workload import Trace, generate_trace

__all__ = ["Trace", "generate_trace"]
