"""Aggregation over seeds and learning rates, and the grid's reports (results.json, results.md, plots)."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

from .. import head_maps
from . import measure as _measure
from .measure import read_metrics

__all__ = ["aggregate", "markdown_tables", "plot_model", "write_reports", "agg_summary"]


def _mean_std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan")), len(xs)


def aggregate(records: list, cfg: dict) -> dict:
    """model -> optimizer -> {lr multiplier (str) -> seed statistics, "best": multiplier}."""
    out = {}
    for r in records:
        cell = out.setdefault(r["model"], {}).setdefault(r["optimizer"], {"by_lr": {}})
        cell["by_lr"].setdefault(f"{r['lr_mult']:g}", []).append(r)
    for opts in out.values():
        for cell in opts.values():
            stats = {}
            for mult, rs in cell["by_lr"].items():
                val, val_sd, n = _mean_std([r.get("final_val_loss") for r in rs])
                tr, tr_sd, _ = _mean_std([r.get("final_train_loss") for r in rs])
                times = [r["median_step_time"] for r in rs if r.get("median_step_time")]
                mems = [r["peak_memory_delta_mb"] for r in rs if r.get("peak_memory_delta_mb") is not None]
                stats[mult] = dict(
                    lr=rs[0]["lr"],
                    seeds=[r["seed"] for r in rs],
                    n_finite=n,
                    final_val_loss=val,
                    final_val_std=val_sd,
                    final_train_loss=tr,
                    final_train_std=tr_sd,
                    median_step_time=statistics.median(times) if times else float("nan"),
                    tokens_per_s=(cfg["batch_size"] * cfg["block_size"] / statistics.median(times))
                    if times
                    else float("nan"),
                    peak_memory_delta_mb=max(mems) if mems else None,
                    statuses=sorted({r["status"] for r in rs}),
                )
            finite = {m: s for m, s in stats.items() if math.isfinite(s["final_val_loss"])}
            best = min(finite, key=lambda m: finite[m]["final_val_loss"]) if finite else next(iter(stats))
            cell.clear()
            cell.update(by_lr=stats, best=best)
    return out


def _f(x, fmt="{:.4f}"):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _sweep_rows(opts: dict) -> list:
    """The LR-sweep table of one model (empty without a sweep)."""
    mults = sorted({float(m) for c in opts.values() for m in c["by_lr"]})
    if len(mults) < 2:
        return []
    lines = [
        "LR sweep (final val loss, mean over seeds; the best, bold, is the row above):",
        "",
        "| optimizer | base lr | " + " | ".join(f"x{m:g}" for m in mults) + " |",
        "|---|---|" + "---|" * len(mults),
    ]
    for label, cell in opts.items():
        row = []
        for m in mults:
            s = cell["by_lr"].get(f"{m:g}")
            v = (
                "-"
                if s is None
                else ("diverged" if not math.isfinite(s["final_val_loss"]) else f"{s['final_val_loss']:.4f}")
            )
            row.append(f"**{v}**" if s is not None and f"{m:g}" == cell["best"] else v)
        base_lr = cell["by_lr"][cell["best"]]["lr"] / float(cell["best"])
        lines.append(f"| {label} | {base_lr:.3g} | " + " | ".join(row) + " |")
    return lines + [""]


def markdown_tables(agg: dict, cfg: dict, n_params: dict, plots: dict, names: dict) -> str:
    lines = []
    for model, opts in agg.items():
        desc = (
            ", ".join(f"{k}={v}" for k, v in cfg["models"][model]["fields"].items()) if model in cfg["models"] else ""
        )
        params = f"; {n_params[model] / 1e6:.2f}M params" if model in n_params else ""
        lines += [f"## {model} ({names.get(model, model)}{', ' + desc if desc else ''}{params})", ""]
        base_label = "adamw" if "adamw" in opts else next((o for o in opts if names.get(o) == "adamw"), None)
        base = opts[base_label]["by_lr"][opts[base_label]["best"]] if base_label else None
        seeds = max(len(c["by_lr"][c["best"]]["seeds"]) for c in opts.values())
        lines += [
            f"| optimizer | lr | final train loss | final val loss (mean ± std, {seeds} seed{'s' * (seeds > 1)}) "
            f"| vs AdamW (val) | time/step | vs AdamW (time) | tokens/s | peak RSS Δ |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, cell in opts.items():
            s = cell["by_lr"][cell["best"]]
            val = _f(s["final_val_loss"]) + (
                "" if not math.isfinite(s["final_val_std"]) else f" ± {s['final_val_std']:.4f}"
            )
            if s["n_finite"] < len(s["seeds"]):
                val += f" ({len(s['seeds']) - s['n_finite']} of {len(s['seeds'])} diverged/failed)"
            d_val = (
                _f(s["final_val_loss"] - base["final_val_loss"], "{:+.4f}")
                if base and label != base_label
                else ("baseline" if base else "n/a")
            )
            ratio = (
                _f(s["median_step_time"] / base["median_step_time"], "{:.2f}x")
                if base and label != base_label
                else ("1.00x" if base else "n/a")
            )
            mem = _f(s["peak_memory_delta_mb"], "{:.0f} MiB")
            lines.append(
                f"| {label} | {s['lr']:.3g} | {_f(s['final_train_loss'])} | {val} | {d_val} | "
                f"{_f(s['median_step_time'] * 1000, '{:.1f} ms')} | {ratio} | {_f(s['tokens_per_s'], '{:.0f}')} "
                f"| {mem} |"
            )
        lines.append("")
        lines += _sweep_rows(opts)
        if plots.get(model):
            lines += [f"![{model} loss curves]({os.path.basename(plots[model])})", ""]
    return "\n".join(lines)


def plot_model(model: str, records: list, agg_model: dict, png: str) -> str | None:
    """All optimizers (at their best lr) of one model: training CE (EMA-smoothed, mean over seeds)
    and val loss against step, and val loss against wall-clock seconds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plots (pip install matplotlib)", file=sys.stderr)
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, cell) in enumerate(agg_model.items()):
        best = cell["best"]
        runs = [r for r in records if r["model"] == model and r["optimizer"] == label and f"{r['lr_mult']:g}" == best]
        curves = [read_metrics(r["metrics"]) for r in runs]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        color = colors[i % len(colors)]
        steps = [curves[0][j]["step"] for j in range(n)]
        ce = [statistics.fmean(c[j].get("parts", {}).get("ce", c[j]["train_loss"]) for c in curves) for j in range(n)]
        smooth, acc = [], None
        for v in ce:
            acc = v if acc is None or not math.isfinite(acc) else 0.9 * acc + 0.1 * v
            smooth.append(acc)
        ax1.plot(steps, smooth, color=color, lw=1.2, label=f"{label} (lr {cell['by_lr'][best]['lr']:.3g})")
        val_steps = [j for j in range(n) if all("val_loss" in c[j] for c in curves)]
        if val_steps:
            vs = [steps[j] for j in val_steps]
            vv = [statistics.fmean(c[j]["val_loss"] for c in curves) for j in val_steps]
            vt = [statistics.fmean(c[j]["elapsed"] for c in curves) for j in val_steps]
            ax1.plot(vs, vv, "o", color=color, ms=3)
            ax2.plot(vt, vv, "o-", color=color, ms=3, lw=1, label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats/token)")
    ax1.set_title(f"{model}: train CE (EMA 0.9, line), val (dots); mean over seeds")
    ax2.set_xlabel("wall-clock seconds (incl. evaluation)")
    ax2.set_ylabel("val loss")
    ax2.set_title(f"{model}: val loss vs time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, 0.0), min(hi, 6.0))
    ax1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_reports(out: str, cfg: dict, records: list, n_params: dict, meta: dict, *, plots: bool = True) -> dict:
    """``results.json``, ``results.md`` and the plots from the records so far."""
    agg = aggregate(records, cfg)
    names = {m: cfg["models"][m]["model"] for m in cfg["models"]}
    names.update({o: cfg["optimizers"][o]["optimizer"] for o in cfg["optimizers"]})
    pngs = {}
    if plots:
        for model in agg:
            pngs[model] = plot_model(model, records, agg[model], os.path.join(out, f"loss_{model}.png"))
    result = dict(
        meta,
        config={k: v for k, v in cfg.items()},
        n_params=n_params,
        plots=pngs,
        curves="each run's per-step curves: <run dir>/metrics.jsonl (one JSON line per step: step, "
        "train_loss (objective), parts.ce, lr, step_time, tokens_per_s, elapsed; val_loss on "
        "evaluation steps); 'metrics' in each run record",
        measurements=_measure.__doc__.split("What is measured")[1].strip(' (:\n"'),
        runs=records,
        summary=agg_summary(agg),
    )
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(_json_safe(result), f, indent=2)
    os.replace(tmp, os.path.join(out, "results.json"))
    m = meta["machine"]
    head = [
        f"# Experiment results: {cfg['source']}",
        "",
        f"{cfg['description']}" if cfg["description"] else "",
        f"Command: `{meta['command']}`",
        "",
        f"{cfg['steps']} steps x batch {cfg['batch_size']} x block {cfg['block_size']} tokens, warmup "
        f"{cfg['warmup']}, eval every {cfg['eval_interval']} steps on {cfg['eval_iters']} batches; seeds "
        f"{', '.join(map(str, cfg['seeds']))}"
        + (f"; LR sweep x{', x'.join(f'{x:g}' for x in cfg['lr_sweep'])}" if cfg["lr_sweep"] else "")
        + ".",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, {m['threads']} threads, device "
        f"{m['device']}; load average at start {meta.get('load_start')}, at end {meta.get('load_end')}.",
        "",
        "final train loss: training cross-entropy, mean of the last 20 steps; final val loss: the last "
        "evaluation; time/step: median over the steps after the first 5 (evaluation excluded); peak RSS Δ: "
        "the run's peak resident memory above the process's before it (see results.json 'measurements').",
        "",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(head) + "\n" + markdown_tables(agg, cfg, n_params, pngs, names))
        f.write(head_maps.report_section(out, records))
    return result


def agg_summary(agg: dict) -> dict:
    return {
        model: {
            label: dict(
                best_lr_mult=float(cell["best"]),
                **cell["by_lr"][cell["best"]],
                sweep={m: s["final_val_loss"] for m, s in cell["by_lr"].items()},
            )
            for label, cell in opts.items()
        }
        for model, opts in agg.items()
    }
