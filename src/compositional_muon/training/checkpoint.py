"""Atomic checkpoint files: written to a temporary file in the target's folder, then renamed."""

from __future__ import annotations

import os
import tempfile

import torch

__all__ = ["save_atomic", "load_checkpoint", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the run resuming from it."""


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to ``path`` so that a reader never sees a partial file: the bytes go to a
    temporary file beside it, are flushed to disk, and the file is renamed over ``path``."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by :func:`save_atomic`, with clear errors for a bad path or file."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(
            f"checkpoint {path!r} is a folder; pass the .pt file (e.g. {os.path.join(path, 'last.pt')})"
        )
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a torch file, ...
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ck, dict) or "model" not in ck or "optimizer" not in ck:
        raise CheckpointError(
            f"checkpoint {path!r} is not a training checkpoint of this library (no model/optimizer state)"
        )
    return ck
