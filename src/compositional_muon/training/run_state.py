"""A run's folder and checkpoint: refusing to overwrite a run by accident, saving (atomically,
with a one-line error when the disk is full) and resuming (checking the checkpoint fits)."""

from __future__ import annotations

import errno
import os
import shutil
import sys

import torch

from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .errors import RunFailed, UsageError
from .run_config import check_changes, format_changes, setting_changes, structural_problems
from .schedule import apply_hyperparameters, snapshot_hyperparameters

__all__ = ["RUN_FILES", "existing_run_files", "plan_start", "clear_run", "RunState"]

RUN_FILES = [
    "last.pt",
    "last_dcp",
    "metrics.jsonl",
    "summary.json",
    "loss.png",
    "head_stats.jsonl",
    "head_maps.png",
    "tb",
]  # what a run writes into --out
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def existing_run_files(out: str) -> list:
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]


def plan_start(args, ckpt_name: str) -> str | None:
    """The checkpoint to resume from, or None for a new run; refuses (one line) to start a new run
    over an existing one unless ``--overwrite``, and ``--resume auto`` over the other layout's run."""
    out, files = args.out, existing_run_files(args.out)
    if args.resume is None:
        if files and not args.overwrite:
            raise UsageError(
                f"--out {out} already holds a run ({', '.join(files)}): continue it with --resume auto, "
                "or start a new one there with --overwrite (deletes it)"
            )
        return None
    if args.resume != "auto":
        return args.resume
    ckpt = os.path.join(out, ckpt_name)
    if os.path.exists(ckpt):
        return ckpt
    other = "last_dcp" if ckpt_name == "last.pt" else "last.pt"
    if os.path.exists(os.path.join(out, other)):
        how = "under torchrun with the same --dist" if other == "last_dcp" else "as a single process (without --dist)"
        raise UsageError(f"--resume auto: {out} holds {other}, written by another process layout; resume it {how}")
    if files:
        print(
            f"--resume auto: no checkpoint in {out}; starting a new run (replacing {', '.join(files)})", file=sys.stderr
        )
    return None


def clear_run(out: str) -> None:
    """Delete a previous run's files from ``out`` (``--overwrite``, or a run without a checkpoint)."""
    for f in existing_run_files(out):
        path = os.path.join(out, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def _write_failed(e: OSError, path: str) -> RunFailed:
    folder = os.path.dirname(os.path.abspath(path))
    if e.errno in _DISK_FULL:
        why = f"the disk holding {folder} is full"
    else:
        why = e.strerror or str(e)
    return RunFailed(f"could not write the checkpoint {path}: {why}; the previous checkpoint there is intact")


class RunState:
    """Everything a checkpoint holds and a resume restores, for one process or all ranks."""

    def __init__(self, runner, model, opt, sched, data, config: dict, out: str, clipper=None):
        self.runner, self.model, self.opt, self.sched, self.data = runner, model, opt, sched, data
        self.clipper = clipper  # the QK-clip run after every opt.step() (None: off)
        self.config, self.history = config, []  # history: settings changes accepted on resumes
        self.path = os.path.join(out, runner.checkpoint_name)
        self.fresh = snapshot_hyperparameters(opt)  # this invocation's settings, before any load

    def _extra(self, step: int, elapsed: float) -> dict:
        return dict(
            scheduler=self.sched.state_dict(),
            data=self.data.state_dict(),
            rng=_rng_state(),
            step=step,
            elapsed=elapsed,
            config=self.config,
            config_changes=self.history,
        )

    def save(self, step: int, elapsed: float) -> None:
        """Write the checkpoint; on a full disk (or any write error) a one-line :class:`RunFailed`."""
        state = self._extra(step, elapsed)
        try:
            if self.runner.mode == "none":
                save_atomic(dict(model=self.model.state_dict(), optimizer=self.opt.state_dict(), **state), self.path)
            else:
                self._save_dcp(state, step)
        except OSError as e:
            raise _write_failed(e, self.path) from e

    def _save_dcp(self, state: dict, step: int) -> None:
        """DCP folder written beside the old one, then swapped in by rank 0."""
        D, tmp, old = self.runner.D, self.path + ".tmp", self.path + ".old"
        if self.runner.main and os.path.exists(tmp):
            shutil.rmtree(tmp)
        D.barrier()
        D.save_checkpoint(tmp, self.model, self.opt, extra=dict(step=step))  # every rank
        if self.runner.main:  # ranks share these (same seeds): rank 0 writes them
            r = self.runner
            state["layout"] = dict(mode=r.mode, world_size=r.world, tp=r.tp, hsdp=r.hsdp)
            save_atomic(state, os.path.join(tmp, "train_state.pt"))
            if os.path.exists(self.path):
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        D.barrier()

    def load(self, resume: str, accept: str | None) -> tuple:
        """Restore everything from ``resume``; returns ``(step, elapsed, changes)`` where
        ``changes`` are the accepted settings changes ``{key: [old, new]}``."""
        ck = self._read(resume)
        saved = ck.get("config", {})
        problems = structural_problems(saved, self.config)
        if problems:
            raise CheckpointError(
                f"checkpoint {resume!r} does not fit this run (optimizer/model mismatch): " + "; ".join(problems)
            )
        changes = setting_changes(saved, self.config)
        check_changes(changes, accept, set(saved.get("settings", {})) | set(self.config["settings"]), resume)
        self._load_weights(resume, ck)
        self.sched.load_state_dict(ck["scheduler"])
        if changes:
            apply_hyperparameters(self.opt, self.sched, self.fresh)
        self.data.load_state_dict(ck["data"])
        torch.set_rng_state(ck["rng"]["torch"])
        self.history = list(ck.get("config_changes", []))
        if changes:
            self.history.append(dict(step=ck["step"], changes=changes))
            print(f"resuming with changed settings: {format_changes(changes)}", file=sys.stderr)
        return ck["step"], ck.get("elapsed", 0.0), changes

    def _read(self, resume: str) -> dict:
        if self.runner.mode == "none":
            if os.path.isdir(resume) and os.path.isfile(os.path.join(resume, "train_state.pt")):
                raise CheckpointError(f"{resume!r} is a distributed (--dist) checkpoint; resume it under torchrun")
            return load_checkpoint(resume)
        ts_path = os.path.join(resume, "train_state.pt")
        if not os.path.isfile(ts_path):
            raise CheckpointError(f"{resume!r} is not a distributed training checkpoint (no train_state.pt)")
        ck = torch.load(ts_path, map_location="cpu", weights_only=False)
        saved = ck.get("layout", dict(mode=self.runner.mode))
        if saved["mode"] != self.runner.mode:  # DCP reshards across world sizes and meshes, not DDP <-> FSDP2
            raise CheckpointError(
                f"{resume!r} was written by --dist {saved['mode']}; this run is --dist {self.runner.mode}: resume "
                f"with --dist {saved['mode']} (any number of processes, --tp, --hsdp)"
            )
        return ck

    def _load_weights(self, resume: str, ck: dict) -> None:
        if self.runner.mode != "none":
            self.runner.D.load_checkpoint(resume, self.model, self.opt)
            return
        try:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {resume!r} does not fit this model/optimizer: {e}") from e
