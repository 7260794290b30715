"""In-place update primitives shared by every optimizer of the library."""

from __future__ import annotations

import torch

__all__ = ["decoupled_add"]


def decoupled_add(w: torch.Tensor, delta: torch.Tensor, decay: float, alpha: float = 1.0) -> None:
    """Decoupled weight decay then the update, in place: ``w <- (1 - decay) w + alpha * delta``
    (``delta`` cast to ``w``'s dtype; ``w`` may be a view of a parameter). A lower-precision
    plain ``delta`` (e.g. a bf16 msign result for fp32 weights) is read as it is: the in-place
    add upcasts it exactly, so the result equals the cast-first one without the cast's copy."""
    if decay:
        w.mul_(1 - decay)
    exact = type(delta) is torch.Tensor and torch.promote_types(w.dtype, delta.dtype) == w.dtype
    d = delta if exact else delta.to(w.dtype)
    if alpha == 1.0:
        w.add_(d)
    else:
        w.add_(d, alpha=alpha)
