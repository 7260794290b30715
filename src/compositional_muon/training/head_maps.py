"""Per-head CM diagnostics over training: collected every N steps into ``head_stats.jsonl`` and
drawn as layer x head heatmaps in ``head_maps.png``.

Recorded per attention pair (``<layer>.qk`` / ``<layer>.ov``) and query head: the effective step
size ``||dA_h||_op`` of the pair's first factor (``q_step``: ``dW_Q`` rows of head h; ``o_step``:
``dW_O`` columns of head h) and the composed update ``||d(A_h^T B_g)||_op`` (first order), which CM
bounds by the lr (see ``compositional_muon.diagnostics``). Recording turns on the optimizer's
``track_stats`` for that step only (a few small SVDs per layer)."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["HeadRecord", "HeadStats", "load_records", "plot_head_maps", "default_every"]

QUANTITIES = ("step", "composed")


@dataclass(frozen=True)
class HeadRecord:
    step: int
    pair: str  # e.g. "blocks.0.attn.qk"
    step_size: list[float]  # per query head
    composed: list[float]  # per query head


def default_every(total_steps: int) -> int:
    """About 50 snapshots per run."""
    return max(1, total_steps // 50)


class HeadStats:
    """Arm the optimizer before a step (:meth:`arm`), then :meth:`record` its ``last_stats``
    (appended to ``path``). Does nothing for an optimizer without ``track_stats`` or ``every=0``."""

    def __init__(self, opt: Any, path: str, every: int) -> None:
        self.opt, self.path = opt, path
        self.every = every if hasattr(opt, "track_stats") else 0
        self.armed = False

    @property
    def active(self) -> bool:
        return self.every > 0

    def arm(self, step: int) -> None:
        """``step``: the 1-based number of the step about to run."""
        self.armed = self.active and step % self.every == 0
        if self.active:
            self.opt.track_stats = self.armed

    def record(self, step: int) -> list[HeadRecord]:
        if not self.armed:
            return []
        out = []
        for pair, s in sorted(getattr(self.opt, "last_stats", {}).items()):
            first = s.get("q_step", s.get("o_step"))
            if first is None or "composed" not in s:
                continue
            out.append(HeadRecord(step, pair, [float(v) for v in first], [float(v) for v in s["composed"]]))
        with open(self.path, "a") as f:
            for r in out:
                f.write(json.dumps(asdict(r)) + "\n")
        self.armed = False
        return out


def load_records(path: str, upto: int | None = None) -> list[HeadRecord]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        recs = [HeadRecord(**json.loads(line)) for line in f if line.strip()]
    return [r for r in recs if upto is None or r.step <= upto]


def truncate(path: str, step: int) -> None:
    """Keep the records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if os.path.exists(path):
        keep = load_records(path, upto=step)
        with open(path, "w") as f:
            for r in keep:
                f.write(json.dumps(asdict(r)) + "\n")


def _layer_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def tensors(records: list[HeadRecord], kind: str) -> tuple[list[int], list[str], dict[str, torch.Tensor]]:
    """``steps``, ``layers`` and ``{"step": (T, L, H), "composed": (T, L, H)}`` for pairs of ``kind``."""
    recs = [r for r in records if r.pair.endswith("." + kind)]
    steps = sorted({r.step for r in recs})
    layers = sorted({r.pair[: -len(kind) - 1] for r in recs}, key=_layer_key)
    if not recs:
        return steps, layers, {}
    heads = max(len(r.step_size) for r in recs)
    out = {q: torch.full((len(steps), len(layers), heads), float("nan")) for q in QUANTITIES}
    si, li = {s: i for i, s in enumerate(steps)}, {n: i for i, n in enumerate(layers)}
    for r in recs:
        i, j = si[r.step], li[r.pair[: -len(kind) - 1]]
        out["step"][i, j, : len(r.step_size)] = torch.tensor(r.step_size)
        out["composed"][i, j, : len(r.composed)] = torch.tensor(r.composed)
    return steps, layers, out


def plot_head_maps(path: str, png: str, title: str = "") -> str | None:
    """Rows: QK step size, QK composed norm, OV step size, OV composed norm; columns: the first
    snapshot, the mean over training, the last. None without matplotlib or records."""
    records = load_records(path)
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the per-head maps (pip install matplotlib)", file=sys.stderr)
        return None
    rows = []
    for kind in ("qk", "ov"):
        steps, layers, t = tensors(records, kind)
        for q in QUANTITIES:
            if t:
                rows.append((kind, q, steps, layers, t[q]))
    fig, axes = plt.subplots(len(rows), 3, figsize=(10, 2.2 * len(rows) + 0.6), squeeze=False, layout="constrained")
    for (kind, q, steps, layers, x), ax_row in zip(rows, axes):
        panels = ((f"step {steps[0]}", x[0]), (f"mean of {len(steps)}", x.nanmean(0)), (f"step {steps[-1]}", x[-1]))
        vmax = float(torch.nan_to_num(x, nan=0.0).max()) or 1.0
        for ax, (label, m) in zip(ax_row, panels):
            im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_title(f"{kind.upper()} {'step size' if q == 'step' else 'composed norm'}: {label}", fontsize=8)
            ax.set_xlabel("head", fontsize=7)
            ax.set_ylabel("layer", fontsize=7)
            ax.set_yticks(range(len(layers)))
            ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=list(ax_row), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def report_section(out: str, runs: list[dict[str, Any]]) -> str:
    """Markdown linking every run's ``head_maps.png`` (CM runs), paths relative to ``out``."""
    lines = []
    for r in runs:
        png = os.path.join(str(r.get("dir", "")), "head_maps.png")
        if r.get("dir") and os.path.exists(png):
            rel = os.path.relpath(png, out)
            label = f"{r.get('model', '?')} / {r.get('optimizer', '?')} seed {r.get('seed', '?')}"
            lines.append(f"* [{label}]({rel})")
    if not lines:
        return ""
    return (
        "\n## Per-head maps (CM runs)\n\nLayer x head heatmaps of each head's step size and composed-update "
        "norm (first snapshot, mean over training, last): \n\n" + "\n".join(lines) + "\n"
    )
