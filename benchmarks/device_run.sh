#!/usr/bin/env bash
# One call on the GPU machine: run benchmark stages in order inside a time budget; results come back in $OUT.
#
#   GIT_COMMIT=<hash> bash benchmarks/device_run.sh STAGE...     (from the repo root, on the device machine)
#   bash benchmarks/device_run.sh --list                          (the stages and their usual seconds)
#
# The three calls of issue #16 (usual seconds on an H100 80 GB; an H200 is faster; each under BUDGET_S):
#   call 1: lora-table attention-table decode-7b            (~480 s)
#   call 2: decode-8b cmdbuf s1-8b-sat profile-8b           (~520 s; cmdbuf and profile-8b are diagnoses)
#   call 3: s1-sat s2-sat rate-s1                           (~590 s)
# Issue #18's prefix cache on / off: chat                   (~280 s)
# Where a saturated step's time goes (LoRA against base, and the host's Python), and the first-token path:
#   profile-s1-sat profile-s1-sat-base profile-s1-sat-host profile-chat-host   (~470 s)
# A stage starts only if its usual duration fits in what is left of BUDGET_S (default 565 s, under the
# 600 s limit of one call) and is stopped when the budget runs out. Everything a stage writes (its log,
# its JSON results) goes to $WORK (logs) and $WORK/r (results), packed after every stage into
# $OUT/results.tar.gz (one file: at most 8 come back from $OUT); $OUT/summary.txt holds each stage's
# status and last lines. Unpack into benchmarks/results with `python benchmarks/collect.py <tarball>...`.
# The stages share a JAX compilation cache (JAX_COMPILATION_CACHE_DIR), so a stage that compiles the
# programs an earlier stage of the same call compiled takes them from it. Sizes derive from the device's
# memory (XLA_PYTHON_CLIENT_MEM_FRACTION: the share JAX may take). The http and structured stages need the
# wheels of `bash benchmarks/fetch_wheels.sh` carried as `.whl` (the device machine has no fastapi, no llguidance).
set -u
BUDGET_S=${BUDGET_S:-565}
START=$(date +%s)
export PYTHONUNBUFFERED=1 XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=${XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB:-100}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/slora-jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
export GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
# extra `--set KEY=VALUE` options for every `slora-jax bench` and profile_serve stage (e.g.
# EXTRA_SET="--set engine.command_buffers=on")
EXTRA_SET=${EXTRA_SET:-}
WORK=${WORK:-/tmp/slora-device-run}
R=$WORK/r
mkdir -p "$R"

# stage -> "usual seconds|command" (the bench settings also cut themselves at time_budget_s)
BENCH="python3 -m slora_jax.cli bench --out $R $EXTRA_SET --set time_budget_s=${BENCH_BUDGET_S:-480} --config configs"
# saturated: n = 5 and 2,000 on the same 1,000 requests offered at once, base-only beside them (every step
# program compiled first; base-only runs first, then n = 5, then n = 2,000)
SAT="python3 -m slora_jax.cli bench --out $R $EXTRA_SET --set saturate=true --set n_adapters=[5,2000] --set time_budget_s=230 --config configs"
# the max-rate search alone at n = 2,000 (no base-only or PEFT runs; a 10 s main run at the offered 10 req/s):
# the capacity first (500 requests offered at once), then rates in rising order up to the first failing one
# or the capacity, at most 64 req/s
RATE="python3 -m slora_jax.cli bench --out $R $EXTRA_SET --set time_budget_s=200 --set rate_search.capacity_requests=500 --set n_adapters=[2000] --set duration_s=10 --set peft.enabled=false --set base_only=false --set rate_search.max_probes=12 --config configs"
declare -A STAGES=(
    [check]="150|python3 benchmarks/gpu_engine_check.py"
    [lora]="450|python3 benchmarks/bench_lora.py --out $R"
    [lora-table]="200|python3 benchmarks/bench_lora.py --out $R --no-sweep"
    [attention]="220|python3 benchmarks/bench_attention.py --out $R"
    [attention-table]="120|python3 benchmarks/bench_attention.py --out $R --no-sweep"
    [decode]="330|python3 benchmarks/bench_decode.py --out $R"
    [decode-7b]="160|python3 benchmarks/bench_decode.py --out $R --models llama-7b --skip-peft"
    [decode-7b-peft]="260|python3 benchmarks/bench_decode.py --out $R --models llama-7b"
    [decode-8b]="140|python3 benchmarks/bench_decode.py --out $R --models llama3-8b --skip-peft"
    [cmdbuf]="110|python3 benchmarks/bench_cmdbuf.py --out $R"
    [profile]="90|python3 benchmarks/profile_step.py --out $R"
    [profile-8b]="90|python3 benchmarks/profile_step.py --out $R --model llama3-8b --batches 32,256"
    [profile-8b-cb]="80|python3 benchmarks/profile_step.py --out $R --model llama3-8b --command-buffers on"
    [swap]="90|python3 benchmarks/bench_swap.py --out $R --n-host 0"
    [structured]="120|python3 benchmarks/bench_structured.py --out $R --profile"
    [http]="190|python3 benchmarks/bench_http.py --model configs/llama-7b.json --adapters 1000 --rank 16 --clients 64 --duration 20 --warmup 3 --out $R/bench_http.json"
    [s1]="520|$BENCH/bench-S1.json"
    [s2]="520|$BENCH/bench-S2.json"
    [s4]="520|$BENCH/bench-S4.json"
    [s1-sat]="200|$SAT/bench-S1.json"
    [s2-sat]="170|$SAT/bench-S2.json --set base_only=false"
    [s1-8b-sat]="180|$SAT/bench-S1-8B.json"
    [s1-prefix]="240|$BENCH/bench-S1.json --set compare_prefix_cache=true --set n_adapters=[2000] --set duration_s=10 --set time_budget_s=210 --set base_only=false --set peft.enabled=false --set rate_search.enabled=false"
    [rate-s1]="220|$RATE/bench-S1.json"
    [rate-s2]="220|$RATE/bench-S2.json"
    [rate-s1-8b]="220|$RATE/bench-S1-8B.json"
    # prefix cache on / off (issue #18): 1,000 adapters with a 1,024-token system prompt each, the same requests
    # at 8 req/s for 20 s (first-token latency) and 400 at once (throughput), each way; writes chat-prefix.json
    [chat]="280|python3 -m slora_jax.cli bench --out $R $EXTRA_SET --set time_budget_s=250 --config configs/bench-chat.json"
    # a few seconds of a setting's traffic traced: host work and device waits, device busy / idle and kernels per
    # step (the chat setting at its offered rate, prefix cache on; S1 and S1-8B saturated)
    [profile-chat]="130|python3 benchmarks/profile_serve.py --out $R $EXTRA_SET --config configs/bench-chat.json --lead-s 4"
    [profile-s1-sat]="120|python3 benchmarks/profile_serve.py --out $R $EXTRA_SET --config configs/bench-S1.json --saturate --set n_adapters=[2000]"
    # the same S1 traffic through the base model alone: beside profile-s1-sat, where LoRA's cost goes
    [profile-s1-sat-base]="110|python3 benchmarks/profile_serve.py --out $R $EXTRA_SET --config configs/bench-S1.json --saturate --set n_adapters=[2000] --base-only"
    # the chat setting at its offered rate with the engine thread's Python profiled (first-token latency is host-bound)
    [profile-chat-host]="130|python3 benchmarks/profile_serve.py --out $R $EXTRA_SET --config configs/bench-chat.json --lead-s 4 --host-profile"
    # S1 saturated with the engine thread's Python profiled: which host functions take its time (slowed by cProfile)
    [profile-s1-sat-host]="110|python3 benchmarks/profile_serve.py --out $R $EXTRA_SET --config configs/bench-S1.json --saturate --set n_adapters=[2000] --host-profile"
    [profile-s1-8b-sat]="120|python3 benchmarks/profile_serve.py --out $R $EXTRA_SET --config configs/bench-S1-8B.json --saturate --set n_adapters=[2000]"
    [tp]="200|python3 benchmarks/gpu_tp_check.py --out $R"
    [profile-tp]="120|python3 benchmarks/profile_step.py --out $R --tp 2"
)

# SMOKE=1: each stage's command on a CPU, with its script's own smoke option (tiny shapes, interpret mode)
# and the S-LoRA settings on the tiny model: checks the stages themselves, not a figure (tests/test_gpu_scripts.py)
TINY_BENCH="--set model=configs/tiny.json --set kernels=xla --set dtype=float32 --set engine.num_pages=256 \
    --set engine.max_running=4 --set engine.max_batch_tokens=32 --set engine.max_model_len=32 --set input_range=[2,8] \
    --set output_range=[2,6] --set rate=4 --set duration_s=2 --set saturate_requests=8 --set rate_search.probe_s=1.5 \
    --set rate_search.rates=[1,4,16] --set rate_search.capacity_requests=8 --set warmup.duration_s=0 --set peft.enabled=false \
    --set adapter_host_memory=shared --set time_budget_s=120 --set progress=false"
smoke_args() {
    case "$1" in
        *bench_lora.py*|*bench_attention.py*|*bench_structured.py*) echo "--smoke" ;;
        *bench_decode.py*|*bench_cmdbuf.py*|*profile_step.py*|*bench_swap.py*) echo "--quick" ;;
        *profile_serve.py*) echo "$TINY_BENCH --set system_prompt_len=16 --set rate=20 --set saturate_requests=2000 --lead-s 0.3 --seconds 0.3" ;;
        # the chat setting's system prompts shrink with max_model_len: one 16-token page of each is shared
        *bench-chat.json*) echo "$TINY_BENCH --set system_prompt_len=16 --set prefix_warm_s=1 --set prefix_more_rates=[8]" ;;
        *"slora_jax.cli bench"*) echo "$TINY_BENCH" ;;
    esac
}

if [ "${1:-}" = "--list" ]; then
    for s in "${!STAGES[@]}"; do echo "$s ${STAGES[$s]%%|*}s: ${STAGES[$s]#*|}"; done | sort
    exit 0
fi
OUT=${OUT:?set by the device machine}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site
fi
echo "commit $GIT_COMMIT, stages: $*" > "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader >> "$OUT/summary.txt" 2>&1

status=0
for stage in "$@"; do
    spec=${STAGES[$stage]:-}
    if [ -z "$spec" ]; then
        echo "unknown stage '$stage' (known: ${!STAGES[*]})" | tee -a "$OUT/summary.txt"; status=2; continue
    fi
    need=${spec%%|*}
    left=$(( BUDGET_S - ($(date +%s) - START) ))
    if [ "$need" -gt "$left" ]; then
        echo "SKIP $stage: needs ~${need}s, ${left}s left" | tee -a "$OUT/summary.txt"; continue
    fi
    echo "== $stage (${left}s left)" | tee -a "$OUT/summary.txt"
    t0=$(date +%s)
    cmd=${spec#*|}
    [ "${SMOKE:-0}" = 1 ] && cmd="$cmd $(smoke_args "$cmd")"
    timeout "$left" bash -c "$cmd" > "$WORK/$stage.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    echo "== $stage rc=$rc in $(( $(date +%s) - t0 ))s (usual ${need}s), $(( $(date +%s) - START ))s in all" \
        | tee -a "$OUT/summary.txt"
    grep -v -E "it/s\]|rematerialization" "$WORK/$stage.log" | tail -12 | tee -a "$OUT/summary.txt"
    tar -czf "$OUT/results.tar.gz" -C "$WORK" .  # after every stage: a call cut short keeps what was done
done
exit $status
