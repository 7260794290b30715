"""Distribution as strategy objects (see ``docs/architecture.md``).

``comm`` counted collectives (:class:`CommCounter`), ``layout`` where tensors and heads live,
``work`` assignment / spreading / owner computation, ``gram_msign`` msign from an all-reduced
Gram, ``mesh`` placements -> boxes of every rank's part, ``box`` owner computation on such boxes,
``mesh_strategies`` TP / HSDP / EP, ``heads`` PerHeadMuon's per-head msigns on sharded weights, ``reducer`` the sharded :class:`~compositional_muon.cm.kernel.PairReducer`, ``strategy`` /
``sharded`` the strategies, ``select`` the :class:`Parallel` policy an optimizer holds.
"""

from .comm import CommCounter
from .gram_msign import gram_msign
from .layout import chunk_ranges, is_dtensor, local, map_local, row_sharding, zeros_rows
from .mesh import UnsupportedLayout, shard_layout
from .mesh_strategies import ExpertParallel, HybridSharded, TensorParallel
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
    "TensorParallel",
    "HybridSharded",
    "ExpertParallel",
    "UnsupportedLayout",
    "shard_layout",
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
