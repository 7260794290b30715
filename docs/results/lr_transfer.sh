#!/usr/bin/env bash
# AdamW learning-rate transfer (issue 12, section 4): one learning rate for everything.
# AdamW at lr, and Muon / per-head Muon / CM with adjust_lr_fn=match_rms_adamw at the same lr
# (their AdamW groups at that lr too), on a small GPT (2 layers, width 128, 4 heads, byte tokens of
# the default corpus, batch 8 x 64, 300 steps, seed 0, fixed validation set).
# Usage (from the repository root): bash docs/results/lr_transfer.sh [OUT]   (about 5 min on 1 core)
# Writes OUT/*/summary.json and docs/results/lr_transfer.json (via scripts/collect_runs.py).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/lr_transfer}
for lr in 0.001 0.003 0.01 0.03; do
  for opt in adamw muon muon-per-head cm; do
    extra=()
    [ "$opt" != adamw ] && extra=(--adjust-lr-fn match_rms_adamw)
    "$PY" -m compositional_muon.train --model gpt --n-layer 2 --n-embd 128 --n-head 4 --block-size 64 \
      --batch-size 8 --steps 300 --seed 0 --threads 1 --optimizer "$opt" --lr "$lr" --adamw-lr "$lr" \
      "${extra[@]}" --sample-tokens 0 --out "$OUT/$opt-lr$lr" --overwrite >"$OUT-$opt-lr$lr.log" 2>&1
    echo "done $opt lr=$lr"
  done
done
"$PY" scripts/collect_runs.py "$OUT" docs/results/lr_transfer.json
