"""Byte-capped buckets for the batched matrix steps.

Muon and its variants stack same-shape matrices into one batched msign. Stacking everything at once
makes the step's transient memory a multiple of the weights (direction, stack, working-precision
copy, iterates, output: about 4.5x the updated weights measured at GPT-2 shapes), which on a large
model is an out-of-memory error. The step therefore runs over *buckets*: consecutive same-shape
matrices grouped while the estimated working memory of the bucket stays under a limit

    limit = min(bucket_bytes, max(MIN_BUCKET_BYTES, SMALL_SCALE_FRACTION * weight bytes of the group))

``bucket_bytes`` (optimizer option, default :data:`DEFAULT_BUCKET_BYTES` = 256 MiB) bounds it at
large scale; the fraction keeps it near 0.4x the weights at small scale, where a few matrices per
batch already keep the GEMMs busy. A matrix whose own estimate exceeds the limit is a bucket of
its own (the step cannot split a matrix). ``bucket_bytes=None`` puts the whole group in one bucket.
The math is per matrix, so bucketed and unbucketed steps compute the same update.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "MIN_BUCKET_BYTES",
    "SMALL_SCALE_FRACTION",
    "check_bucket_bytes",
    "plan",
    "work_bytes",
]

MIB = 2**20
DEFAULT_BUCKET_BYTES = 256 * MIB
MIN_BUCKET_BYTES = 4 * MIB
SMALL_SCALE_FRACTION = 0.4


def check_bucket_bytes(value: object) -> int | None:
    """``bucket_bytes`` as an int, or None (one bucket); a one-line error for anything else."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 1 <= float(value) < math.inf
        or float(value) != int(float(value))
    ):
        raise ValueError(f"bucket_bytes must be a positive integer number of bytes or None, got {value!r}")
    return int(float(value))


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def work_bytes(p: torch.Tensor, work_dtype: torch.dtype | None) -> int:
    """Estimated peak working memory of one ``m x n`` matrix (2-D view) in a batched msign step:
    the direction, its slot in the stack and the output in the parameter's dtype, the working copy
    and two iterates in ``work_dtype``, and the two ``s x s`` small-side products."""
    m = p.shape[0] if p.ndim else 1
    n = p.numel() // max(1, m)
    s = min(m, n)
    it, wt = p.element_size(), _elem(work_dtype or p.dtype)
    return m * n * (3 * it + 3 * wt) + 2 * s * s * wt


def plan(params: list, bucket_bytes: int | None, work_dtype: torch.dtype | None = None) -> list[list]:
    """Split ``params`` into buckets (lists of params): same shapes and dtypes kept adjacent (so
    they still share batched calls), each bucket's summed :func:`work_bytes` under the limit."""
    if bucket_bytes is None or len(params) <= 1:
        return [list(params)] if params else []
    total = sum(p.numel() * p.element_size() for p in params)
    limit = min(bucket_bytes, max(MIN_BUCKET_BYTES, int(SMALL_SCALE_FRACTION * total)))
    order = sorted(range(len(params)), key=lambda i: (tuple(params[i].shape), str(params[i].dtype), i))
    out: list[list] = []
    used = 0
    for i in order:
        cost = work_bytes(params[i], work_dtype)
        if out and used + cost <= limit:
            out[-1].append(params[i])
            used += cost
        else:
            out.append([params[i]])
            used = cost
    return out
