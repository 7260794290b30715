#!/usr/bin/env bash
# The prepared GPU check (see bench/gpu_check.py): device tests, step-time tables (gpt2 and 1B
# attention, bf16 msign, compile off/on, peak GPU memory) and a short training comparison on one
# CUDA GPU in under 8 minutes. Writes runs/gpu_check/gpu_check.{json,md}. Extra arguments go to
# gpu_check.py (e.g. --tiny for the CPU dry run, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec timeout 470 "$PY" bench/gpu_check.py "$@"
