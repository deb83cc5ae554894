#!/usr/bin/env bash
# The one-GPU check (stages, time limits and verdicts: scripts/gpu_check.py):
#   scripts/gpu_check.sh OUTDIR
# Exits 0 only when every stage passed; OUTDIR gets every log and JSON, summary.txt and summary.json.
# Environment: PYTHON (default python3).
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
out="$(mkdir -p "$1" && cd "$1" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" -m scripts.gpu_check "$out"
