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

CompositionalMuon's CM groups use the same rule and default (a group option ``bucket_bytes``, the
optimizer's by default) over factor pairs, with :func:`pair_work_bytes` as the estimate; its
buckets are streamed (:mod:`compositional_muon.cm_stream`).
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
    "group_limit",
    "pack",
    "pair_work_bytes",
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


def pair_work_bytes(numel: int, dtype: torch.dtype, work_dtype: torch.dtype | None) -> int:
    """Estimated peak working memory of a CM factor pair's ``numel`` elements (its ``A`` and ``B``
    head views, parameter ``dtype``) in a batched CM step: five pair-sized tensors in ``dtype``
    (the stacked weights, gradients or momenta, new momenta, Nesterov direction, update), three in
    float32 at least (the whitened momenta, their concatenation, the msign output) and two in the
    msign's ``work_dtype`` (its working copy and iterate). About 1.15-1.6x the peaks measured per
    pair on CPU (5.5-7.9x the pair's fp32 bytes, ``tests/test_cm_buckets.py``); the ``d x d``
    partner roots are negligible next to it."""
    it, wt = _elem(dtype), _elem(work_dtype or dtype)
    return numel * (5 * it + 3 * max(4, it) + 2 * wt)


def group_limit(total_bytes: int, bucket_bytes: int | None) -> int | None:
    """The bucket limit of a group whose updated weights take ``total_bytes``:
    ``min(bucket_bytes, max(MIN_BUCKET_BYTES, SMALL_SCALE_FRACTION * total_bytes))`` (None: no limit)."""
    if bucket_bytes is None:
        return None
    return min(bucket_bytes, max(MIN_BUCKET_BYTES, int(SMALL_SCALE_FRACTION * total_bytes)))


def pack(costs: list[int], limit: int | None) -> list[list[int]]:
    """Indices ``0..len(costs)-1`` cut, in order, into consecutive runs whose summed cost stays
    under ``limit``; an item over the limit is a run of its own (None: one run)."""
    if limit is None:
        return [list(range(len(costs)))] if costs else []
    out: list[list[int]] = []
    used = 0
    for i, cost in enumerate(costs):
        if out and used + cost <= limit:
            out[-1].append(i)
            used += cost
        else:
            out.append([i])
            used = cost
    return out


def plan(params: list, bucket_bytes: int | None, work_dtype: torch.dtype | None = None) -> list[list]:
    """Split ``params`` into buckets (lists of params): same shapes and dtypes kept adjacent (so
    they still share batched calls), each bucket's summed :func:`work_bytes` under the limit."""
    if bucket_bytes is None or len(params) <= 1:
        return [list(params)] if params else []
    limit = group_limit(sum(p.numel() * p.element_size() for p in params), bucket_bytes)
    order = sorted(range(len(params)), key=lambda i: (tuple(params[i].shape), str(params[i].dtype), i))
    runs = pack([work_bytes(params[i], work_dtype) for i in order], limit)
    return [[params[order[j]] for j in run] for run in runs]
