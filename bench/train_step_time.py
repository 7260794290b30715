"""Whole training-step time (forward, backward, optimizer step) of a study's optimizers on the
study's model, in one process, interleaved round-robin so that machine-load changes hit every
optimizer alike.

The study runner records each run's step times, but its runs go one after another on a machine
whose load changes; this bench gives the per-step cost ratios to turn a study's steps-to-target
into wall-clock-to-target (``time fraction = steps fraction x step-time ratio``), which the study
report does when ``<study>_step_time.json`` lies next to the results.

    python bench/train_step_time.py --config study_small          # all the config's optimizers
    python bench/train_step_time.py --config study_large --rounds 5 --steps 4

Every optimizer gets its own copy of the model (same initial weights) and the same fixed batch of
byte tokens; the lr of each is the study's best where its results exist (it does not change the
cost), else the library default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchkit.machine import cpu_flags, cpu_model, msign_dtype_name  # noqa: E402

from compositional_muon.training.experiments.study_config import load_study  # noqa: E402
from compositional_muon.training.models import build_model  # noqa: E402
from compositional_muon.training.recipes import build_optimizer  # noqa: E402


def _lr(results: dict, label: str) -> float | None:
    runs = [r for r in results.get("runs", []) if r["optimizer"] == label and r.get("status") == "ok"]
    if not runs:
        return None
    return min(runs, key=lambda r: r["final"]["loss"])["lr"]


def _setup(study, label: str, results: dict):
    torch.manual_seed(0)
    model = build_model(study.model, **study.model_fields)
    spec = study.optimizers[label]
    kwargs = {} if spec.name == "adamw" else {"adamw_lr": study.adamw_lr}
    opt = build_optimizer(spec.name, model, lr=_lr(results, label), options=dict(spec.options), **kwargs)
    return model, opt


def _step(model, opt, x, y) -> None:
    _, loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure(study, labels: list[str], results: dict, *, rounds: int, steps: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (study.batch_size, study.block_size), generator=g)
    y = torch.randint(0, 256, (study.batch_size, study.block_size), generator=g)
    setups = {lab: _setup(study, lab, results) for lab in labels}
    for lab in labels:
        for _ in range(warmup):
            _step(*setups[lab], x, y)
    samples: dict[str, list[float]] = {lab: [] for lab in labels}
    for _ in range(rounds):
        for lab in labels:
            for _ in range(steps):
                t0 = time.perf_counter()
                _step(*setups[lab], x, y)
                samples[lab].append(time.perf_counter() - t0)
    return samples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a study config (e.g. study_small)")
    p.add_argument("--only", help="comma-separated optimizer labels (default: all of the config's)")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds")
    p.add_argument("--steps", type=int, default=5, help="timed steps per optimizer per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results-dir", default=os.path.join("docs", "results", "study"))
    p.add_argument("--out", help="JSON output (default: <results-dir>/<config>_step_time.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    study = load_study(args.config)
    labels = args.only.split(",") if args.only else list(study.optimizers)
    res_path = os.path.join(args.results_dir, f"{study.name}.json")
    results = json.load(open(res_path)) if os.path.exists(res_path) else {}
    load0 = os.getloadavg()[0]
    samples = measure(study, labels, results, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    med = {lab: statistics.median(v) for lab, v in samples.items()}
    ref = "muon" if "muon" in med else labels[0]
    out = dict(
        study=study.name,
        machine=dict(
            cpu=cpu_model(),
            flags=[k for k, v in cpu_flags().items() if v],
            cores=os.cpu_count(),
            threads=args.threads,
            torch=torch.__version__,
            msign_dtype=msign_dtype_name("cpu"),
            load_before=load0,
            load_after=os.getloadavg()[0],
        ),
        rounds=args.rounds,
        steps=args.steps,
        median_s=med,
        ratio_to=ref,
        ratio={lab: med[lab] / med[ref] for lab in labels},
        samples_s={lab: [round(s, 5) for s in v] for lab, v in samples.items()},
    )
    path = args.out or os.path.join(args.results_dir, f"{study.name}_step_time.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{study.name}: training step (fwd+bwd+opt), median of {args.rounds}x{args.steps}, {args.threads} thread(s)")
    for lab in labels:
        print(f"  {lab:<16} {med[lab] * 1000:8.1f} ms  {out['ratio'][lab]:.3f}x {ref}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
