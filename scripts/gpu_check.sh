#!/usr/bin/env bash
# One-GPU check, under 10 minutes, nothing downloaded (works without `datasets` and `flash-attn`):
#   1. the CUDA tests          (tests/test_gpu.py)                      -> OUTDIR/gpu_tests.log
#   2. the benchmark           (python -m training.benchmark)           -> OUTDIR/benchmark.{json,log}
#   3. MoE dispatch, both ways (benchmark --moe-dispatch grouped_mm, then sorted; the deepseek step only)
#                                                                       -> OUTDIR/dispatch_{grouped_mm,sorted}.{json,log}
#   4. the decode benchmark    (python -m inference.decode_benchmark, contexts 1k..32k, batches 1 and 8)
#                                                                       -> OUTDIR/decode.{json,png,log}
#   5. the full experiment     (python exp6_trainer.py --offline)       -> OUTDIR/exp6_results, OUTDIR/experiment.log
#   6. generation from its saved models (python -m inference.generate) -> OUTDIR/generate.log
#   7. only when more than one GPU is visible: torchrun on 2 GPUs, 200 steps of the full sizes, once
#      seed-parallel (--seeds 42 43) and once data-parallel (one seed, the batch split over both)
#                                                                       -> OUTDIR/two_gpu_{seeds,data}{,.log}
# Every stage runs under `timeout`; a failed stage does not stop the later ones. The summary of exit
# codes goes to stdout and OUTDIR/summary.txt; the script exits non-zero if any stage failed.
#
#   scripts/gpu_check.sh OUTDIR
#
# Environment: PYTHON (default: python3), TESTS_TIMEOUT / BENCHMARK_TIMEOUT / DISPATCH_TIMEOUT /
# DECODE_TIMEOUT / EXPERIMENT_TIMEOUT / GENERATE_TIMEOUT in seconds (defaults 90 / 120 / 30 each /
# 60 / 200 / 20: with the 5 s kill grace each, at most 9.8 minutes in all; TWO_GPU_TIMEOUT, default 120
# for each of stage 7's two runs, adds up to 4.2 minutes on a machine with several GPUs). Stage 3 tells which MoE dispatch is faster on this card: on sm90+ grouped_mm
# is the fused kernel; on sm80/sm89 it is PyTorch's per-group fallback, against the sorted split that
# `--moe-dispatch auto` picks there.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUTDIR="$(cd "$1" && pwd)"  # absolute, since we cd to the repo root below
cd "$REPO_ROOT"

PYTHON="${PYTHON:-python3}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-90}"
BENCHMARK_TIMEOUT="${BENCHMARK_TIMEOUT:-120}"
DISPATCH_TIMEOUT="${DISPATCH_TIMEOUT:-30}"
DECODE_TIMEOUT="${DECODE_TIMEOUT:-60}"
GENERATE_TIMEOUT="${GENERATE_TIMEOUT:-20}"
EXPERIMENT_TIMEOUT="${EXPERIMENT_TIMEOUT:-200}"
KILL_GRACE=5

export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing is downloaded

SCRIPT_START=$SECONDS

{
    echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "repo: $REPO_ROOT"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ' (with uncommitted changes)')"
    echo
    echo "== nvidia-smi =="
    nvidia-smi 2>&1 || echo "nvidia-smi failed (exit $?)"
    echo
    echo "== python / torch =="
    "$PYTHON" - <<'EOF' 2>&1 || echo "python version check failed"
import importlib.metadata as md
import platform

import torch

print("python", platform.python_version())
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
for package in ("transformers", "tokenizers", "datasets", "numpy", "matplotlib", "tqdm", "pytest", "flash-attn"):
    try:
        print(f"{package} {md.version(package)}")
    except md.PackageNotFoundError:
        print(f"{package} not installed")
EOF
} > "$OUTDIR/env.txt"
cat "$OUTDIR/env.txt"

STAGES=()
CODES=()
SECS=()

# run_stage NAME SECONDS LOGFILE COMMAND...: runs COMMAND under timeout, output to LOGFILE (and the last
# lines to stdout); records the exit code without stopping the script.
run_stage() {
    local name="$1" limit="$2" log="$3"
    shift 3
    echo
    echo "== $name (timeout ${limit}s): $* =="
    local start=$SECONDS rc=0
    timeout -k "$KILL_GRACE" "$limit" "$@" > "$log" 2>&1 || rc=$?
    local took=$((SECONDS - start))
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "TIMED OUT after ${limit}s (exit $rc)" >> "$log"
    fi
    tail -n 25 "$log" || true
    echo "-- $name: exit $rc in ${took}s (log: $log)"
    STAGES+=("$name")
    CODES+=("$rc")
    SECS+=("$took")
}

run_stage "gpu tests" "$TESTS_TIMEOUT" "$OUTDIR/gpu_tests.log" \
    "$PYTHON" -m pytest tests/test_gpu.py -v -rA -p no:cacheprovider
run_stage "benchmark" "$BENCHMARK_TIMEOUT" "$OUTDIR/benchmark.log" \
    "$PYTHON" -m training.benchmark --output "$OUTDIR/benchmark.json"
for dispatch in grouped_mm sorted; do
    run_stage "dispatch $dispatch" "$DISPATCH_TIMEOUT" "$OUTDIR/dispatch_$dispatch.log" \
        "$PYTHON" -m training.benchmark --models deepseek --skip-public-style --moe-dispatch "$dispatch" \
        --steps 10 --warmup 3 --seq-lens 256 --output "$OUTDIR/dispatch_$dispatch.json"
done
run_stage "decode benchmark" "$DECODE_TIMEOUT" "$OUTDIR/decode.log" \
    "$PYTHON" -m inference.decode_benchmark --contexts 1024 4096 16384 32768 --batch-sizes 1 8 --new-tokens 64 \
    --output "$OUTDIR/decode.json"
run_stage "experiment" "$EXPERIMENT_TIMEOUT" "$OUTDIR/experiment.log" \
    "$PYTHON" exp6_trainer.py --offline --output-dir "$OUTDIR/exp6_results" --cache-dir "$OUTDIR/data_cache"
run_stage "generate" "$GENERATE_TIMEOUT" "$OUTDIR/generate.log" \
    "$PYTHON" -m inference.generate --checkpoint "$OUTDIR/exp6_results" --prompt "The" --greedy \
    --max-new-tokens 32 --device cuda

GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [[ "$GPUS" -gt 1 ]]; then
    for mode in seeds data; do
        seeds=(42)
        [[ $mode == seeds ]] && seeds=(42 43)
        run_stage "2-GPU $mode" "${TWO_GPU_TIMEOUT:-120}" "$OUTDIR/two_gpu_$mode.log" \
            "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 exp6_trainer.py --offline \
            --parallel "$mode" --seeds "${seeds[@]}" --steps 200 --no-save \
            --output-dir "$OUTDIR/two_gpu_$mode" --cache-dir "$OUTDIR/data_cache"
    done
else
    echo
    echo "== 2-GPU stages: skipped ($GPUS GPU visible) =="
fi

failed=0
{
    echo "== summary (total $((SECONDS - SCRIPT_START))s) =="
    for i in "${!STAGES[@]}"; do
        status="ok"
        if [[ ${CODES[$i]} -eq 124 || ${CODES[$i]} -eq 137 ]]; then
            status="TIMED OUT"
        elif [[ ${CODES[$i]} -ne 0 ]]; then
            status="FAILED"
        fi
        printf '%-20s exit %-4s %5ss  %s\n' "${STAGES[$i]}" "${CODES[$i]}" "${SECS[$i]}" "$status"
    done
} | tee "$OUTDIR/summary.txt"
# the pipeline above runs in a subshell, so decide from the recorded codes here
for code in "${CODES[@]}"; do
    [[ $code -eq 0 ]] || failed=1
done
exit "$failed"
