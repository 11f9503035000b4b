#!/usr/bin/env bash
# One call on the GPU machine: run benchmark stages in order inside a time budget; results land in $OUT.
#
#   bash benchmarks/device_run.sh STAGE...     (from the repo root, on the device machine)
#
# Stages: check (Pallas engine == XLA engine), decode (+ HF PEFT), swap, http, s1, s2, s4, tp and
# profile-tp (2 GPUs), profile, lora and attention (kernel benchmarks; lora-table: lora without its
# sweep), rate-s1 and rate-s2 (the setting at n = 2,000 and its max-rate search only). A stage starts only
# if its usual duration fits in what is left of BUDGET_S (default 560 s,
# under the 600 s limit of one call). Logs go to $OUT/<stage>.log; JSON results to $OUT/r/ (at most 8
# files come back from $OUT, so the stages of one call should stay few). The server stages need the
# wheels of `bash benchmarks/fetch_wheels.sh` carried as `.whl` (the device machine has no fastapi).
set -u
OUT=${OUT:?set by the device machine}
BUDGET_S=${BUDGET_S:-560}
START=$(date +%s)
mkdir -p "$OUT/r"
export PYTHONUNBUFFERED=1 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=${XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB:-100}
export GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site
fi

# stage -> "usual seconds|command" (the bench settings cut themselves at time_budget_s)
BENCH="python3 -m slora_jax.cli bench --out $OUT/r --set time_budget_s=${BENCH_BUDGET_S:-480} --config configs"
# the max-rate search alone at n = 2,000 (no base-only or PEFT runs), two of these fit one call
RATE="python3 -m slora_jax.cli bench --out $OUT/r --set time_budget_s=250 --set n_adapters=[2000] --set peft.enabled=false --set base_only=false --config configs"
declare -A STAGES=(
    [check]="150|python3 benchmarks/gpu_engine_check.py"
    [decode]="220|python3 benchmarks/bench_decode.py --out $OUT/r"
    [swap]="70|python3 benchmarks/bench_swap.py --out $OUT/r --n-host 0"
    [http]="190|python3 benchmarks/bench_http.py --model configs/llama-7b.json --adapters 1000 --rank 16 --clients 64 --duration 20 --warmup 3 --out $OUT/r/bench_http.json"
    [s1]="520|$BENCH/bench-S1.json"
    [s2]="520|$BENCH/bench-S2.json"
    [s4]="520|$BENCH/bench-S4.json"
    [rate-s1]="260|$RATE/bench-S1.json"
    [rate-s2]="260|$RATE/bench-S2.json"
    [tp]="200|python3 benchmarks/gpu_tp_check.py --out $OUT/r"
    [profile]="90|python3 benchmarks/profile_step.py --out $OUT/r"
    [profile-tp]="120|python3 benchmarks/profile_step.py --out $OUT/r --tp 2"
    [lora]="420|python3 benchmarks/bench_lora.py --out $OUT/r"
    [lora-table]="150|python3 benchmarks/bench_lora.py --out $OUT/r --no-sweep"
    [attention]="150|python3 benchmarks/bench_attention.py --out $OUT/r"
)

status=0
for stage in "$@"; do
    spec=${STAGES[$stage]:-}
    if [ -z "$spec" ]; then
        echo "unknown stage '$stage' (known: ${!STAGES[*]})"; status=2; continue
    fi
    need=${spec%%|*}
    left=$(( BUDGET_S - ($(date +%s) - START) ))
    if [ "$need" -gt "$left" ]; then
        echo "SKIP $stage: needs ~${need}s, ${left}s left"; continue
    fi
    echo "== $stage (${left}s left)"
    timeout "$left" bash -c "${spec#*|}" > "$OUT/$stage.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    echo "== $stage rc=$rc in $(( $(date +%s) - START ))s"
    grep -v -E "it/s\]|rematerialization" "$OUT/$stage.log" | tail -8
done
exit $status
