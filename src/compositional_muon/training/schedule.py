"""The learning-rate schedule: linear warmup, then constant, cosine or linear decay to
``min_ratio`` of every group's peak lr."""

from __future__ import annotations

import math

import torch

__all__ = ["lr_factor", "build_scheduler", "snapshot_hyperparameters", "apply_hyperparameters"]


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of every group's peak lr at ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, args) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :func:`lr_factor` for ``args.steps``, ``args.warmup``, ``args.schedule``,
    ``args.min_lr_ratio``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.steps, args.warmup, args.schedule, args.min_lr_ratio)
    )


def snapshot_hyperparameters(opt: torch.optim.Optimizer) -> list:
    """Every param group's settings (not its parameters), as built from this run's flags."""
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def apply_hyperparameters(opt: torch.optim.Optimizer, sched, fresh: list) -> None:
    """After loading a checkpoint (which restores the saved groups' settings), put this run's
    settings ``fresh`` (from :func:`snapshot_hyperparameters`) back: group options, the peak lr
    (the scheduler's base) and the current lr of the new schedule at the loaded step."""
    if len(fresh) != len(opt.param_groups):
        raise ValueError(f"{len(fresh)} param groups built, {len(opt.param_groups)} loaded")
    for i, (g, new) in enumerate(zip(opt.param_groups, fresh)):
        for k, v in new.items():
            if k not in ("lr", "initial_lr"):
                g[k] = v
        base = new.get("initial_lr", new["lr"])
        g["initial_lr"] = base
        sched.base_lrs[i] = base
        g["lr"] = base * sched.lr_lambdas[i](sched.last_epoch)
