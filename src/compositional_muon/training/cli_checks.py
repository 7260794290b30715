"""Checks of the command line made before anything is built or written, each failing with one
:class:`~.errors.UsageError` line that names the flag, the value and what is expected."""

from __future__ import annotations

import errno
import inspect
import math
import os
import tempfile

import torch

from ..baselines import CircuitMuon
from ..compositional import CM_DEFAULTS, CompositionalMuon
from ..muon import Muon
from ..per_head import PerHeadMuon
from ..variants import NewtonMuon
from . import run_logs
from .args import CM_NAMES
from .errors import UsageError
from .recipes import _MATRIX_CLASSES

__all__ = ["check_args", "resolve_device", "check_out_folder", "valid_option_keys", "check_options"]

# flag -> (lowest allowed value, whether the lowest value itself is allowed); None values are skipped
_INT_MIN = {
    "steps": 1,
    "batch_size": 1,
    "eval_interval": 1,
    "eval_iters": 1,
    "block_size": 1,
    "n_layer": 1,
    "n_embd": 1,
    "n_head": 1,
    "n_kv_head": 1,
    "warmup": 0,
    "ckpt_interval": 0,
    "stop_after": 0,
    "threads": 0,
    "sample_tokens": 0,
}
_POSITIVE = ("lr", "adamw_lr", "muon_lr")  # finite and > 0
_NON_NEGATIVE = ("weight_decay", "grad_clip", "time_limit", "lam", "qk_clip_tau")  # finite and >= 0
_RECIPE_KEYS = {"lr", "adamw_lr", "weight_decay", "adamw_weight_decay", "adamw_betas"}  # set by the recipe itself
_NOT_OPTIONS = {"self", "cls", "model", "params", "param_groups", "blocks"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args) -> None:
    """Every numeric flag in range (finite, positive where needed), flag combinations consistent."""
    for name, low in _INT_MIN.items():
        v = getattr(args, name, None)
        if v is not None and v < low:
            raise UsageError(f"{_flag(name)} must be >= {low}, got {v}")
    for name in _POSITIVE:
        v = getattr(args, name, None)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UsageError(f"{_flag(name)} must be a finite number > 0, got {v}")
    for name in _NON_NEGATIVE:
        v = getattr(args, name, None)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise UsageError(f"{_flag(name)} must be a finite number >= 0, got {v}")
    if not (0.0 <= args.min_lr_ratio <= 1.0):
        raise UsageError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.overwrite and args.resume is not None:
        raise UsageError("--overwrite starts a new run and --resume continues one: pass only one of them")
    if args.accept_changes is not None and args.resume is None:
        raise UsageError("--accept-changes only applies with --resume")
    try:
        run_logs.check_arguments(args)
    except ValueError as e:
        raise UsageError(str(e)) from None


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU) or a device torch can use here."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a device name (e.g. cpu, cuda, cuda:1, auto)") from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise UsageError("--device meta holds no data; use cpu, cuda or auto")
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise UsageError(f"--device {spec}: no {device.type} device is available on this machine; use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {spec}: this machine has {count} {device.type} device(s) (0..{count - 1})")
    return device


def check_out_folder(out: str) -> None:
    """``out`` is (or can be created as) a folder this process may write into. Creates nothing."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r} is an existing file, not a folder")
    probe = out
    while not os.path.exists(probe):  # the nearest existing ancestor is where the folder gets created
        parent = os.path.dirname(os.path.abspath(probe))
        if parent == os.path.abspath(probe):
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"--out {out!r}: {probe!r} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cm-write-probe.", dir=probe)
    except OSError as e:
        why = {errno.EROFS: "read-only file system", errno.EACCES: "no permission to write"}.get(
            e.errno, e.strerror or str(e)
        )
        raise UsageError(f"--out {out!r} cannot be written: {why} ({probe})") from None
    os.close(fd)
    os.unlink(tmp)


def valid_option_keys(name: str) -> set:
    """The ``--opt`` keys the optimizer ``name`` accepts (its constructor's keyword arguments, less
    those the recipe sets from the dedicated flags)."""
    if name == "adamw":
        return set()
    if name in CM_NAMES:
        fns, keys = [CompositionalMuon.from_model], set(CM_DEFAULTS) | {"muon_lr"}
    elif name == "muon-per-head":  # from_model takes Muon's group keys as **muon_options
        fns, keys = [PerHeadMuon.from_model], (set(Muon.matrix_defaults) - {"lr", "weight_decay"}) | {"muon_lr"}
    elif name == "circuit-muon":
        fns, keys = [CircuitMuon.from_model], set()
    elif name == "newton-muon":
        fns, keys = [NewtonMuon.__init__, NewtonMuon.from_model], set()
    else:
        fns, keys = [_MATRIX_CLASSES[name].__init__], set()
    for fn in fns:
        for p in inspect.signature(fn).parameters.values():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                keys.add(p.name)
    return keys - _NOT_OPTIONS - _RECIPE_KEYS


def check_options(name: str, options: dict) -> None:
    """Unknown ``--opt`` keys are refused, naming the valid ones."""
    valid = valid_option_keys(name)
    unknown = sorted(set(options) - valid)
    if not unknown:
        return
    if not valid:
        raise UsageError(f"--optimizer {name} takes no --opt options, got {', '.join(unknown)}")
    raise UsageError(
        f"--opt {', '.join(unknown)}: not an option of --optimizer {name}; valid keys: {', '.join(sorted(valid))}"
    )
