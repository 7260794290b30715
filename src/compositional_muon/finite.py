"""Finiteness checks shared by every optimizer (one host sync per check)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NonFiniteError", "finite_flags", "all_finite"]


class NonFiniteError(FloatingPointError):
    """A gradient or the computed update holds NaN/inf; nothing was written."""


def finite_flags(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A bool vector: is each tensor free of NaN/inf. One reduction pass per tensor (the sum, in
    float32 at least, is non-finite whenever an element is); only where a sum is non-finite is the
    exact elementwise check run, so a finite tensor whose sum overflows is not misreported."""
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    sums = torch.stack([t.sum(dtype=torch.promote_types(t.dtype, torch.float32)).float() for t in tensors])
    flags = torch.isfinite(sums)
    if not bool(flags.all()):
        flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    return flags


def all_finite(*tensors: torch.Tensor) -> bool:
    """One host sync for the finiteness of several tensors."""
    return bool(finite_flags(list(tensors)).all())
