"""Train a small language model with any optimizer of the library.

    python -m compositional_muon.train                      # the demo: GPT + CM on the embedded corpus
    python -m compositional_muon.train --model loopformer --optimizer normuon --steps 500
    python -m compositional_muon.train --out runs/x --resume auto     # continue runs/x/last.pt

Writes ``<out>/metrics.jsonl`` (one JSON object per step, plus evaluation lines), checkpoints
``<out>/last.pt`` atomically every ``--ckpt-interval`` steps, at the end, and on Ctrl-C/SIGTERM
(which stop the run between two steps), and at the end a generated sample and ``<out>/loss.png``.
``--resume`` continues a run exactly: on CPU the resumed run reproduces the uninterrupted one bit
for bit (model, optimizer, scheduler, data sampler and RNG states are all in the checkpoint).
A new run never replaces an existing one without ``--overwrite``, and a resume with changed
settings is refused unless ``--accept-changes`` names them. Bad input: one line, exit status 2;
a run that cannot go on (disk full, diverged): one line, exit status 1.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys

import torch

from . import run_logs
from .args import CM_SWITCHES, build_parser, model_config, optimizer_config, parse_args
from .checkpoint import CheckpointError
from .cli_checks import check_args, check_options, check_out_folder, resolve_device
from .data import load_dataset
from .errors import FAILED_STATUS, USAGE_STATUS, RunFailed, UsageError
from .interrupts import StopRequest
from .loop import LoopEnd, evaluate, train_loop
from .metrics import plot_losses, read_events, read_metrics, summarize, truncate_metrics
from .models import build_model
from .qk_clip_step import qk_clipper
from .recipes import build_optimizer
from .run_config import run_config
from .run_dist import Runner
from .run_state import RunState, clear_run, plan_start
from .schedule import build_scheduler, lr_factor

__all__ = ["main", "cli", "run", "parse_args", "build_parser", "model_config", "optimizer_config", "read_metrics"]
__all__ += ["lr_factor", "plot_losses", "evaluate", "CM_SWITCHES"]


def run(args) -> dict:
    """Train as described by ``args`` (see :func:`build_parser`); returns a summary dict.
    Raises :class:`UsageError` / ``CheckpointError`` for bad input before anything is written."""
    check_args(args)
    mcfg, ocfg = model_config(args), optimizer_config(args)
    check_options(ocfg["name"], ocfg["options"])
    device = resolve_device(args.device)
    check_out_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    with StopRequest() as stop:  # from here on a signal only requests a stop
        runner = Runner(args.dist, device, args.batch_size, tp=args.tp, hsdp=args.hsdp)
        try:
            return _run(args, runner, stop, mcfg, ocfg)
        finally:
            runner.cleanup()


def _load_data(args):
    try:
        data = load_dataset(args.data, seed=args.seed, block_size=args.block_size)
        data.check_block_size(args.block_size)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as e:
        raise UsageError(f"--data {args.data}: {e}" if args.data else str(e)) from None
    return data


def _build(args, runner, mcfg: dict, ocfg: dict):
    """Model (same initial weights on every rank) and optimizer; bad settings are UsageErrors."""
    torch.manual_seed(args.seed)
    try:
        model = runner.wrap(build_model(args.model, **mcfg).to(runner.device))
        opt = build_optimizer(
            ocfg["name"],
            runner.core(model),
            lr=ocfg["lr"],
            adamw_lr=ocfg["adamw_lr"],
            weight_decay=ocfg["weight_decay"],
            options=ocfg["options"],
        )
    except (ValueError, TypeError) as e:
        if isinstance(e, TypeError) and not (args.opt or args.model_arg):
            raise  # no user-given KEY=VALUE could explain it: a bug
        raise UsageError(str(e)) from None
    return model, opt


def _prepare_folder(args, runner, resume, step: int, changes: dict) -> str:
    """Create ``--out``; a new run clears an old one's files (only reached with --overwrite or a run
    that never checkpointed), a resumed one drops metric lines past its checkpoint."""
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if runner.main:
        os.makedirs(args.out, exist_ok=True)
        if resume is None:
            clear_run(args.out)
        else:
            truncate_metrics(metrics_path, step)
        if changes:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(dict(step=step, event="config_change", changes=changes)) + "\n")
    if runner.mode != "none":
        runner.D.barrier()
    return metrics_path


def _print_header(args, runner, model, opt, data) -> None:
    n = runner.n_params(model)  # a collective under FSDP2 (full_tensor): every rank
    if not runner.main:
        return
    print(
        f"model {args.model} ({n / 1e6:.2f}M params) | optimizer {args.optimizer} | data {data.name} | "
        f"{args.steps} steps x {args.batch_size} x {args.block_size} tokens | device {runner.device}"
        + (f" | {runner.mode} x {runner.world}" if runner.world > 1 else ""),
        file=sys.stderr,
    )
    if hasattr(opt, "summary") and not args.quiet:
        kinds: dict = {}
        for g in opt.param_groups:
            kinds[g.get("kind", "muon" if g.get("use_muon") else "adamw")] = len(g["params"])
        print("param groups: " + ", ".join(f"{k}: {v} tensors" for k, v in kinds.items()), file=sys.stderr)


def _run(args, runner: Runner, stop: StopRequest, mcfg: dict, ocfg: dict) -> dict:
    resume = plan_start(args, runner.checkpoint_name)
    data = _load_data(args)
    mcfg["vocab_size"] = data.vocab_size
    model, opt = _build(args, runner, mcfg, ocfg)
    sched = build_scheduler(opt, args)
    clipper = qk_clipper(args, runner, model)
    st = RunState(runner, model, opt, sched, data, run_config(args, mcfg, ocfg, data.name), args.out, clipper)
    step, elapsed, changes = st.load(resume, args.accept_changes) if resume else (0, 0.0, {})
    if resume:
        print(f"resumed from {resume} at step {step}", file=sys.stderr)
    metrics_path = _prepare_folder(args, runner, resume, step, changes)  # the first write
    _print_header(args, runner, model, opt, data)
    logs = run_logs.RunLogs(args, opt, main=runner.main, single_process=runner.mode == "none", resumed_step=step)
    model.train()
    with open(metrics_path if runner.main else os.devnull, "a") as mf:
        end = train_loop(st, args, step, elapsed, stop, mf, logs)
    logs.progress.newline()
    if end.reason == "time_limit":
        print(f"time limit of {args.time_limit:g}s reached at step {end.step}", file=sys.stderr)
    st.save(end.step, end.elapsed)
    return _finish(args, st, end, metrics_path, logs)


def _sample(args, st) -> str:
    data, device = st.data, st.runner.device
    source = data.split("val") if data.split("val").numel() >= 16 else data.split("train")
    prompt = torch.tensor([source[:16].tolist()], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = st.runner.core(st.model).generate(prompt, args.sample_tokens, temperature=0.8, top_k=40, generator=gen)
    return data.decode(out[0].tolist())


def _finish(args, st: RunState, end: LoopEnd, metrics_path: str, logs) -> dict:
    runner = st.runner
    summary = dict(out=args.out, steps=end.step, interrupted=end.reason == "signal", checkpoint=st.path)
    summary.update(metrics=metrics_path, **summarize(metrics_path))
    summary["config_changes"] = [dict(step=e["step"], changes=e["changes"]) for e in read_events(metrics_path)]
    summary.update(logs.finish(f"{args.model} / {args.optimizer}", plot=not args.no_plot))
    if end.reason in ("signal", "stop_after"):
        if end.reason == "signal" and runner.main:
            print(
                f"stopped by {end.signal} at step {end.step}; saved {st.path} (continue with --resume auto)",
                file=sys.stderr,
            )
        summary.update(paused=end.reason == "stop_after", signal=end.signal)
        return summary
    if args.sample_tokens:  # every rank generates (FSDP2 needs all of them in each forward)
        summary["sample"] = _sample(args, st)
        if runner.main:
            print("\n--- sample ---\n" + summary["sample"] + "\n--------------", file=sys.stderr)
    if not runner.main:
        return summary
    if not args.no_plot:
        title = f"{args.model} / {args.optimizer}"
        summary["plot"] = plot_losses(metrics_path, os.path.join(args.out, "loss.png"), title=title)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(
        f"final train loss (mean of the last {summary.get('final_train_loss_steps', 0)} steps) "
        f"{summary.get('final_train_loss', float('nan')):.4f}, val loss "
        f"{summary.get('final_val_loss', float('nan')):.4f} (nats/token); outputs in {args.out}",
        file=sys.stderr,
    )
    return summary


_ENVIRONMENT = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _one_line(e: BaseException) -> str:
    return re.sub(r"\s*\n\s*(- )?", "; ", str(e).strip())


def main(argv=None) -> int:
    """The CLI: 0 done, 2 bad input (nothing written), 1 the run could not go on (its last
    checkpoint kept), 128 + signal number when stopped by SIGINT/SIGTERM (checkpoint saved)."""
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (UsageError, CheckpointError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return USAGE_STATUS
    except (RunFailed, FloatingPointError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return FAILED_STATUS
    except OSError as e:
        if e.errno not in _ENVIRONMENT:
            raise
        print(f"error: {e.strerror}: {e.filename}", file=sys.stderr)
        return FAILED_STATUS
    except KeyboardInterrupt:
        print("\ninterrupted again: quit without saving (the last checkpoint on disk is kept)", file=sys.stderr)
        return 130
    if summary.get("interrupted"):
        import signal

        return 128 + int(getattr(signal, summary.get("signal") or "SIGINT"))
    return 0


def cli() -> None:
    """``python -m compositional_muon.train``: :func:`main`, then leave the process (see
    :func:`~compositional_muon.training.dist.leave_process`)."""
    code = main()
    from .dist import leave_process

    sys.exit(leave_process(code))


if __name__ == "__main__":
    cli()
