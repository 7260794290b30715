"""Strategies for the DTensor layouts beyond FSDP2's 1-D row shards, read from the placements
(:mod:`.mesh`): tensor parallelism and FSDP x TP (:class:`TensorParallel`), HSDP
(:class:`HybridSharded`) and expert parallelism (:class:`ExpertParallel`).

* A whole-matrix job (Muon and its variants) on a TP / FSDP x TP / HSDP part goes to one owner rank
  box by box and back (:func:`.box.box_owner_compute`; ``2 (W-1)/W^2`` of its bytes per rank); HSDP's
  replica groups each compute their own copy (no traffic across replicas).
* A stack of matrices (experts ``(E, out, in)``) split only along its stack dims is orthogonalized
  where it lives: no communication.
* CM groups: :class:`~.sharded.ShardedDTensor`'s per-pair rules on the generalized
  :func:`~.layout.factor_layout` (heads on the split dim -> head-local; heads across the split
  width -> Grams all-reduced; ``W_o`` split along both dims -> Grams over the width group).
"""

from __future__ import annotations

from typing import Any

import torch

from ..plan import PairBatch
from .box import box_owner_compute
from .layout import from_local, is_dtensor, row_sharding
from .mesh import shard_layout
from .sharded import ShardedDTensor
from .strategy import CMGroupStep, MatrixFn, Strategy
from .work import msign_cost

__all__ = ["TensorParallel", "HybridSharded", "ExpertParallel", "MESH_STRATEGIES"]

Tensor = torch.Tensor


def _has_replicas(t: Any) -> bool:
    lay = shard_layout(t)
    return lay is not None and lay.replicas > 1 and bool(lay.sharded_dims)


class TensorParallel(Strategy):
    """DTensors split along a dim other than FSDP2's rows, or over more than one mesh dim: TP's
    row-parallel weights (``Shard(1)``), FSDP x TP (``_StridedShard(0), Shard(0)`` and
    ``Shard(0), Shard(1)``). TP's column-parallel weights (``Shard(0)`` on a 1-D mesh) are FSDP2's
    layout and go to :class:`~.sharded.ShardedDTensor`."""

    name = "tensor_parallel"
    group = None

    @classmethod
    def claims(cls, t: Tensor, parallel: Any) -> bool:
        return is_dtensor(t) and row_sharding(t) is None and bool(shard_layout(t).sharded_dims)

    def matrices(self, mats: list[Any], compute: MatrixFn) -> list[Tensor]:
        zs = box_owner_compute(mats, [msign_cost(u.shape) for u in mats], compute, "muon.msign")
        return [from_local(z.contiguous(), u) for u, z in zip(mats, zs)]

    def cm_group(self, step: CMGroupStep) -> list[PairBatch]:
        return ShardedDTensor().cm_group(step)


class HybridSharded(TensorParallel):
    """HSDP (``fully_shard`` on a replicate x shard mesh: ``Replicate(), Shard(0)``): FSDP2 inside
    each replica group; every replica group computes the same update from the same (already
    all-reduced) gradients, so nothing crosses replica groups."""

    name = "hybrid_sharded"

    @classmethod
    def claims(cls, t: Tensor, parallel: Any) -> bool:
        return is_dtensor(t) and _has_replicas(t)


class ExpertParallel(Strategy):
    """Stacks of matrices (``ndim >= 3``, e.g. experts ``(E, out, in)``) split only along their
    stack dims (expert parallel ``Shard(0)``, or FSDP2 on the expert dim): each matrix is whole on
    its rank and is orthogonalized there, with no communication."""

    name = "expert_parallel"
    group = None

    @classmethod
    def claims(cls, t: Tensor, parallel: Any) -> bool:
        if not is_dtensor(t) or t.ndim < 3:
            return False
        return all(k < t.ndim - 2 for k in shard_layout(t).sharded_dims)

    def matrices(self, mats: list[Any], compute: MatrixFn) -> list[Tensor]:
        zs = compute([u.to_local() for u in mats])
        return [from_local(z.contiguous(), u) for u, z in zip(mats, zs)]

    def cm_group(self, step: CMGroupStep) -> list[PairBatch]:
        return ShardedDTensor().cm_group(step)


# asked in this order before FSDP2's row rule (select.Parallel.strategy_for)
MESH_STRATEGIES: tuple[type[Strategy], ...] = (ExpertParallel, HybridSharded, TensorParallel)
