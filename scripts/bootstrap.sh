#!/usr/bin/env bash
# Create .venv (once) and install this project into it with the right PyTorch build:
#   - torch already importable in .venv: keep it;
#   - an NVIDIA GPU is visible (nvidia-smi): the default PyPI build (CUDA);
#   - otherwise: torch 2.13.0 CPU build, from PyTorch's CPU wheel index when it is reachable
#     (or a local wheel that pip is configured to find), never the multi-GB CUDA build by accident
#     where the CPU one can be had.
# Usage: scripts/bootstrap.sh [extras]   e.g. "test" or "train"
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "bootstrap: GPU found, installing the default (CUDA) torch build"
    pip_install "torch>=2.4"
  else
    cpu_index="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
    if .venv/bin/python - "$cpu_index" <<'PYEOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5)
PYEOF
    then
      echo "bootstrap: no GPU, installing torch 2.13.0 (CPU build from $cpu_index)"
      pip_install "torch==2.13.0" --extra-index-url "$cpu_index"
    else
      echo "bootstrap: no GPU, installing torch 2.13.0 (CPU build where pip finds one locally)"
      pip_install "torch==2.13.0"
    fi
  fi
fi
if [ -n "$extras" ]; then
  pip_install -e ".[$extras]"
else
  pip_install -e .
fi
