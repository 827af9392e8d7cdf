#!/usr/bin/env bash
# The project's check on one GPU machine without network (issue 23), at most ~8 minutes:
#   1. the GPU tests: pytest -m gpu over tests/ (test files that need crfm-helm or the real model are left out);
#   2. the scaled headline benchmark: OPT-6.7B's shape, random float16 weights built in /dev/shm, every system's
#      process capped at 6 GiB of the GPU, 144 prompts (48 x 3) of 512 tokens, 32 generated: the engine with
#      the paper's policy and with the planner's (profiled now, quick mode), FlexGen 0.1.8 under the paper's
#      policy and with attention on the GPU, Accelerate at the largest batch that fits; each system in a process
#      of its own under a time limit (benchmarks/bench_gpu30b.py, also `flexgen bench gpu-30b --shape opt-6.7b`);
#   3. the benchmark's table and one line for the tests.
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]
#
# Run it from anywhere in a python3 that has torch (CUDA) and transformers; it does not pip-install the project
# (that would fetch crfm-helm). What else it needs comes as wheels in .whl/ at the repository root (README,
# "GPU check"): FlexGen 0.1.8 and cvxpy with its solvers; they go to a temporary --target folder on PYTHONPATH.
# Without CUDA it prints one line and exits 3 (the benchmarks' skip code).
#
# Written to RESULTS_DIR (the argument, else $GPU_CHECK_OUT, else benchmarks/results): gpu-check-pytest.log,
# gpu-check-bench.log, the suite's gpu-30b-<shape>.md / .json (.png where matplotlib imports) and
# gpu-check-logs/ (one log per benchmarked system).
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
#   PYTHON                    the interpreter (default python3)
#   GPU_CHECK_DEVICE=cpu      testing the script itself on a host without CUDA (with GPU_CHECK_SHAPE=opt-tiny):
#                             no CUDA check, the benchmark on the CPU, no GPU cap
set -u -o pipefail
cd "$(dirname "$0")/.."
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
OUT_DIR=${1:-${GPU_CHECK_OUT:-benchmarks/results}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)

scratch=$(mktemp -d "${TMPDIR:-/tmp}/flexgen-gpu-check.XXXXXX")
checkpoint_root=
cleanup() {
    rm -rf "$scratch"
    [ -n "$checkpoint_root" ] && rm -rf "$checkpoint_root"
}
trap cleanup EXIT

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

# 2. The benchmark, in the time left (its own --time-limit covers the checkpoint, the profile and the systems).
if [ -n "${GPU_CHECK_CHECKPOINT_DIR:-}" ]; then
    checkpoint="$GPU_CHECK_CHECKPOINT_DIR"
else
    root=${TMPDIR:-/tmp}
    free_kib=$(df -Pk /dev/shm 2> /dev/null | awk 'NR == 2 {print $4}')
    if [ "${free_kib:-0}" -gt $((checkpoint_gib * 1024 * 1024)) ]; then
        root=/dev/shm
    fi
    checkpoint_root=$(mktemp -d "$root/flexgen-gpu-check-checkpoint.XXXXXX")
    checkpoint="$checkpoint_root/$SHAPE-random-float16"
fi
left=$((TIME_LIMIT - ($(date +%s) - started) - 15))
bench_log="$OUT_DIR/gpu-check-bench.log"
echo "gpu_check: benchmark, $SHAPE at $BUDGET (at most ${left} s) -> $bench_log"
profile=(--quick-profile)
[ -n "${GPU_CHECK_PROFILE:-}" ] && profile=(--profile "$GPU_CHECK_PROFILE")
bench_rc=1
if [ "$left" -gt 60 ]; then
    timeout --kill-after=10 $((left + 30)) "$PY" benchmarks/bench_gpu30b.py --device "$DEVICE" \
        --shape "$SHAPE" --budget "$BUDGET" --num-prompts "$NUM_PROMPTS" --prompt-len 512 --gen-len 32 "${profile[@]}" \
        --systems engine-paper engine flexgen-paper flexgen-gpu-attention accelerate \
        --system-timeout "$SYSTEM_TIMEOUT" --time-limit "$left" --checkpoint-dir "$checkpoint" \
        --logs "$OUT_DIR/gpu-check-logs" --out "$OUT_DIR" > "$bench_log" 2>&1
    bench_rc=$?
else
    echo "gpu_check: no time left for the benchmark (${left} s)" | tee "$bench_log"
fi

# 3. One table, one line for the tests.
name=gpu-30b-$SHAPE
[ "$SHAPE" = opt-30b ] && name=gpu-30b
if [ "$bench_rc" = 0 ] && [ -f "$OUT_DIR/$name.md" ]; then
    cat "$OUT_DIR/$name.md"
else
    echo "gpu_check: the benchmark did not finish (exit code $bench_rc); the end of its log:"
    tail -n 20 "$bench_log"
fi
echo
echo "gpu_check: tests: ${pytest_summary:-no summary} (exit code $pytest_rc; log $pytest_log)"
echo "gpu_check: benchmark exit code $bench_rc; results in $OUT_DIR; took $(( $(date +%s) - started )) s"
[ "$pytest_rc" = 0 ] && [ "$bench_rc" = 0 ]
