"""What the training CLI writes besides metrics.jsonl, in one place: the progress display, the
memory reading per step, ``--log tensorboard`` and the per-head CM statistics and maps."""

from __future__ import annotations

import os
from typing import Any

from . import head_maps
from .memory import rss_mb
from .progress import Progress
from .tb_logger import TBLogger

__all__ = ["RunLogs", "add_arguments"]


def add_arguments(group: Any) -> None:
    group.add_argument(
        "--log",
        choices=("jsonl", "tensorboard"),
        default="jsonl",
        help="metrics.jsonl always; 'tensorboard' also writes TensorBoard event files to <out>/tb",
    )
    group.add_argument(
        "--head-stats-every",
        type=int,
        default=None,
        metavar="N",
        help="CM runs: record per-head step sizes / composed norms every N steps for head_maps.png "
        "(default: about 50 snapshots per run; 0: off)",
    )


def check_arguments(args: Any) -> None:
    if args.head_stats_every is not None and args.head_stats_every < 0:
        raise ValueError(f"--head-stats-every must be >= 0, got {args.head_stats_every}")
    if args.log == "tensorboard":
        from .tb_logger import tensorboard_available

        if not tensorboard_available():
            raise ValueError("--log tensorboard needs the tensorboard package: pip install 'compositional-muon[train]'")


class RunLogs:
    """``before_step(n)`` just before ``opt.step()`` of step ``n`` (1-based), ``after_step(rec)``
    with the step's metrics record, ``finish(title)`` at the end (returns the PNG path, if any)."""

    def __init__(self, args: Any, opt: Any, *, main: bool, single_process: bool, resumed_step: int = 0) -> None:
        self.out, self.main = args.out, main
        self.progress = Progress(args.steps, args.quiet or not main)
        self.opt = opt
        every = head_maps.default_every(args.steps) if args.head_stats_every is None else args.head_stats_every
        self.heads_path = os.path.join(args.out, "head_stats.jsonl")
        # DDP splits CM layers among ranks and FSDP2 shards them: per-head stats are single-process only
        self.heads = head_maps.HeadStats(opt, self.heads_path, every if (main and single_process) else 0)
        if main:
            if resumed_step:
                head_maps.truncate(self.heads_path, resumed_step)
            elif os.path.exists(self.heads_path):
                os.unlink(self.heads_path)
        self.tb = TBLogger(os.path.join(args.out, "tb")) if (args.log == "tensorboard" and main) else None

    def before_step(self, step: int) -> None:
        self.heads.arm(step)

    def after_step(self, rec: dict[str, Any]) -> None:
        rec["rss_mb"] = rss_mb()
        records = self.heads.record(int(rec["step"]))
        if self.tb is not None:
            lrs = [(f"{i}_{g.get('kind', 'group')}", float(g["lr"])) for i, g in enumerate(self.opt.param_groups)]
            self.tb.log_step(rec, lrs)
            if records:
                self.tb.log_heads(records)

    def finish(self, title: str, plot: bool = True) -> dict[str, str]:
        self.progress.close()
        if self.tb is not None:
            self.tb.close()
        out: dict[str, str] = {}
        if self.tb is not None:
            out["tensorboard"] = os.path.join(self.out, "tb")
        if self.main and self.heads.active and os.path.exists(self.heads_path):
            out["head_stats"] = self.heads_path
            png = (
                head_maps.plot_head_maps(self.heads_path, os.path.join(self.out, "head_maps.png"), title)
                if plot
                else None
            )
            if png:
                out["head_maps"] = png
        return out
