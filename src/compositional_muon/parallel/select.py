"""Choosing a strategy: :class:`Parallel`, held by every optimizer as ``opt.parallel``.

The optimizers know only this interface; what ``torch.distributed`` is doing stays in this package.
Selection (today's rules, per tensor / per CM group):

* a DTensor stack of matrices split along its stack dims -> :class:`~.mesh_strategies.ExpertParallel`
  (local); a DTensor with replicated and sharded mesh dims -> :class:`~.mesh_strategies.HybridSharded`
  (HSDP); any other split DTensor but FSDP2's rows -> :class:`~.mesh_strategies.TensorParallel`
  (TP, FSDP x TP: owner msign box by box);
* a DTensor row-sharded on dim 0 over a 1-D mesh -> :class:`ShardedDTensor` (CM groups with any
  DTensor take it too: per pair between head-local, sharded-with-reductions and
  :class:`GatherFallback`, on the placements' layout);
* any other DTensor (replicated) -> :class:`GatherFallback`;
* a plain tensor with ``torch.distributed`` initialized (world > 1) and ``distributed`` not
  False -> :class:`ReplicatedWorkSharing` (DDP); CM's ``transform="normuon"`` stays single-process;
* otherwise :class:`SingleProcess`.

Strategies registered with :meth:`Parallel.register` are asked first (``claims``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..plan import PairBatch
from .comm import all_reduce
from .layout import dtensor_groups, is_dtensor, row_sharding
from .mesh_strategies import MESH_STRATEGIES
from .sharded import GatherFallback, ShardedDTensor
from .strategy import CMGroupStep, MatrixFn, ReplicatedWorkSharing, SingleProcess, Strategy
from .work import common_dtype

__all__ = ["Parallel", "MODES"]

MODES = ("auto", True, False)
_SINGLE = SingleProcess()


class Parallel:
    """The distribution policy of one optimizer.

    ``mode``: "auto" (default) spreads the work on replicated (DDP) parameters when
    ``torch.distributed`` is initialized with world size > 1; True requires it; False never spreads
    (no collective is issued for replicated parameters). DTensor (FSDP2) parameters always take the
    shard-aware strategies."""

    registered: list[type[Strategy]] = []

    def __init__(self, mode: bool | str = "auto", owner: str = "optimizer"):
        if not (isinstance(mode, bool) or mode == "auto"):
            raise ValueError(f"`distributed` must be 'auto', True or False, got {mode!r}")
        self.mode = mode
        self.owner = owner

    @classmethod
    def register(cls, strategy: type[Strategy]) -> type[Strategy]:
        """Add a strategy class; its ``claims(tensor, parallel)`` is asked before the built-in rules."""
        if strategy not in cls.registered:
            cls.registered.insert(0, strategy)
        return strategy

    # -- process groups ----------------------------------------------------------------------
    def replicated_group(self) -> Any:
        """The process group over which replicated (DDP) work is spread, or None."""
        if self.mode is False:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            if self.mode is True:
                raise RuntimeError(f"{self.owner}(distributed=True) but torch.distributed is not initialized")
            return None
        if dist.get_world_size() == 1:
            return None
        return dist.group.WORLD

    def active(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether a step over ``tensors`` needs more than the single-process path (DTensors,
        spreading, or a registered strategy claiming one of them)."""
        if any(cls.claims(t, self) for cls in self.registered for t in tensors):
            return True
        return any(is_dtensor(t) for t in tensors) or self.replicated_group() is not None

    # -- selection ---------------------------------------------------------------------------
    def strategy_for(self, t: torch.Tensor) -> Strategy:
        """The strategy for a whole-matrix job on ``t``."""
        for cls in self.registered:
            if cls.claims(t, self):
                return cls()
        if is_dtensor(t):
            for mesh_cls in MESH_STRATEGIES:
                if mesh_cls.claims(t, self):
                    return mesh_cls()
            rows = row_sharding(t)
            return ShardedDTensor(rows.group) if rows is not None else GatherFallback()
        pg = self.replicated_group()
        return ReplicatedWorkSharing(pg) if pg is not None else _SINGLE

    def cm_strategy(self, params: Sequence[torch.Tensor], normuon: bool) -> Strategy:
        """The strategy for a CM param group."""
        for cls in self.registered:
            if any(cls.claims(p, self) for p in params):
                return cls()
        if any(is_dtensor(p) for p in params):
            return ShardedDTensor()
        pg = None if normuon else self.replicated_group()
        return ReplicatedWorkSharing(pg) if pg is not None else _SINGLE

    # -- work --------------------------------------------------------------------------------
    def matrices(self, mats: list[torch.Tensor], compute: MatrixFn) -> list[torch.Tensor]:
        """``compute`` of every matrix, each through its strategy (same-strategy matrices together)."""
        if not self.active(mats):
            return compute(mats)
        out: list[torch.Tensor | None] = [None] * len(mats)
        jobs: dict[Any, tuple[Strategy, list[int]]] = {}
        for i, u in enumerate(mats):
            s = self.strategy_for(u)
            key = (type(s), id(getattr(s, "group", None)))
            jobs.setdefault(key, (s, []))[1].append(i)
        for s, idx in sorted(jobs.values(), key=_order):
            for i, z in zip(idx, s.matrices([mats[i] for i in idx], compute)):
                out[i] = z
        return [z for z in out if z is not None]

    def cm_group(self, step: CMGroupStep) -> list[PairBatch]:
        return self.cm_strategy(step.params, step.transform is not None).cm_group(step)

    # -- agreement ---------------------------------------------------------------------------
    def agree_finite(self, flags: list[torch.Tensor], sharded: list[torch.Tensor], device: Any = None) -> bool:
        """``all(flags)`` agreed across the ranks of the DTensor meshes of ``sharded`` (one tiny
        all-reduce each), so every rank takes the same raise/skip decision."""
        ok = not flags or bool(torch.stack(flags).all())
        for pg in dtensor_groups(sharded):
            t = torch.tensor([1.0 if ok else 0.0], device=device)
            all_reduce(t, pg, "finite", dist.ReduceOp.MIN)
            ok = bool(t.item() > 0)
        return ok

    def average_grams(self, grams: dict[Any, Any], entries: Sequence[tuple[Any, tuple[int, ...]]]) -> None:
        """NewtonMuon: average the captured input Grams ``Z Z^T / N`` (``grams[w] = [sum, count]``)
        over the data-parallel ranks (one ``all_reduce``), so ``K`` is the full-batch second moment
        on every rank. ``entries``: ``[(weight, K shape)]`` in the same order on every rank."""
        if not entries:
            return
        pg = self.replicated_group()
        for w, _ in entries:
            if is_dtensor(w):
                pg = w.device_mesh.get_group() if w.device_mesh.ndim == 1 else dist.group.WORLD
                break
        if pg is None:
            return
        device = entries[0][0].device
        dtype = common_dtype([torch.float32] + [w.dtype for w, _ in entries])
        bufs = []
        for w, shape in entries:
            acc = grams.get(w)
            g = (
                (acc[0] / acc[1]).reshape(-1).to(dtype)
                if acc is not None
                else torch.zeros(math.prod(shape), dtype=dtype, device=device)
            )
            bufs.append(torch.cat([g, g.new_tensor([1.0 if acc is not None else 0.0])]))
        flat = all_reduce(torch.cat(bufs), pg, "newton.gram")
        off = 0
        for (w, shape), b in zip(entries, bufs):
            seg = flat[off : off + b.numel()]
            off += b.numel()
            cnt = seg[-1].item()
            acc = grams.get(w)
            if cnt > 0:
                grams[w] = [(seg[:-1] / cnt).view(shape).to(acc[0].dtype if acc is not None else torch.float32), 1]
            else:
                grams.pop(w, None)


def _order(job: tuple[Strategy, list[int]]) -> int:
    """Plain tensors first, then row-sharded, then gathered (the collective order every rank follows)."""
    s = job[0]
    return 0 if isinstance(s, (SingleProcess, ReplicatedWorkSharing)) else (2 if isinstance(s, GatherFallback) else 1)
