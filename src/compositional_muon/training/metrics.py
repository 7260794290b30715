"""``<out>/metrics.jsonl``: one JSON line per step (``step``, ``train_loss``, ``lr``, ...), plus
event lines (``{"step": s, "event": ...}``, e.g. settings changed on resume) that
:func:`read_metrics` leaves out and :func:`read_events` returns. Summaries and the loss plot."""

from __future__ import annotations

import json
import os
import sys

__all__ = ["read_metrics", "read_events", "truncate_metrics", "summarize", "plot_losses", "FINAL_TRAIN_WINDOW"]

FINAL_TRAIN_WINDOW = 20  # "final train loss" is the mean over the last this many steps


def _lines(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics(path: str) -> list:
    """The per-step records of a metrics file (event lines left out)."""
    return [r for r in _lines(path) if "event" not in r]


def read_events(path: str) -> list:
    """The event lines of a metrics file (``[]`` when there is no file)."""
    return [r for r in _lines(path) if "event" in r] if os.path.exists(path) else []


def truncate_metrics(path: str, step: int) -> None:
    """Drop lines beyond the checkpoint's step (written after it, before an interruption)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def summarize(path: str) -> dict:
    """Final numbers of a metrics file: mean train loss of the last :data:`FINAL_TRAIN_WINDOW`
    steps, the last validation loss, median step time (first 5 steps left out), total time."""
    recs = read_metrics(path) if os.path.exists(path) else []
    if not recs:
        return {}
    tail = [r["train_loss"] for r in recs[-FINAL_TRAIN_WINDOW:]]
    vals = [r for r in recs if "val_loss" in r]
    times = sorted(r["step_time"] for r in recs[5:]) or sorted(r["step_time"] for r in recs)
    return dict(
        final_train_loss=sum(tail) / len(tail),
        final_train_loss_steps=len(tail),
        final_val_loss=vals[-1]["val_loss"] if vals else float("nan"),
        median_step_time=times[len(times) // 2],
        total_time=recs[-1]["elapsed"],
    )


def _ema(values: list, beta: float = 0.9) -> list:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out


def plot_losses(metrics_path: str, png_path: str, title: str = "") -> str | None:
    """Train (smoothed) and validation loss against step, as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the loss plot (pip install matplotlib)", file=sys.stderr)
        return None
    recs = read_metrics(metrics_path)
    steps = [r["step"] for r in recs]
    train = [r["train_loss"] for r in recs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, train, color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(steps, _ema(train), color="tab:blue", label="train (EMA 0.9)")
    vals = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if vals:
        ax.plot(*zip(*vals), "o-", color="tab:orange", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
