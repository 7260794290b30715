#!/usr/bin/env bash
# Build the sdist and wheel (python -m build), install the wheel into a fresh virtualenv that does
# not see any other site-packages, and run a smoke test from outside the repository.
# torch comes from where scripts/bootstrap.sh gets it (the CPU wheel index, or pip's local config).
# Usage: scripts/wheel_smoke.sh      (PYTHON: the interpreter with `build`, default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
PY="${PYTHON:-.venv/bin/python}"
work="$(mktemp -d "${TMPDIR:-/tmp}/cm-wheel-XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$PY" -m build --sdist --wheel --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
wheel="$(ls "$work"/dist/*.whl)"
ls "$work"/dist/*.tar.gz >/dev/null
echo "wheel_smoke: built $(basename "$wheel") and $(basename "$work"/dist/*.tar.gz)"
# a fresh venv from the base interpreter (no --system-site-packages): only what we install is there
"$("$PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')" -m venv "$work/venv"
pip_install() { "$work/venv/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
if [ "$("$work/venv/bin/python" -c 'import sys; print(sys.prefix != sys.base_prefix)')" != True ]; then
  echo "wheel_smoke: not a virtualenv" >&2; exit 1
fi
cpu_index="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
if "$work/venv/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" "$cpu_index" >/dev/null 2>&1; then
  pip_install "torch==2.13.0" --extra-index-url "$cpu_index"
else
  pip_install "torch==2.13.0"
fi
pip_install "$wheel"
"$work/venv/bin/python" -m pip check
cd "$work"  # outside the repository: the installed wheel, not src/, is imported
"$work/venv/bin/python" - "$repo" <<'PYEOF'
import importlib.metadata as md
import re
import sys

import torch

import compositional_muon as cm

repo = sys.argv[1]
assert not cm.__file__.startswith(repo), f"imported from the repository: {cm.__file__}"
assert md.version("compositional-muon") == cm.__version__, (md.version("compositional-muon"), cm.__version__)
core = [r for r in (md.requires("compositional-muon") or []) if "extra ==" not in r]
assert [re.split(r"[<>=!~ ;\[]", r)[0] for r in core] == ["torch"], f"core dependencies: {core}"
for heavy in ("transformers", "lightning", "torchtitan", "matplotlib", "tqdm", "tensorboard", "psutil"):
    assert heavy not in sys.modules, f"import compositional_muon imported {heavy}"


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.num_heads = 2
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(8, 8, bias=False) for _ in range(4))


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(16, 8), Attn(), torch.nn.Linear(8, 8))
opt = cm.CompositionalMuon.from_model(model, lr=0.02, msign_dtype=torch.float32)
before = [p.detach().clone() for p in model.parameters()]
for p in model.parameters():
    p.grad = torch.randn_like(p)
opt.step()
assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "a parameter did not move"
again = cm.CompositionalMuon.from_model(model, lr=0.02, msign_dtype=torch.float32)
again.load_state_dict(opt.state_dict())
print(f"wheel_smoke: compositional_muon {cm.__version__} from {cm.__file__}: CM step and state_dict round trip ok")
PYEOF
