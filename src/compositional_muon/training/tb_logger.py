"""``--log tensorboard``: the training CLI's metrics as TensorBoard scalars (next to metrics.jsonl,
which is always written). Needs the ``tensorboard`` package (the ``train`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TBLogger", "tensorboard_available"]


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TBLogger:
    """Scalars under ``loss/``, ``lr/<group>``, ``time/``, ``memory/`` and, for CM runs, per-head
    ``heads/<pair>/{step,composed}_{max,mean}`` plus a histogram of the per-head values."""

    def __init__(self, logdir: str) -> None:
        if not tensorboard_available():
            raise RuntimeError(
                "--log tensorboard needs the tensorboard package: pip install 'compositional-muon[train]'"
            )
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=logdir)

    def log_step(self, rec: dict[str, Any], group_lrs: Sequence[tuple[str, float]]) -> None:
        step = int(rec["step"])
        w = self.writer
        w.add_scalar("loss/train", rec["train_loss"], step)
        if "val_loss" in rec:
            w.add_scalar("loss/val", rec["val_loss"], step)
        for name, lr in group_lrs:
            w.add_scalar(f"lr/{name}", lr, step)
        w.add_scalar("time/step_s", rec["step_time"], step)
        w.add_scalar("time/tokens_per_s", rec["tokens_per_s"], step)
        if rec.get("rss_mb") is not None:
            w.add_scalar("memory/rss_mb", rec["rss_mb"], step)

    def log_heads(self, records: Sequence[Any]) -> None:
        """``records``: :class:`~compositional_muon.training.head_maps.HeadRecord` of one step."""
        import torch

        for r in records:
            for q, values in (("step", r.step_size), ("composed", r.composed)):
                t = torch.tensor(values)
                self.writer.add_scalar(f"heads/{r.pair}/{q}_max", float(t.max()), r.step)
                self.writer.add_scalar(f"heads/{r.pair}/{q}_mean", float(t.mean()), r.step)
                self.writer.add_histogram(f"heads/{r.pair}/{q}", t, r.step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
