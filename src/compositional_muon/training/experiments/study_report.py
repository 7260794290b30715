"""Markdown tables of a study's results file (every number recomputed from the run records).

* a learning-rate sweep table for every cell that ran more than one lr for an optimizer;
* for every cell with one lr per optimizer: final validation loss per optimizer (mean and sd over
  seeds, and the mean per-run standard error of the fixed validation set), paired same-seed
  differences against the reference optimizer (``muon`` when present) and between the others, with
  Student-t 95% intervals, and steps / training time to reach the reference's final loss;
* a summary of the paired differences across cells (the horizons).
"""

from __future__ import annotations

import json
import math
import os
import statistics

from ..stats import PairedDiff, first_crossing, mean_ci, paired_difference
from .study import Results, final_loss
from .study_config import StudyConfig

__all__ = ["write_tables", "render", "paired_cells", "cell_pairs", "to_target", "window_se"]


def _ok(results: Results, cell: str, label: str) -> list[dict]:
    """The finished runs of ``label`` in ``cell`` (or in the cell it is compared with)."""
    runs = [r for r in results.of(cell, label) if r.get("status") == "ok" and r.get("final")]
    other = _compare_cell(results, cell)
    return runs if runs or other is None else _ok(results, other, label)


def _compare_cell(results: Results, cell: str) -> str | None:
    names = {c.name: c for c in results.study.cells}
    return names[cell].compare_with if cell in names else None


def _lrs(results: Results, cell: str, label: str) -> list[float]:
    return sorted({r["lr"] for r in results.of(cell, label)})


def paired_cells(study: StudyConfig, results: Results) -> list[str]:
    """Cells that ran one lr per optimizer (the paired comparisons), in config order."""
    out = []
    for c in study.cells:
        labels = [lab for lab in c.optimizers if results.of(c.name, lab)]
        if labels and all(len(_lrs(results, c.name, lab)) == 1 for lab in labels):
            out.append(c.name)
    return out


def _by_seed(results: Results, cell: str, label: str) -> dict[int, float]:
    return {r["seed"]: final_loss(r) for r in _ok(results, cell, label)}


def cell_pairs(labels: list[str]) -> list[tuple[str, str]]:
    """(A, B) pairs reported as A - B: everything against ``muon``, then the others among themselves."""
    if not labels:
        return []
    ref = "muon" if "muon" in labels else labels[0]
    rest = [lab for lab in labels if lab != ref]
    return [(a, ref) for a in rest] + [(a, b) for i, a in enumerate(rest) for b in rest[i + 1 :]]


def window_se(a: dict, b: dict) -> float:
    """Standard error of the mean per-window difference of two runs' final evaluations (same windows)."""
    d = [x - y for x, y in zip(a["final"]["losses"], b["final"]["losses"])]
    return statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")


def to_target(results: Results, cell: str, label: str, ref: str) -> dict:
    """Per seed: the steps and training seconds ``label`` needs to reach ``ref``'s final loss at that
    seed, as fractions of ``ref``'s steps and training seconds (None when never reached)."""
    runs = {r["seed"]: r for r in _ok(results, cell, label)}
    refs = {r["seed"]: r for r in _ok(results, cell, ref)}
    out = {}
    for seed in sorted(set(runs) & set(refs)):
        ev, target = runs[seed]["evals"], refs[seed]["final"]["loss"]
        steps = first_crossing([e[0] for e in ev], [e[1] for e in ev], target)
        secs = first_crossing([e[3] for e in ev], [e[1] for e in ev], target)
        out[seed] = dict(
            steps=None if steps is None else steps / refs[seed]["steps"],
            time=None if secs is None else secs / refs[seed]["train_s"],
        )
    return out


def step_time_ratios(results: Results) -> dict | None:
    """Per-optimizer training-step time over the reference's, from ``<study>_step_time.json`` next
    to the results (``bench/train_step_time.py``: every optimizer timed in one process, interleaved),
    or None when that file is absent."""
    path = os.path.splitext(results.path)[0] + "_step_time.json"
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        med = json.load(f)["median_s"]
    return {lab: t / med["muon"] for lab, t in med.items()} if "muon" in med else None


def _ci_text(d: PairedDiff) -> str:
    mark = " *" if d.excludes_zero() else ""
    return d.text() + mark


def _frac_text(values: list) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return f"not reached (0 of {len(values)})"
    ci = mean_ci(got)
    head = f"{ci.mean:.2f}" + ("" if ci.n < 2 else f" [{ci.lo:.2f}, {ci.hi:.2f}]")
    return head + ("" if len(got) == len(values) else f" ({len(got)} of {len(values)} reached)")


def _sweep_tables(study: StudyConfig, results: Results) -> list[str]:
    lines: list[str] = []
    for c in study.cells:
        labels = [lab for lab in c.optimizers if len(_lrs(results, c.name, lab)) > 1]
        if not labels:
            continue
        lines += [f"### {c.name}: learning-rate sweep, {c.steps} steps (final val loss, mean over seeds)", ""]
        lines += [
            "| optimizer | seeds | lr: final val loss (best bold) | best lr | interior |",
            "|---|---|---|---|---|",
        ]
        for lab in labels:
            lrs, cells = _lrs(results, c.name, lab), []
            means = {
                lr: statistics.fmean(final_loss(r) for r in results.of(c.name, lab) if r["lr"] == lr) for lr in lrs
            }
            best = min(lrs, key=lambda lr: (means[lr], lr))
            for lr in lrs:
                v = "diverged" if not math.isfinite(means[lr]) else f"{means[lr]:.4f}"
                cells.append(f"{lr:.3g}: " + (f"**{v}**" if lr == best else v))
            seeds = len({r["seed"] for r in results.of(c.name, lab)})
            interior = "yes" if lrs[0] < best < lrs[-1] else "no (edge)"
            lines.append(f"| {lab} | {seeds} | {'; '.join(cells)} | {best:.3g} | {interior} |")
        lines.append("")
    return lines


def _cell_table(study: StudyConfig, results: Results, cell: str, ratios: dict) -> list[str]:
    """One paired cell's tables; ``ratios``: :func:`step_time_ratios` (read once per report)."""
    c = study.cell(cell)
    others = list(study.cell(c.compare_with).optimizers) if c.compare_with else []
    labels = [lab for lab in dict.fromkeys(list(c.optimizers) + others) if _ok(results, cell, lab)]
    seeds = sorted({r["seed"] for lab in labels for r in _ok(results, cell, lab)})
    lines = [
        f"### {cell}: {c.steps} steps (warmup {study.warmup} + cosine), seeds run: {', '.join(map(str, seeds))}",
        "",
    ]
    lines += ["| optimizer | lr | runs | final val loss (mean ± sd over seeds) | eval SE (per run) | ms/step |"]
    lines += ["|---|---|---|---|---|---|"]
    for lab in labels:
        runs = _ok(results, cell, lab)
        vals = [final_loss(r) for r in runs]
        sd = f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
        se = statistics.fmean(r["final"]["se"] for r in runs)
        ms = statistics.median(r["median_step_s"] for r in runs) * 1000
        lines.append(
            f"| {lab} | {runs[0]['lr']:.3g} | {len(runs)} | {statistics.fmean(vals):.4f}{sd} | {se:.4f} | {ms:.0f} |"
        )
    lines += [
        "",
        "| difference (A - B) | seeds | mean [95% CI] | eval-set SE of one seed's difference |",
        "|---|---|---|---|",
    ]
    for a, b in cell_pairs(labels):
        try:
            d = paired_difference(_by_seed(results, cell, a), _by_seed(results, cell, b))
        except ValueError:
            continue
        ra, rb = ({r["seed"]: r for r in _ok(results, cell, lab)} for lab in (a, b))
        wse = statistics.fmean(window_se(ra[s], rb[s]) for s in sorted(set(ra) & set(rb)))
        lines.append(f"| {a} - {b} | {d.n} | {_ci_text(d)} | {wse:.4f} |")
    ref = "muon" if "muon" in labels else None
    if ref:
        lines += [
            "",
            f"To reach {ref}'s final loss (same seed), as a fraction of {ref}'s steps / training time "
            "(training time: sum of step times, evaluation excluded; on a shared machine it carries the load "
            "changes between runs; the last column uses instead the step-time ratio measured with every optimizer in "
            "one process, `bench/train_step_time.py`, when its JSON is next to the results):",
            "",
        ]
        lines += [
            "| optimizer | steps (mean [95% CI]) | training time (mean [95% CI]) | step-time ratio (bench) "
            "| wall-clock = steps x ratio |",
            "|---|---|---|---|---|",
        ]
        for lab in labels:
            if lab != ref:
                t = to_target(results, cell, lab, ref)
                steps, times = [v["steps"] for v in t.values()], [v["time"] for v in t.values()]
                r = ratios.get(lab)
                quiet = "-" if r is None else _frac_text([None if s is None else s * r for s in steps])
                lines.append(
                    f"| {lab} | {_frac_text(steps)} | {_frac_text(times)} | {'-' if r is None else f'{r:.3f}'} "
                    f"| {quiet} |"
                )
    return lines + [""]


def _summary(study: StudyConfig, results: Results, cells: list[str]) -> list[str]:
    labels = [lab for lab in study.optimizers if any(_ok(results, c, lab) for c in cells)]
    extra = (("cm", "per-head"), ("cm", "per-head-muon"), ("cm", "cm-no-nesterov"))
    pairs = [p for p in cell_pairs(labels) if p[1] == "muon" or p in extra]
    pairs = [p for p in pairs if any(_ok(results, c, p[0]) and _ok(results, c, p[1]) for c in cells)]
    if not pairs:
        return []
    lines = ["### Summary: paired differences of the final val loss, mean [95% CI] (* : the interval excludes 0)", ""]
    lines += [
        "| cell | steps | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |",
        "|---|---|" + "---|" * len(pairs),
    ]
    for cell in cells:
        row = []
        own = set(study.cell(cell).optimizers)
        for a, b in pairs:
            if study.cell(cell).compare_with and not ({a, b} & own):
                row.append(f"(see {study.cell(cell).compare_with})")
                continue
            try:
                row.append(_ci_text(paired_difference(_by_seed(results, cell, a), _by_seed(results, cell, b))))
            except ValueError:
                row.append("-")
        lines.append(f"| {cell} | {study.cell(cell).steps} | " + " | ".join(row) + " |")
    return lines + [""]


def render(study: StudyConfig, results: Results, command: str = "") -> str:
    m = results.meta.get("machine", {})
    n_runs = len(results.runs)
    wall = sum(r.get("wall_s", 0.0) for r in results.runs if "copied_from" not in r)
    head = [f"## Study `{study.name}`", "", study.description, ""]
    head += [f"Command: `{command or 'python -m compositional_muon.experiments study --config ' + study.name}`", ""]
    head += [
        f"{n_runs} run records ({sum('copied_from' in r for r in results.runs)} shared between cells), "
        f"{wall / 60:.0f} min of training wall time; machine: {m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores, "
        f"shared with other jobs), torch {m.get('torch', '?')}, {m.get('threads', '?')} thread(s). Losses in nats/token "
        "(= nats/byte). Fixed validation set: the same evenly spaced windows at every evaluation.",
        "",
    ]
    cells = paired_cells(study, results)
    body = _summary(study, results, cells) + _sweep_tables(study, results)
    ratios = step_time_ratios(results) or {}
    for cell in cells:
        body += _cell_table(study, results, cell, ratios)
    return "\n".join(head + body)


def write_tables(study: StudyConfig, results: Results, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(study, results) + "\n")
    return path
