"""Compatibility names for the distributed paths, which live in :mod:`compositional_muon.parallel`.

DDP (replicated parameters): the msign / CM-layer work is spread over the ranks and the results
all-gathered (:class:`~compositional_muon.parallel.ReplicatedWorkSharing`). FSDP2 / DTensor
(``Shard(0)`` on a 1-D mesh): shard-aware updates (:class:`~compositional_muon.parallel.ShardedDTensor`)
with a gather fallback (:class:`~compositional_muon.parallel.GatherFallback`). Every collective is
counted by :class:`CommCounter`. The training-side helpers (process groups, DDP / FSDP2 wrapping,
DCP checkpoints) are in :mod:`compositional_muon.training.dist`. See ``docs/distributed.md`` and
``docs/architecture.md``.
"""

from __future__ import annotations

from typing import Any

from .parallel import CommCounter, Parallel, assign, chunk_ranges, gram_msign, is_dtensor, local, row_sharding
from .parallel.layout import dtensor_groups, gather_full, map_local, zeros_rows

__all__ = [
    "CommCounter",
    "replicated_group",
    "row_sharding",
    "gram_msign",
    "chunk_ranges",
    "assign",
    "is_dtensor",
    "local",
    "gather_full",
    "map_local",
    "zeros_rows",
    "dtensor_groups",
]


def replicated_group(opt: Any) -> Any:
    """The process group over which ``opt`` spreads replicated (DDP) work, or None."""
    parallel = getattr(opt, "parallel", None)
    if parallel is None:
        parallel = Parallel(getattr(opt, "distributed", "auto"), type(opt).__name__)
    return parallel.replicated_group()
