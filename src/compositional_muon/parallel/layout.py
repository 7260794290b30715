"""Where tensors live: DTensor detection, dim-0 row shardings (FSDP2's layout), gathers and
re-shards, and where a CM factor's heads are relative to the shards (:class:`Factor`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import head_view
from .comm import all_gather, nbytes, record

try:  # DTensor / FSDP2 (torch >= 2.4)
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "DTensor",
    "is_dtensor",
    "local",
    "Rows",
    "chunk_ranges",
    "row_sharding",
    "from_local",
    "reshard",
    "local_part",
    "gather_full",
    "zeros_rows",
    "map_local",
    "dtensor_groups",
    "Factor",
    "dim_rows",
    "factor_layout",
    "local_heads",
]


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Any) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class Rows:
    """Dim-0 sharding of a DTensor over a 1-D mesh: rank ``r`` holds rows ``starts[r]:ends[r]``."""

    group: Any
    rank: int
    world: int
    starts: tuple[int, ...]
    ends: tuple[int, ...]

    @property
    def lo(self) -> int:
        return self.starts[self.rank]

    @property
    def hi(self) -> int:
        return self.ends[self.rank]

    def owner(self, row: int) -> int:
        for r in range(self.world):
            if self.starts[r] <= row < self.ends[r]:
                return r
        raise IndexError(row)


def chunk_ranges(n: int, world: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row ranges of ``torch.chunk``-style sharding (DTensor ``Shard``, FSDP2): ``ceil(n/world)``
    rows per rank, the last ranks possibly short or empty."""
    c = -(-n // world) if n else 0
    return tuple(min(r * c, n) for r in range(world)), tuple(min((r + 1) * c, n) for r in range(world))


def row_sharding(t: Any) -> Rows | None:
    """:class:`Rows` for a DTensor sharded on dim 0 over a 1-D mesh (FSDP2's layout), else None."""
    if not is_dtensor(t):
        return None
    mesh = t.device_mesh
    if mesh.ndim != 1 or len(t.placements) != 1:
        return None
    pl = t.placements[0]
    if type(pl) is not Shard or pl.dim != 0:
        return None
    world, rank = mesh.size(), mesh.get_local_rank()
    starts, ends = chunk_ranges(t.shape[0], world)
    if t.to_local().shape[0] != ends[rank] - starts[rank]:
        return None
    return Rows(mesh.get_group(), rank, world, starts, ends)


def from_local(x: torch.Tensor, like: Any) -> Any:
    return DTensor.from_local(
        x, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def reshard(full: torch.Tensor, like: Any) -> Any:
    """A full (replicated) tensor, laid out like the DTensor ``like`` (no communication)."""
    rep = DTensor.from_local(full, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)
    return rep.redistribute(like.device_mesh, like.placements)


def local_part(full: torch.Tensor, like: Any) -> torch.Tensor:
    """This rank's part of ``full`` in the layout of ``like`` (a DTensor or a plain tensor)."""
    if not is_dtensor(like):
        return full
    rows = row_sharding(like)
    if rows is not None:
        return full[rows.lo : rows.hi]
    return reshard(full, like).to_local()


def gather_full(t: Any, tag: str) -> torch.Tensor:
    """The full tensor of a DTensor (``all_gather`` for dim-0 shards); a plain tensor is returned as is."""
    if not is_dtensor(t):
        return t
    rows = row_sharding(t)
    if rows is None:
        record("full_tensor", tag, nbytes(t.to_local()))
        return t.full_tensor()
    loc = t.to_local()
    c = -(-t.shape[0] // rows.world)
    buf = loc.new_zeros((c,) + tuple(loc.shape[1:]))
    buf[: loc.shape[0]] = loc
    out = loc.new_empty((c * rows.world,) + tuple(loc.shape[1:]))
    all_gather(out, buf, rows.group, tag)
    return out[: t.shape[0]]


def zeros_rows(like: Any, cols: int, dtype: torch.dtype) -> Any:
    """``zeros(like.size(0), cols)`` laid out like ``like`` (row-sharded when ``like`` is)."""
    if not is_dtensor(like):
        return torch.zeros(like.size(0), cols, dtype=dtype, device=like.device)
    rows = row_sharding(like)
    if rows is not None:
        z = torch.zeros(rows.hi - rows.lo, cols, dtype=dtype, device=like.device)
        return DTensor.from_local(
            z,
            like.device_mesh,
            like.placements,
            run_check=False,
            shape=torch.Size((like.size(0), cols)),
            stride=(cols, 1),
        )
    full = torch.zeros(like.size(0), cols, dtype=dtype, device=like.device)
    return DTensor.from_local(full, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)


def map_local(t: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to the local shard of a row-sharded DTensor (row-wise ``fn`` only), rewrapped."""
    if not is_dtensor(t):
        return fn(t)
    found = dim_rows(t) if any(not isinstance(p, Replicate) for p in t.placements) else (0, None)
    if found is None or found[0] != 0:  # columns split, or a box: gather, apply, re-shard
        return reshard(fn(gather_full(t, "map_local")), t)
    return from_local(fn(t.to_local()), t)


def dtensor_groups(tensors: Iterable[Any]) -> list[Any]:
    """The distinct process groups of the DTensors among ``tensors`` (mesh order)."""
    seen: set[int] = set()
    out: list[Any] = []
    for t in tensors:
        if is_dtensor(t):
            for pg in t.device_mesh.get_all_groups():
                if id(pg) not in seen:
                    seen.add(id(pg))
                    out.append(pg)
    return out


@dataclass
class Factor:
    """Where one CM factor's heads live relative to the shards.

    ``mode``: ``"heads"`` (heads are blocks of the split dim, each within one rank; this rank
    holds heads ``lo:hi``, rank ``r`` heads ``spans[r]``), ``"width"`` (heads lie along the other
    dim; every rank holds rows ``rows.lo:rows.hi`` of every head's width), ``"full"`` (not split),
    ``"split"`` (a head straddles a shard boundary) or ``"other"`` (a layout the sharded path
    cannot use). ``dim``: the tensor dim that is split (0 under FSDP2 and for TP's column-parallel
    weights, 1 for TP's row-parallel ``o_proj``). A "width" factor whose heads are also split
    (FSDP x TP's ``W_o``: width rows over dp, head columns over tp) holds heads ``lo:hi``, the
    first at ``head_off`` along the head axis, and ``whole`` is its layout over every rank."""

    mode: str
    rows: Rows | None = None
    lo: int = 0
    hi: int = 0
    spans: tuple = ()
    dim: int = 0
    head_off: int = 0
    whole: Any = None

    @property
    def all_group(self) -> Any:
        """The group over every rank holding a distinct part (norms, agreement, hybrid msign)."""
        if self.whole is not None:
            return self.whole.group
        return self.rows.group if self.rows is not None else None


def dim_rows(p: Any) -> tuple[int, Rows] | None:
    """``(dim, Rows)`` for a DTensor split along one tensor dim only (any mesh, see
    :func:`.mesh.shard_layout`); None when nothing or two dims are split."""
    rows = row_sharding(p)
    if rows is not None:
        return 0, rows
    from .mesh import shard_layout, single_dim

    lay = shard_layout(p)
    k = single_dim(lay)
    if k is None:
        return None
    starts, ends = lay.ranges(k)
    return k, Rows(lay.group, lay.rank, lay.world, starts, ends)


def factor_layout(p: Any, ref: tuple[int, int, int], n: int, d: int) -> Factor:
    """The :class:`Factor` of ``n`` heads of size ``d`` at ``ref = (axis, offset, stride)`` of ``p``."""
    axis, offset, stride = ref
    if not is_dtensor(p):
        return Factor("full", None, 0, n, ((0, n),))
    found = dim_rows(p)
    if found is None:
        from .mesh import shard_layout

        lay = shard_layout(p)
        if not lay.sharded_dims:
            return Factor("full", None, 0, n, ((0, n),))
        return _two_dims(p, lay, ref, n, d)
    dim, rows = found
    if axis != dim:
        return Factor("width", rows, 0, n, tuple((0, n) for _ in range(rows.world)), dim)
    owners = []
    for h in range(n):
        a = offset + h * stride
        r = rows.owner(a)
        if a + d > rows.ends[r]:
            return Factor("split", rows, dim=dim)
        owners.append(r)
    spans = []
    for r in range(rows.world):
        hs = [h for h, o in enumerate(owners) if o == r]
        if hs and hs[-1] - hs[0] + 1 != len(hs):
            return Factor("split", rows, dim=dim)
        spans.append((hs[0], hs[-1] + 1) if hs else (0, 0))
    lo, hi = spans[rows.rank]
    return Factor("heads", rows, lo, hi, tuple(spans), dim)


def _two_dims(p: Any, lay: Any, ref: tuple[int, int, int], n: int, d: int) -> Factor:
    """A 2-D weight split along both dims (FSDP x TP's ``W_o``): a "width" factor over the mesh
    dims that split the width, holding the whole heads of the head-axis split; "other" when a head
    is not whole or the heads are not packed (offset 0, stride d)."""
    from .mesh import dim_split

    axis, offset, stride = ref
    if p.ndim != 2 or len(lay.sharded_dims) != 2 or offset != 0 or stride != d:
        return Factor("other")
    hs, ws = dim_split(p, axis), dim_split(p, 1 - axis)
    if hs is None or ws is None or any(a % d or b % d for a, b in zip(hs.starts, hs.ends)):
        return Factor("other")
    h_lo, h_hi = hs.starts[hs.rank], hs.ends[hs.rank]
    if h_hi > n * d:
        return Factor("other")
    rows = Rows(ws.group, ws.rank, ws.world, ws.starts, ws.ends)
    return Factor("width", rows, h_lo // d, h_hi // d, (), 1 - axis, h_lo, lay)


def local_heads(t: torch.Tensor, ref: tuple[int, int, int], f: Factor, d: int) -> torch.Tensor:
    """Kernel-layout view ``(heads, d, width)`` of this rank's part of a factor in the local shard ``t``."""
    axis, offset, stride = ref
    if f.mode == "width" and f.whole is not None:
        return head_view(t, axis, offset + f.lo * stride - f.head_off, stride, f.hi - f.lo, d)
    if f.mode in ("width", "full"):
        return head_view(t, axis, offset, stride, f.hi, d)
    if f.hi == f.lo or f.rows is None:
        return t.new_empty((0, d, t.size(1 - axis)))
    return head_view(t, axis, offset + f.lo * stride - f.rows.lo, stride, f.hi - f.lo, d)
