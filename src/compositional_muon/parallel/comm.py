"""Counted collectives: every collective the optimizers issue goes through these wrappers.

:class:`CommCounter` records them (op, tag, bytes) so tests and benchmarks can check the
communication volume of each strategy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["CommCounter", "record", "nbytes", "all_reduce", "all_gather", "all_to_all", "world"]

_COUNTERS: list[CommCounter] = []


class CommCounter:
    """Context manager that records the collectives the optimizers issue through this package.

    ``calls`` is a list of ``(op, tag, nbytes)``; ``nbytes`` is this rank's payload: the tensor
    size for ``all_reduce``, this rank's contribution for ``all_gather``, the bytes sent to other
    ranks for ``all_to_all``. Tags name the step part (``"muon.msign"``, ``"cm.qk.gram"``,
    ``"cm.ov.gram"``, ``"cm.ov.hybrid"``, ``"cm.fallback"``, ...). DTensor's own element-wise
    dispatch (scalar norm reductions in NorMuon/AdaMuon/Mano) is not counted; use
    ``torch.distributed.tensor.debug.CommDebugMode`` for those.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def __enter__(self) -> CommCounter:
        _COUNTERS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _COUNTERS.remove(self)

    def total(self, prefix: str = "") -> int:
        """Bytes over the calls whose tag starts with ``prefix``."""
        return sum(b for _, t, b in self.calls if t.startswith(prefix))

    def count(self, prefix: str = "") -> int:
        """Number of collective calls whose tag starts with ``prefix``."""
        return sum(1 for _, t, _ in self.calls if t.startswith(prefix))

    def by_tag(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, t, b in self.calls:
            out[t] = out.get(t, 0) + b
        return out


def record(op: str, tag: str, size: int) -> None:
    for c in _COUNTERS:
        c.calls.append((op, tag, int(size)))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(t: torch.Tensor, group: Any, tag: str, op: Any = None) -> torch.Tensor:
    record("all_reduce", tag, nbytes(t))
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def all_gather(out: torch.Tensor, inp: torch.Tensor, group: Any, tag: str) -> torch.Tensor:
    record("all_gather", tag, nbytes(inp))
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp, group=group)
    return out


def all_to_all(
    out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any, tag: str, rank: int
) -> torch.Tensor:
    record("all_to_all", tag, (sum(in_splits) - in_splits[rank]) * inp.element_size())
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    return out


def world(group: Any) -> tuple[int, int]:
    """``(world size, rank)`` in ``group``."""
    return dist.get_world_size(group), dist.get_rank(group)
