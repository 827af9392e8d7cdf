#!/usr/bin/env bash
# The project's check on one GPU machine without network (issue 23), at most ~8 minutes:
#   1. the GPU tests: pytest -m gpu over tests/ (test files that need crfm-helm or the real model are left out);
#   2. the scaled headline benchmark: OPT-6.7B's shape, random float16 weights built in /dev/shm, every system's
#      process capped at 6 GiB of the GPU, 144 prompts (48 x 3) of 512 tokens, 32 generated: the engine with
#      the paper's policy and with the planner's (profiled now, quick mode), FlexGen 0.1.8 under the paper's
#      policy and with attention on the GPU, Accelerate at the largest batch that fits; each system in a process
#      of its own under a time limit (benchmarks/bench_gpu30b.py, also `flexgen bench gpu-30b --shape opt-6.7b`);
#   3. the mixture-of-experts benchmark, in a smaller share of the time (GPU_CHECK_MOE_SHARE, default 150 s, kept
#      from step 2): OLMoE-1B-7B's shape (64 experts, top 8; 12.9 GiB of random float16 weights), each process
#      capped at 3 GiB, 32 prompts of 512 tokens, 8 generated: the engine with the planner's policy against
#      Accelerate at the same cap (`flexgen bench gpu-moe`); skipped, not failed, when less than a minute is left;
#   4. the benchmarks' tables and one line for the tests.
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]
#
# Run it from anywhere in a python3 that has torch (CUDA) and transformers; it does not pip-install the project
# (that would fetch crfm-helm). What else it needs comes as wheels in .whl/ at the repository root (README,
# "GPU check"): FlexGen 0.1.8 and cvxpy with its solvers; they go to a temporary --target folder on PYTHONPATH.
# Without CUDA it prints one line and exits 3 (the benchmarks' skip code).
#
# Written to RESULTS_DIR (the argument, else $GPU_CHECK_OUT, else benchmarks/results): gpu-check-pytest.log,
# gpu-check-bench.log, gpu-check-moe.log, the suites' gpu-30b-<shape>.md and gpu-moe.md / .json (.png where
# matplotlib imports) and gpu-check-logs/ (one log per benchmarked system). The hardware profile is measured once
# (quick mode) and used by both benchmarks.
#
# Settings (environment):
#   GPU_CHECK_SHAPE=opt-30b   OPT-30B's shape at 16 GiB instead (the paper's headline): ~56 GiB of checkpoint in
#                             /dev/shm or the temp folder and ~100 GiB of RAM; each system then needs many
#                             minutes: give GPU_CHECK_TIME_LIMIT=3600 GPU_CHECK_SYSTEM_TIMEOUT=900 or so.
#   GPU_CHECK_BUDGET          the GPU cap of each system's process (default 6GiB; 16GiB for opt-30b)
#   GPU_CHECK_NUM_PROMPTS     prompts (default 144, the paper's 48 x 3 block; FlexGen needs a multiple of it)
#   GPU_CHECK_TIME_LIMIT      seconds for the whole script (default 480)
#   GPU_CHECK_TEST_TIMEOUT    seconds for the tests (default 240)
#   GPU_CHECK_SYSTEM_TIMEOUT  seconds for each benchmarked system at most (default 90; less when the time left
#                             is short: the benchmark shares it among the systems still to run)
#   GPU_CHECK_CHECKPOINT_DIR  keep the random checkpoint here (reused next time) instead of a temporary folder
#   GPU_CHECK_PROFILE         a hardware profile file for the planner instead of profiling now (quick mode)
#   GPU_CHECK_MOE=0           no mixture-of-experts benchmark (step 2 then has all the time)
#   GPU_CHECK_MOE_SHAPE       olmoe-1b-7b (default), or olmoe-tiny to test the script on a CPU
#   GPU_CHECK_MOE_BUDGET      its GPU cap (default 3GiB: the engine's 768 MiB of one layer's experts, staged twice,
#                             fit beside its buffers; Accelerate's KV cache and the experts it streams in fit too)
#   GPU_CHECK_MOE_NUM_PROMPTS, GPU_CHECK_MOE_PROMPT_LEN, GPU_CHECK_MOE_GEN_LEN   its workload (default 32, 512, 8)
#   GPU_CHECK_MOE_SHARE       seconds kept for it from step 2 (default 150; it also gets what step 2 leaves)
#   GPU_CHECK_MOE_CHECKPOINT_DIR   keep its random checkpoint here (reused next time)
#   PYTHON                    the interpreter (default python3)
#   GPU_CHECK_DEVICE=cpu      testing the script itself on a host without CUDA (with GPU_CHECK_SHAPE=opt-tiny and
#                             GPU_CHECK_MOE_SHAPE=olmoe-tiny): no CUDA check, the benchmarks on the CPU, no GPU cap
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
SKIPPED_EXIT=3
started=$(date +%s)

DEVICE=${GPU_CHECK_DEVICE:-cuda}
cuda=0
[ "$DEVICE" = cpu ] || "$PY" -c '
import sys
try:
    import torch
except Exception as e:
    print(f"gpu_check: error: torch does not import in {sys.executable}: {e}")
    sys.exit(1)
sys.exit(0 if torch.cuda.is_available() else 3)' || cuda=$?
if [ "$cuda" = "$SKIPPED_EXIT" ]; then
    echo "gpu_check skipped: no CUDA device here (torch.cuda.is_available() is False in $PY); nothing was run"
    exit "$SKIPPED_EXIT"
elif [ "$cuda" != 0 ]; then
    exit 1
fi

SHAPE=${GPU_CHECK_SHAPE:-opt-6.7b}
case "$SHAPE" in
    opt-30b) default_budget=16GiB; checkpoint_gib=60 ;;
    opt-6.7b) default_budget=6GiB; checkpoint_gib=14 ;;
    *) default_budget=6GiB; checkpoint_gib=30 ;;
esac
BUDGET=${GPU_CHECK_BUDGET:-$default_budget}
NUM_PROMPTS=${GPU_CHECK_NUM_PROMPTS:-144}
TIME_LIMIT=${GPU_CHECK_TIME_LIMIT:-480}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-240}
SYSTEM_TIMEOUT=${GPU_CHECK_SYSTEM_TIMEOUT:-90}
MOE=${GPU_CHECK_MOE:-1}
MOE_SHAPE=${GPU_CHECK_MOE_SHAPE:-olmoe-1b-7b}
MOE_BUDGET=${GPU_CHECK_MOE_BUDGET:-3GiB}
MOE_NUM_PROMPTS=${GPU_CHECK_MOE_NUM_PROMPTS:-32}
MOE_PROMPT_LEN=${GPU_CHECK_MOE_PROMPT_LEN:-512}
MOE_GEN_LEN=${GPU_CHECK_MOE_GEN_LEN:-8}
MOE_SHARE=${GPU_CHECK_MOE_SHARE:-150}
MOE_CHECKPOINT_GIB=14
MIN_BENCH_S=60  # a benchmark with less time left than this is not started
[ "$MOE" = 0 ] && MOE_SHARE=0
OUT_DIR=${1:-${GPU_CHECK_OUT:-benchmarks/results}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)

scratch=$(mktemp -d "${TMPDIR:-/tmp}/flexgen-gpu-check.XXXXXX")
checkpoint_root=
moe_checkpoint_root=
cleanup() {
    rm -rf "$scratch"
    [ -n "$checkpoint_root" ] && rm -rf "$checkpoint_root"
    [ -n "$moe_checkpoint_root" ] && rm -rf "$moe_checkpoint_root"
}
trap cleanup EXIT

# A temporary folder for a random checkpoint of $1 GiB: /dev/shm where it has the room (memory speed), else the
# temp folder.
checkpoint_folder() {
    local root=${TMPDIR:-/tmp} free_kib
    free_kib=$(df -Pk /dev/shm 2> /dev/null | awk 'NR == 2 {print $4}')
    if [ "${free_kib:-0}" -gt $(($1 * 1024 * 1024)) ]; then
        root=/dev/shm
    fi
    mktemp -d "$root/flexgen-gpu-check-checkpoint.XXXXXX"
}

# Wheels for what the machine lacks (FlexGen 0.1.8, cvxpy and its solvers), without network and without deps.
site="$scratch/site"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            .whl/*.whl; then
        export PYTHONPATH="$PYTHONPATH:$site"
    else
        echo "gpu_check: warning: installing the wheels of .whl/ failed; FlexGen 0.1.8 and the planner may be missing"
    fi
else
    echo "gpu_check: note: no .whl/ folder: FlexGen 0.1.8 and cvxpy only if $PY has them (README, GPU check)"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# 1. The GPU tests. Test files that import crfm-helm (or the tests' HELM helpers) at module level, and the
# real-model tier (fetched from PyPI), have no GPU tests and cannot be collected here.
ignores=()
for file in tests/test_*.py; do
    case "$file" in
        tests/test_helm_*.py | tests/test_real_model.py) ignores+=(--ignore "$file") ;;
        *) if grep -qE '^(import|from) +(helm|helm_support|flexgen_helm)\b' "$file"; then
               ignores+=(--ignore "$file")
           fi ;;
    esac
done
pytest_log="$OUT_DIR/gpu-check-pytest.log"
echo "gpu_check: GPU tests (at most ${TEST_TIMEOUT} s) -> $pytest_log"
timeout --kill-after=10 "$TEST_TIMEOUT" "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
    "${ignores[@]}" tests > "$pytest_log" 2>&1
pytest_rc=$?
pytest_summary=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$pytest_log" | tail -n 1)
[ "$pytest_rc" = 124 ] && pytest_summary="timed out after ${TEST_TIMEOUT} s; last: ${pytest_summary:-nothing}"

# The hardware profile both benchmarks plan and draw rooflines with: given, else measured once now (quick mode),
# else each benchmark measures its own.
profile=(--quick-profile)
if [ -n "${GPU_CHECK_PROFILE:-}" ]; then
    profile=(--profile "$GPU_CHECK_PROFILE")
elif timeout --kill-after=10 120 "$PY" -m flexgen_core.cli profile --quick --device "$DEVICE" \
        --out "$scratch/profile.json" > "$scratch/profile.log" 2>&1; then
    profile=(--profile "$scratch/profile.json")
else
    echo "gpu_check: note: profiling failed (each benchmark measures its own); the end of its log:"
    tail -n 5 "$scratch/profile.log"
fi

# 2. The benchmark, in the time left but the MoE benchmark's share (its own --time-limit covers the checkpoint and
# the systems).
if [ -n "${GPU_CHECK_CHECKPOINT_DIR:-}" ]; then
    checkpoint="$GPU_CHECK_CHECKPOINT_DIR"
else
    checkpoint_root=$(checkpoint_folder "$checkpoint_gib")
    checkpoint="$checkpoint_root/$SHAPE-random-float16"
fi
left=$((TIME_LIMIT - ($(date +%s) - started) - 15 - MOE_SHARE))
bench_log="$OUT_DIR/gpu-check-bench.log"
echo "gpu_check: benchmark, $SHAPE at $BUDGET (at most ${left} s) -> $bench_log"
bench_rc=1
if [ "$left" -gt "$MIN_BENCH_S" ]; then
    timeout --kill-after=10 $((left + 30)) "$PY" benchmarks/bench_gpu30b.py --device "$DEVICE" \
        --shape "$SHAPE" --budget "$BUDGET" --num-prompts "$NUM_PROMPTS" --prompt-len 512 --gen-len 32 "${profile[@]}" \
        --systems engine-paper engine flexgen-paper flexgen-gpu-attention accelerate \
        --system-timeout "$SYSTEM_TIMEOUT" --time-limit "$left" --checkpoint-dir "$checkpoint" \
        --logs "$OUT_DIR/gpu-check-logs" --out "$OUT_DIR" > "$bench_log" 2>&1
    bench_rc=$?
else
    echo "gpu_check: no time left for the benchmark (${left} s)" | tee "$bench_log"
fi

# 3. The mixture-of-experts benchmark, in what is left: skipped (not failed) when that is under a minute.
[ -n "$checkpoint_root" ] && rm -rf "$checkpoint_root"  # step 2's checkpoint: its RAM (in /dev/shm) is free again
checkpoint_root=
moe_log="$OUT_DIR/gpu-check-moe.log"
moe_rc=skipped
left=$((TIME_LIMIT - ($(date +%s) - started) - 15))
if [ "$MOE" = 0 ]; then
    echo "gpu_check: no MoE benchmark (GPU_CHECK_MOE=0)" | tee "$moe_log"
elif [ "$left" -le "$MIN_BENCH_S" ]; then
    echo "gpu_check: MoE benchmark skipped: ${left} s left of the ${TIME_LIMIT} s, under ${MIN_BENCH_S} s" | tee "$moe_log"
else
    if [ -n "${GPU_CHECK_MOE_CHECKPOINT_DIR:-}" ]; then
        moe_checkpoint="$GPU_CHECK_MOE_CHECKPOINT_DIR"
    else
        moe_checkpoint_root=$(checkpoint_folder "$MOE_CHECKPOINT_GIB")
        moe_checkpoint="$moe_checkpoint_root/$MOE_SHAPE-random-float16"
    fi
    echo "gpu_check: MoE benchmark, $MOE_SHAPE at $MOE_BUDGET (at most ${left} s) -> $moe_log"
    timeout --kill-after=10 $((left + 30)) "$PY" benchmarks/bench_gpu30b.py --suite gpu-moe --device "$DEVICE" \
        --shape "$MOE_SHAPE" --budget "$MOE_BUDGET" --num-prompts "$MOE_NUM_PROMPTS" --prompt-len "$MOE_PROMPT_LEN" \
        --gen-len "$MOE_GEN_LEN" "${profile[@]}" --systems engine accelerate --system-timeout "$SYSTEM_TIMEOUT" \
        --time-limit "$left" --checkpoint-dir "$moe_checkpoint" --logs "$OUT_DIR/gpu-check-logs" --out "$OUT_DIR" \
        > "$moe_log" 2>&1
    moe_rc=$?
fi

# 4. The tables, one line for the tests.
name=gpu-30b-$SHAPE
[ "$SHAPE" = opt-30b ] && name=gpu-30b
if [ "$bench_rc" = 0 ] && [ -f "$OUT_DIR/$name.md" ]; then
    cat "$OUT_DIR/$name.md"
else
    echo "gpu_check: the benchmark did not finish (exit code $bench_rc); the end of its log:"
    tail -n 20 "$bench_log"
fi
moe_name=gpu-moe-$MOE_SHAPE
[ "$MOE_SHAPE" = olmoe-1b-7b ] && moe_name=gpu-moe
echo
if [ "$moe_rc" = 0 ] && [ -f "$OUT_DIR/$moe_name.md" ]; then
    cat "$OUT_DIR/$moe_name.md"
elif [ "$moe_rc" != skipped ]; then
    echo "gpu_check: the MoE benchmark did not finish (exit code $moe_rc); the end of its log:"
    tail -n 20 "$moe_log"
fi
echo
echo "gpu_check: tests: ${pytest_summary:-no summary} (exit code $pytest_rc; log $pytest_log)"
moe_status="exit code $moe_rc"
[ "$moe_rc" = skipped ] && moe_status="skipped (see $moe_log)"
echo "gpu_check: benchmark exit code $bench_rc, MoE benchmark $moe_status; results in $OUT_DIR;" \
    "took $(( $(date +%s) - started )) s"
[ "$pytest_rc" = 0 ] && [ "$bench_rc" = 0 ] && { [ "$moe_rc" = 0 ] || [ "$moe_rc" = skipped ]; }
