"""The optimizer study: run a study config's cells (see :mod:`.study_config`) and keep one compact
JSON record per run (config, per-evaluation losses with standard errors, the final evaluation's
per-sequence losses, training and wall time) in a results file that the report reads.

    python -m compositional_muon.experiments study --config study_small            # run / resume, then report
    python -m compositional_muon.experiments study --config study_small --report   # tables from the results only

Every run is an ordinary training run (``train.run``) in ``<work>/<cell>/<optimizer>/lr<lr>/seed<k>``
(metrics.jsonl and last.pt stay there, never in the results). At a seed every optimizer starts
from the same initial weights and sees the same training batches (``--seed`` seeds both), and every
evaluation scores the same fixed validation windows (:mod:`..evaluation`). A run already in the
results file is not run again, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time

from .. import train
from .config import ConfigError
from .grid import _fmt_value
from .measure import machine_info
from .study_config import CellSpec, StudyConfig

__all__ = ["RunKey", "Results", "run_argv", "best_lr", "cell_lrs", "run_study", "compact_record"]

STRING_SWITCHES = ("method", "whitening", "connection", "transform")
RunKey = tuple  # (cell, optimizer label, lr as "%.6g", seed)


def lr_key(lr: float) -> str:
    return f"{lr:.6g}"


class Results:
    """The results file: ``{"study", "source", "machine", "runs": [record, ...]}``, one run a line."""

    def __init__(self, path: str, study: StudyConfig):
        self.path, self.study = path, study
        self.meta: dict = {"study": study.name, "source": study.source, "description": study.description}
        self.runs: list[dict] = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            self.meta.update({k: v for k, v in data.items() if k != "runs"})
            self.runs = data.get("runs", [])

    def key(self, rec: dict) -> RunKey:
        return (rec["cell"], rec["optimizer"], lr_key(rec["lr"]), rec["seed"])

    def find(self, key: RunKey) -> dict | None:
        return next((r for r in self.runs if self.key(r) == key), None)

    def of(self, cell: str, label: str | None = None) -> list[dict]:
        return [r for r in self.runs if r["cell"] == cell and (label is None or r["optimizer"] == label)]

    def add(self, rec: dict) -> None:
        self.runs = [r for r in self.runs if self.key(r) != self.key(rec)] + [rec]
        self.save()

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        head = json.dumps({k: v for k, v in self.meta.items()}, separators=(",", ":"))
        body = ",\n".join(json.dumps(r, separators=(",", ":")) for r in self.runs)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(head[:-1] + ',"runs":[\n' + body + "\n]}\n")
        os.replace(tmp, self.path)


def run_argv(study: StudyConfig, cell: CellSpec, label: str, lr: float, seed: int, out: str) -> list[str]:
    """The training command line of one run."""
    spec = study.optimizers[label]
    argv = ["--model", study.model, "--optimizer", spec.name, "--lr", repr(float(lr))]
    argv += ["--adamw-lr", repr(study.adamw_lr)] if spec.name != "adamw" else []
    argv += ["--steps", str(cell.steps), "--batch-size", str(study.batch_size), "--block-size", str(study.block_size)]
    argv += ["--seed", str(seed), "--warmup", str(study.warmup), "--threads", str(study.threads)]
    argv += ["--eval-interval", str(max(1, cell.steps // study.eval_points))]
    argv += ["--eval-iters", str(study.eval_windows // study.batch_size)]
    argv += ["--ckpt-interval", "0", "--sample-tokens", "0", "--no-plot", "--quiet", "--out", out]
    argv += ["--data", study.data] if study.data else []
    for k, v in study.model_fields.items():
        argv += ["--model-arg", f"{k}={_fmt_value(v)}"]
    for k, v in spec.options.items():  # string switches by their own flag ("none" would parse as None)
        argv += [f"--{k}", v] if k in STRING_SWITCHES and isinstance(v, str) else ["--opt", f"{k}={_fmt_value(v)}"]
    return argv


def preflight(study: StudyConfig) -> None:
    """Build the model and every optimizer once, so a bad option fails before any training."""
    from ..models import build_model
    from ..recipes import build_optimizer

    cell = study.cells[0]
    for label in study.optimizers:
        args = train.parse_args(run_argv(study, cell, label, 0.01, 0, os.devnull))
        ocfg = train.optimizer_config(args)
        try:
            model = build_model(study.model, vocab_size=256, **train.model_config(args))
            build_optimizer(ocfg["name"], model, lr=ocfg["lr"], adamw_lr=ocfg["adamw_lr"], options=ocfg["options"])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"study {study.name!r}: optimizer {label!r}: {e}") from e


def compact_record(metrics: list[dict], *, wall_s: float) -> dict:
    """Per-evaluation ``[step, val, se, training seconds so far]``, the final evaluation (with its
    per-sequence losses), the mean training CE of the last 20 steps, median step time."""
    train_time, evals = 0.0, []
    for r in metrics:
        train_time += r["step_time"]
        if "val_loss" in r:
            evals.append(
                [r["step"], round(r["val_loss"], 5), round(r.get("val_se", float("nan")), 5), round(train_time, 3)]
            )
    last = next((r for r in reversed(metrics) if "val_losses" in r), None)
    tail = [r.get("parts", {}).get("ce", r["train_loss"]) for r in metrics[-20:]]
    times = sorted(r["step_time"] for r in (metrics[5:] or metrics))
    final = None
    if last is not None:
        final = dict(
            loss=last["val_loss"], se=last["val_se"], n=last["val_n"], losses=[round(v, 4) for v in last["val_losses"]]
        )
    return dict(
        steps_done=metrics[-1]["step"] if metrics else 0,
        evals=evals,
        final=final,
        train_tail=round(statistics.fmean(tail), 5) if tail else None,
        init_train=round(metrics[0]["train_loss"], 5) if metrics else None,
        median_step_s=round(times[len(times) // 2], 5) if times else None,
        train_s=round(train_time, 2),
        wall_s=round(wall_s, 2),
    )


def final_loss(rec: dict) -> float:
    """The run's final validation loss; +inf for a run that diverged or failed."""
    f = rec.get("final")
    return f["loss"] if rec.get("status") == "ok" and f and math.isfinite(f["loss"]) else math.inf


def best_lr(results: Results, cell: str, label: str) -> float:
    """The learning rate with the lowest mean final loss over the cell's seeds."""
    by_lr: dict[float, list[float]] = {}
    for r in results.of(cell, label):
        by_lr.setdefault(r["lr"], []).append(final_loss(r))
    if not by_lr:
        raise ConfigError(
            f"no results of cell {cell!r} for optimizer {label!r} in {results.path} (run that cell first)"
        )
    return min(by_lr, key=lambda lr: (statistics.fmean(by_lr[lr]), lr))


def _source(study: StudyConfig, results: Results, ref: str, results_dir: str) -> tuple[Results, str]:
    if ":" not in ref:
        return results, ref
    other, cell = ref.split(":", 1)
    from .study_config import load_study

    other_study = load_study(other)
    return Results(os.path.join(results_dir, f"{other_study.name}.json"), other_study), cell


def cell_lrs(study: StudyConfig, cell: CellSpec, results: Results, label: str, results_dir: str) -> list[float]:
    """The learning rates a cell runs for ``label`` (before any edge extension)."""
    if cell.lrs:
        return list(cell.lrs[label])
    of = cell.lr_label or label
    if cell.lrs_around is not None:
        src, name = _source(study, results, cell.lrs_around["cell"], results_dir)
        best = best_lr(src, name, of)
        return [best * m for m in cell.lrs_around["mults"]]
    if cell.lr_from is None:
        raise ConfigError(f"cell {cell.name!r} has no learning rates (lrs, lrs_around or lr_from)")
    src, name = _source(study, results, cell.lr_from, results_dir)
    return [best_lr(src, name, of)]


def execute(study: StudyConfig, cell: CellSpec, label: str, lr: float, seed: int, work: str, log) -> dict:
    """Train one run and return its compact record."""
    out = os.path.join(work, study.name, cell.name, label, f"lr{lr_key(lr)}", f"seed{seed}")
    argv = run_argv(study, cell, label, lr, seed, out)
    rec = dict(
        cell=cell.name, optimizer=label, optimizer_name=study.optimizers[label].name, lr=lr, seed=seed, steps=cell.steps
    )
    rec["options"] = study.optimizers[label].options
    t0 = time.time()
    with open(os.path.join(work, "train.log"), "a") as err, contextlib.redirect_stderr(err):
        try:
            summary = train.run(train.parse_args(argv))
            rec["status"] = "interrupted" if summary.get("interrupted") else "ok"
        except FloatingPointError as e:
            rec["status"], rec["error"] = "diverged", str(e)
        except RuntimeError as e:
            rec["status"], rec["error"] = "failed", f"{type(e).__name__}: {e}"
    metrics = (
        train.read_metrics(os.path.join(out, "metrics.jsonl"))
        if os.path.exists(os.path.join(out, "metrics.jsonl"))
        else []
    )
    rec.update(compact_record(metrics, wall_s=time.time() - t0), argv=argv)
    fl = final_loss(rec)
    print(
        f"{study.name}/{cell.name} {label} lr {lr:.4g} seed {seed}: {rec['status']} val {fl:.4f} ({rec['wall_s']:.0f} s)",
        file=log,
        flush=True,
    )
    return rec


def _same_run(results: Results, cell: CellSpec, label: str, lr: float, seed: int) -> dict | None:
    """A copy of an identical run of another cell (same optimizer, lr, seed and steps), if any."""
    for r in results.runs:
        if (r["optimizer"], lr_key(r["lr"]), r["seed"], r["steps"]) == (label, lr_key(lr), seed, cell.steps):
            if r.get("status") == "ok" and "copied_from" not in r:
                return dict(r, cell=cell.name, copied_from=r["cell"])
    return None


def _run_grid(study, cell, results, label, lrs, work, log, seeds=None) -> None:
    for lr in lrs:
        for seed in [s for s in cell.seeds if seeds is None or s in seeds]:
            if results.find((cell.name, label, lr_key(lr), seed)) is None:
                rec = _same_run(results, cell, label, lr, seed) or execute(study, cell, label, lr, seed, work, log)
                if rec["status"] == "interrupted":
                    raise KeyboardInterrupt
                results.add(rec)


def run_cell(
    study: StudyConfig, cell: CellSpec, results: Results, *, work: str, results_dir: str, log, seeds=None
) -> None:
    """Run a cell's missing runs (seeds interleaved per optimizer and lr); for a swept cell, extend
    the grid while its best learning rate sits at an edge (``extend_edges`` points in all)."""
    plan = {label: cell_lrs(study, cell, results, label, results_dir) for label in cell.optimizers}
    for label, lrs in plan.items():
        if cell.lr_from is not None:  # lr taken from another cell: drop records of an lr that is no longer the pick
            keep = {lr_key(lr) for lr in lrs}
            stale = [r for r in results.of(cell.name, label) if lr_key(r["lr"]) not in keep]
            if stale:
                print(f"{cell.name} {label}: dropping {len(stale)} run(s) at an earlier lr pick", file=log)
                results.runs = [r for r in results.runs if not any(r is s for s in stale)]
                results.save()
        _run_grid(study, cell, results, label, lrs, work, log, seeds)
    for label in cell.optimizers if len(next(iter(plan.values()))) > 1 else ():
        while True:
            tried = sorted({r["lr"] for r in results.of(cell.name, label)})
            best = best_lr(results, cell.name, label)
            if len(tried) < 2 or tried[0] < best < tried[-1] or len(tried) - len(plan[label]) >= cell.extend_edges:
                break
            ratio = tried[1] / tried[0] if best == tried[0] else tried[-1] / tried[-2]
            new = best / ratio if best == tried[0] else best * ratio
            print(f"{cell.name} {label}: best lr {best:.4g} at the edge; adding {new:.4g}", file=log, flush=True)
            _run_grid(study, cell, results, label, [new], work, log, seeds)


def run_study(
    study: StudyConfig, results_path: str, *, cells=None, seeds=None, work: str = "runs/study", log=None
) -> Results:
    """Run (or continue) the study's cells in order (all, or the names in ``cells``; only the seeds
    in ``seeds`` when given, so that a study can be run in slices)."""
    import sys

    log = log or sys.stdout
    results = Results(results_path, study)
    results.meta.setdefault("machine", machine_info(study.threads))
    names = list(cells) if cells else [c.name for c in study.cells]
    for name in names:
        study.cell(name)  # unknown names fail before anything runs
    preflight(study)
    os.makedirs(work, exist_ok=True)
    for name in names:
        run_cell(
            study,
            study.cell(name),
            results,
            work=work,
            results_dir=os.path.dirname(os.path.abspath(results_path)),
            log=log,
            seeds=seeds,
        )
    return results
