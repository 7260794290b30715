"""Distribution as strategy objects (see ``docs/architecture.md``).

``comm`` counted collectives (:class:`CommCounter`), ``layout`` where tensors and heads live,
``work`` assignment / spreading / owner computation, ``gram_msign`` msign from an all-reduced
Gram, ``reducer`` the sharded :class:`~compositional_muon.cm.kernel.PairReducer`, ``strategy`` /
``sharded`` the strategies, ``select`` the :class:`Parallel` policy an optimizer holds.
"""

from .comm import CommCounter
from .gram_msign import gram_msign
from .layout import chunk_ranges, is_dtensor, local, map_local, row_sharding, zeros_rows
from .reducer import ShardedReducer
from .select import MODES, Parallel
from .sharded import GatherFallback, ShardedDTensor
from .strategy import CMGroupStep, ReplicatedWorkSharing, SingleProcess, Strategy
from .work import assign

__all__ = [
    "CommCounter",
    "Parallel",
    "MODES",
    "Strategy",
    "SingleProcess",
    "ReplicatedWorkSharing",
    "ShardedDTensor",
    "GatherFallback",
    "ShardedReducer",
    "CMGroupStep",
    "gram_msign",
    "chunk_ranges",
    "assign",
    "is_dtensor",
    "local",
    "map_local",
    "row_sharding",
    "zeros_rows",
]
