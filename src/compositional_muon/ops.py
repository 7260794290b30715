"""In-place update primitives shared by every optimizer of the library."""

from __future__ import annotations

import torch

__all__ = ["decoupled_add"]


def decoupled_add(w: torch.Tensor, delta: torch.Tensor, decay: float, alpha: float = 1.0) -> None:
    """Decoupled weight decay then the update, in place: ``w <- (1 - decay) w + alpha * delta``
    (``delta`` cast to ``w``'s dtype; ``w`` may be a view of a parameter)."""
    if decay:
        w.mul_(1 - decay)
    if alpha == 1.0:
        w.add_(delta.to(w.dtype))
    else:
        w.add_(delta.to(w.dtype), alpha=alpha)
