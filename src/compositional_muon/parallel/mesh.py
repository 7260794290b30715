"""Where each rank's part of a DTensor lies, from its placements (no communication).

A DTensor on an ``n``-D :class:`~torch.distributed.device_mesh.DeviceMesh` has one placement per
mesh dim: ``Shard(k)`` / ``_StridedShard(k)`` split tensor dim ``k`` over that mesh dim,
``Replicate()`` copies. The layouts this library meets:

========================================  ===================================  ==================
setting                                   weight placements                    this rank's part
========================================  ===================================  ==================
FSDP2 (1-D mesh)                          ``(Shard(0),)``                      a row range
TP ``ColwiseParallel`` (q, k, v, MLP-up)  ``(Shard(0),)``                      whole output rows
TP ``RowwiseParallel`` (o, MLP-down)      ``(Shard(1),)``                      whole input columns
HSDP (replicate x shard)                  ``(Replicate(), Shard(0))``          a row range, copied
FSDP x TP, colwise                        ``(_StridedShard(0), Shard(0))``     a row range
FSDP x TP, rowwise                        ``(Shard(0), Shard(1))``             a row x column box
EP (experts ``[E, out, in]``)             ``(Shard(0),)``                      whole experts
========================================  ===================================  ==================

:func:`shard_layout` turns placements into a :class:`ShardLayout`: the process group over the ranks
that hold *distinct* parts (mesh dims with ``Replicate`` are left out: their ranks hold copies and
compute the same update), this rank's index in it, and for every rank of that group the box of
global indices it holds (one ``[lo, hi)`` per tensor dim). Every part must be such a box; a
``Partial`` placement or a non-contiguous strided part raises :class:`UnsupportedLayout`.

The update rules built on it (the strategies in :mod:`.mesh_strategies` and :mod:`.sharded`):

* a whole-matrix msign (Muon and its variants, CM's hybrid ``W_o``) on a part that is a range of
  one dim is sent to one owner rank and back (``all_to_all`` twice; a column range is handled as
  the row range of the transpose, since ``msign(M^T) = msign(M)^T``); a box sharded on two dims
  the same way, box by box;
* a CM factor is *heads*-sharded when the sharded dim is its head axis and every head lies on one
  rank (no communication, e.g. TP's ``q``/``k``/``v`` rows and ``o``'s columns) and *width*-sharded
  when the sharded dim is the other one (its ``d x d`` Grams are all-reduced, e.g. FSDP's
  ``o_proj`` rows); any other case (a head across a shard boundary, a row x column box) takes the
  exact gather fallback;
* an expert stack sharded on the expert dim keeps every expert whole on one rank: its
  per-expert msigns are local.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = ["UnsupportedLayout", "ShardLayout", "shard_layout", "single_dim", "check_supported", "DimSplit", "dim_split"]

Box = tuple[tuple[int, int], ...]


class UnsupportedLayout(ValueError):
    """A DTensor layout the optimizers cannot update exactly (raised before any step writes)."""


@dataclass(frozen=True)
class ShardLayout:
    """The parts of a DTensor of global ``shape``: rank ``r`` of ``group`` (``world`` ranks, this
    one is ``rank``) holds the box ``boxes[r]`` (one ``(lo, hi)`` per tensor dim); ``replicas``
    copies of the whole arrangement exist (``Replicate`` mesh dims). ``group`` is None when the
    tensor is replicated on every rank."""

    shape: tuple[int, ...]
    group: Any
    rank: int
    world: int
    boxes: tuple[Box, ...]
    replicas: int

    @property
    def box(self) -> Box:
        return self.boxes[self.rank]

    @property
    def sharded_dims(self) -> tuple[int, ...]:
        """Tensor dims that some rank does not hold in full."""
        return tuple(k for k in range(len(self.shape)) if any(b[k] != (0, self.shape[k]) for b in self.boxes))

    def ranges(self, dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(starts, ends)`` of every rank along ``dim``."""
        return tuple(b[dim][0] for b in self.boxes), tuple(b[dim][1] for b in self.boxes)

    def numel(self, r: int) -> int:
        return math.prod(hi - lo for lo, hi in self.boxes[r])


def _is_shard(pl: Any) -> bool:
    return isinstance(pl, (Shard, _StridedShard))


def _index_sets(
    shape: Sequence[int], mesh_shape: Sequence[int], coord: Sequence[int], placements: Sequence[Any]
) -> list[torch.Tensor]:
    """Global indices per tensor dim held at mesh coordinate ``coord`` (placements applied left
    to right, as DTensor does)."""
    idx = [torch.arange(n) for n in shape]
    for md, pl in enumerate(placements):
        if _is_shard(pl):
            k = pl.dim
            chunks, _ = pl._split_tensor(idx[k].view([1] * k + [-1]), mesh_shape[md], with_padding=False)
            idx[k] = chunks[coord[md]].reshape(-1) if coord[md] < len(chunks) else idx[k][:0]
    return idx


def _box(idx: list[torch.Tensor], shape: Sequence[int], what: str) -> Box:
    out = []
    for k, ix in enumerate(idx):
        if ix.numel() == 0:
            out.append((shape[k], shape[k]))
            continue
        lo, hi = int(ix[0]), int(ix[-1]) + 1
        if hi - lo != ix.numel() or not torch.equal(ix, torch.arange(lo, hi)):
            raise UnsupportedLayout(f"{what}: a rank's part of dim {k} is not contiguous (strided sharding)")
        out.append((lo, hi))
    return tuple(out)


_GROUPS: dict[Any, tuple[Any, ShardLayout]] = {}


def _group_of(mesh: Any, dims: tuple[int, ...], what: str) -> tuple[Any, list[tuple[int, ...]]]:
    """The process group over the mesh dims ``dims`` (this rank's coordinates fixed on the
    others) and the mesh coordinates of its ranks in group-rank order."""
    if len(dims) == 1:
        pg = mesh.get_group(dims[0])
        ranks = dist.get_process_group_ranks(pg)
    elif len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        pg = dist.group.WORLD
        ranks = list(range(dist.get_world_size()))
    else:
        pg = _flat_group(mesh, dims, what)
        ranks = dist.get_process_group_ranks(pg)
    grid = mesh.mesh
    coords = []
    for g in ranks:
        pos = (grid == g).nonzero()
        if pos.numel() == 0:
            raise UnsupportedLayout(f"{what}: rank {g} of its group is not in its mesh")
        coords.append(tuple(int(c) for c in pos[0]))
    return pg, coords


def _flat_group(mesh: Any, dims: tuple[int, ...], what: str) -> Any:
    """The process group over several (not all) dims of a mesh, e.g. ``shard x tp`` of an
    HSDP x TP mesh ``(replicate, shard, tp)``: the flattened submesh's group (DeviceMesh
    ``_flatten``, created once by every rank at the first call, cached in the root mesh)."""
    names = mesh.mesh_dim_names
    if names is None or not hasattr(mesh, "_flatten"):
        raise UnsupportedLayout(
            f"{what}: sharded over {len(dims)} of the {mesh.ndim} dims of a mesh without dim names; "
            "name its dims (init_device_mesh(..., mesh_dim_names=...)) or use one of the supported meshes: "
            "1-D, replicate x shard (HSDP), dp x tp (FSDP x TP), replicate x shard x tp"
        )
    return mesh[tuple(names[d] for d in dims)]._flatten().get_group()


def shard_layout(t: Any, what: str = "tensor") -> ShardLayout:
    """The :class:`ShardLayout` of a DTensor. Raises :class:`UnsupportedLayout` for ``Partial``
    placements or parts that are not boxes."""
    if not isinstance(t, DTensor):
        raise TypeError(f"{what}: shard_layout needs a DTensor, got {type(t).__name__}")
    mesh, placements = t.device_mesh, tuple(t.placements)
    key = (tuple(t.shape), id(mesh), placements)
    hit = _GROUPS.get(key)
    if hit is not None and hit[0] is mesh:
        return hit[1]
    for pl in placements:
        if isinstance(pl, Partial):
            raise UnsupportedLayout(f"{what}: a Partial placement (unreduced gradient?) cannot be updated")
        if not (_is_shard(pl) or isinstance(pl, Replicate)):
            raise UnsupportedLayout(f"{what}: unknown placement {pl!r}")
    shape = tuple(t.shape)
    sdims = tuple(md for md, pl in enumerate(placements) if _is_shard(pl))
    mine = tuple(mesh.get_coordinate() or ())
    replicas = math.prod(mesh.size(md) for md in range(mesh.ndim) if md not in sdims)
    if not sdims:
        lay = ShardLayout(shape, None, 0, 1, (tuple((0, n) for n in shape),), replicas)
    else:
        pg, coords = _group_of(mesh, sdims, what)
        mesh_shape = tuple(mesh.size(md) for md in range(mesh.ndim))
        boxes = []
        for c in coords:
            full = tuple(c[md] if md in sdims else mine[md] for md in range(mesh.ndim))
            boxes.append(_box(_index_sets(shape, mesh_shape, full, placements), shape, what))
        rank = next(i for i, c in enumerate(coords) if all(c[md] == mine[md] for md in sdims))
        lay = ShardLayout(shape, pg, rank, len(coords), tuple(boxes), replicas)
    local_shape = tuple(t.to_local().shape)
    if tuple(hi - lo for lo, hi in lay.box) != local_shape:
        raise UnsupportedLayout(f"{what}: local shape {local_shape} does not match its placements {placements}")
    _GROUPS[key] = (mesh, lay)
    return lay


def single_dim(lay: ShardLayout | None) -> int | None:
    """The one tensor dim ``lay`` splits (every other dim whole on every rank), else None
    (also None when nothing is split)."""
    if lay is None:
        return None
    dims = lay.sharded_dims
    return dims[0] if len(dims) == 1 else None


def check_supported(tensors: Iterable[Any], what: str = "optimizer") -> None:
    """Raise :class:`UnsupportedLayout` (one line) for the first DTensor among ``tensors`` whose
    layout cannot be updated exactly; call at construction, before any step."""
    for i, t in enumerate(tensors):
        if isinstance(t, DTensor):
            shard_layout(t, f"{what}: parameter {i} of shape {tuple(t.shape)}")


@dataclass(frozen=True)
class DimSplit:
    """One tensor dim of a DTensor split over the mesh dims that shard it (the other mesh dims
    fixed at this rank's coordinates): rank ``r`` of ``group`` (``world`` ranks, this one is
    ``rank``, global ranks ``ranks``) holds ``starts[r]:ends[r]`` of that dim."""

    group: Any
    rank: int
    world: int
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    ranks: tuple[int, ...]


def dim_split(t: Any, k: int, what: str = "tensor") -> DimSplit | None:
    """How tensor dim ``k`` of the DTensor ``t`` is split (None when no mesh dim shards it)."""
    mesh, placements = t.device_mesh, tuple(t.placements)
    mds = tuple(md for md, pl in enumerate(placements) if _is_shard(pl) and pl.dim == k)
    if not mds:
        return None
    pg, coords = _group_of(mesh, mds, what)
    mine = tuple(mesh.get_coordinate() or ())
    mesh_shape = tuple(mesh.size(md) for md in range(mesh.ndim))
    starts, ends = [], []
    for c in coords:
        full = tuple(c[md] if md in mds else mine[md] for md in range(mesh.ndim))
        lo, hi = _box(_index_sets(tuple(t.shape), mesh_shape, full, placements), tuple(t.shape), what)[k]
        starts.append(lo)
        ends.append(hi)
    rank = next(i for i, c in enumerate(coords) if all(c[md] == mine[md] for md in mds))
    ranks = tuple(int(mesh.mesh[c].item()) for c in coords)
    return DimSplit(pg, rank, len(coords), tuple(starts), tuple(ends), ranks)
