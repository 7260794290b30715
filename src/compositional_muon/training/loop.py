"""The training loop. A step is atomic with respect to stopping: batch draw, forward, backward,
optimizer and scheduler step, logging, evaluation and the periodic checkpoint all happen, or
(when a stop was requested before it began) none of them does."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass

import torch

from .evaluation import evaluate_fixed
from .qk_clip_step import clip_step

__all__ = ["evaluate", "train_step", "train_loop", "LoopEnd"]


@dataclass
class LoopEnd:
    """Where and why the loop ended: ``reason`` is "done", "signal", "stop_after" or "time_limit"."""

    step: int
    elapsed: float
    reason: str = "done"
    signal: str = ""


def evaluate(model, data, args, device, runner=None):
    """The fixed validation set (training/evaluation.py): ``eval_iters * batch_size`` windows, the
    same at every evaluation; every rank scores all of them (the result is the same on each)."""
    return evaluate_fixed(
        model,
        data.split("val"),
        block_size=args.block_size,
        n_windows=args.eval_iters * args.batch_size,
        batch_size=args.batch_size,
        device=device,
    )


def train_step(st, args, before_update=None) -> dict:
    """One optimizer step on the next training batch; returns its log record (without timings).
    ``before_update()`` runs just before ``opt.step()`` (the per-head statistics arm there)."""
    model, opt, runner = st.model, st.opt, st.runner
    x, y = st.data.get_batch("train", args.batch_size, args.block_size, runner.device)
    _, loss = model(runner.shard(x), runner.shard(y))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    lr_now = opt.param_groups[0]["lr"]
    if before_update is not None:
        before_update()
    opt.step()
    clip_max = clip_step(st.clipper, runner)  # QK-clip: part of the atomic step, before any save
    st.sched.step()
    rec = dict(train_loss=runner.mean(loss.item()), lr=float(lr_now))
    if clip_max is not None:
        rec["qk_max_logit"] = clip_max
    if getattr(model, "last_losses", None):
        rec["parts"] = {k: float(v) for k, v in model.last_losses.items()}
    return rec


def _stop_reason(args, stop, runner, step: int, first: int, start: float) -> str:
    if runner.any(stop.requested):
        return "signal"
    if args.stop_after and step - first >= args.stop_after:
        return "stop_after"
    if args.time_limit and time.time() - start > args.time_limit:
        return "time_limit"
    return ""


def _report(rec: dict, runner, progress) -> None:
    extra = f"val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
    progress.update(rec["step"], rec["train_loss"], rec["tokens_per_s"], extra)
    if "val_loss" in rec and runner.main and (progress.quiet or not progress.tty):
        print(f"step {rec['step']}: train {rec['train_loss']:.4f} val {rec['val_loss']:.4f}", file=sys.stderr)
    elif "val_loss" in rec:
        progress.newline()


def train_loop(st, args, step: int, elapsed: float, stop, metrics, logs) -> LoopEnd:
    """Steps from ``step`` to ``args.steps``; ``metrics`` is the open metrics.jsonl (or devnull),
    ``logs`` the :class:`~.run_logs.RunLogs` (progress, memory, TensorBoard, per-head stats)."""
    start, first = time.time() - elapsed, step
    tokens_per_step = args.batch_size * args.block_size
    while step < args.steps:
        reason = _stop_reason(args, stop, st.runner, step, first, start)
        if reason:
            return LoopEnd(step, time.time() - start, reason, stop.name)
        t0 = time.time()
        rec = train_step(st, args, lambda n=step + 1: logs.before_step(n))
        step += 1
        dt = time.time() - t0
        rec = dict(step=step, **rec, step_time=dt, tokens_per_s=tokens_per_step / max(dt, 1e-9))
        rec["elapsed"] = time.time() - start
        if step % args.eval_interval == 0 or step == args.steps:
            rec.update(evaluate(st.model, st.data, args, st.runner.device).record(with_losses=step == args.steps))
        logs.after_step(rec)
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
        _report(rec, st.runner, logs.progress)
        if not math.isfinite(rec["train_loss"]):
            raise FloatingPointError(f"the training loss is {rec['train_loss']} at step {step}")
        if args.ckpt_interval and step % args.ckpt_interval == 0:
            st.save(step, rec["elapsed"])
    return LoopEnd(step, time.time() - start)
