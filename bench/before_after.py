"""Before/after step times of the kernel work: the current tree vs the same tree with the kernel
files (``cm/kernel.py``, ``msign.py``, ``inverse_root.py``, ``connection.py``) taken from a git ref.

    python bench/before_after.py [--ref HEAD] [--shape small] [--only "CM full,Muon"] [step_time args]

Builds a temporary copy of ``src/`` with those four files from ``--ref`` (read with ``git show``;
nothing in the working tree is touched), runs ``bench/step_time.py --src`` on it and
on the current tree, and prints the two medians side by side. Writes
``bench/results_before.json`` / ``bench/results_after.json`` unless ``--json-before`` /
``--json-after`` say otherwise. Other arguments are passed to ``step_time.py`` unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KERNEL_FILES = ("cm/kernel.py", "msign.py", "inverse_root.py", "connection.py")


def export_before(ref: str, dest: str) -> str:
    src = os.path.join(dest, "src")
    if os.path.exists(dest):
        shutil.rmtree(dest)
    shutil.copytree(os.path.join(ROOT, "src"), src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in KERNEL_FILES:
        text = subprocess.run(
            ["git", "show", f"{ref}:src/compositional_muon/{f}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        with open(os.path.join(src, "compositional_muon", f), "w") as fh:
            fh.write(text)
    return src


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="HEAD")
    p.add_argument("--json-before", default=os.path.join(HERE, "results_before.json"))
    p.add_argument("--json-after", default=os.path.join(HERE, "results_after.json"))
    p.add_argument("--skip-after", action="store_true", help="only run the 'before' tree")
    args, rest = p.parse_known_args()
    src = export_before(args.ref, os.path.join(tempfile.mkdtemp(prefix="cm_before_"), "tree"))
    step = os.path.join(HERE, "step_time.py")
    runs = [("before", ["--src", src, "--json", args.json_before, "--label", f"before ({args.ref} kernel files)"])]
    if not args.skip_after:
        runs.append(("after", ["--json", args.json_after, "--label", "after (working tree)"]))
    for name, extra in runs:
        print(f"\n===== {name} =====", flush=True)
        subprocess.run([sys.executable, step, *rest, *extra], check=True)
    if args.skip_after:
        return
    with open(args.json_before) as f:
        before = json.load(f)
    with open(args.json_after) as f:
        after = json.load(f)
    print("\n| shape | optimizer | before ms (n) | after ms (n) | speed-up |\n|---|---|---:|---:|---:|")
    for rb, ra in zip(before["results"], after["results"]):
        for name, b in rb["rows"].items():
            a = ra["rows"].get(name)
            if a is None:
                continue
            print(
                f"| {rb['shape']} | {name} | {b['median_s'] * 1e3:.1f} ({b['n']}) | {a['median_s'] * 1e3:.1f} ({a['n']}) "
                f"| {b['median_s'] / a['median_s']:.1f}x |"
            )


if __name__ == "__main__":
    main()
