"""Collect the summary.json of every run folder under a directory into one compact JSON file.

Usage: python scripts/collect_runs.py RUNS_DIR OUT.json
Each record: the run's folder name (which names its settings), steps, final losses and the last\nevaluation's standard error over the fixed validation windows.
"""

from __future__ import annotations

import json
import os
import sys


def _last_eval(path: str) -> dict:
    """val_se and val_n of the last evaluation in a run's metrics.jsonl (empty if none)."""
    last: dict = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if "val_se" in rec:
                    last = {k: rec[k] for k in ("val_se", "val_n") if k in rec}
    return last


def collect(runs_dir: str) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(runs_dir)):
        path = os.path.join(runs_dir, name, "summary.json")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        keep = {k: summary[k] for k in ("steps", "final_train_loss", "final_val_loss") if k in summary}
        rows.append({"run": name, **keep, **_last_eval(os.path.join(runs_dir, name, "metrics.jsonl"))})
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python scripts/collect_runs.py RUNS_DIR OUT.json", file=sys.stderr)
        return 2
    rows = collect(argv[0])
    if not rows:
        print(f"error: no run with a summary.json under {argv[0]!r}", file=sys.stderr)
        return 2
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(rows)} runs to {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
