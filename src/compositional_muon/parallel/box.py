"""Whole-tensor work on DTensors of any supported layout (see :mod:`.mesh`): each job is
sent, box by box, to one owner rank that computes it on the full tensor and sends every rank its
box of the result back. Two ``all_to_all`` per process group and step; ``W - 1`` of ``W`` parts of
every job cross the network twice (``2 (W-1)/W^2`` of the job's bytes sent per rank on average).

This covers the layouts 1-D FSDP's row path (:func:`.work.owner_compute`) does not: TP's
column shards (``RowwiseParallel``: ``o_proj``, MLP-down), FSDP x TP boxes, HSDP's replicated
shards (each replica group computes its own copy: no traffic across replicas).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .comm import all_to_all
from .mesh import ShardLayout, shard_layout
from .work import assign, common_dtype

__all__ = ["box_owner_compute", "owner_map", "box_slices", "owner_compute_boxes"]


def box_slices(box: Sequence[tuple[int, int]]) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


def _box_shape(box: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def owner_compute_boxes(
    locals_: list[torch.Tensor],
    lays: list[ShardLayout],
    costs: list[float],
    fn: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    tag: str,
) -> list[torch.Tensor]:
    """:func:`box_owner_compute` for jobs whose layouts share one process group (local parts
    ``locals_``, their :class:`ShardLayout` s ``lays``)."""
    group, world, rank = lays[0].group, lays[0].world, lays[0].rank
    n = len(locals_)
    owner = assign(costs, world)
    wire = common_dtype(t.dtype for t in locals_)
    device = locals_[0].device
    mine = [j for j in range(n) if owner[j] == rank]
    # 1. every rank's box of job j -> owner[j]
    parts: list = [[] for _ in range(world)]
    for j in range(n):
        parts[owner[j]].append(locals_[j].reshape(-1).to(wire))
    in_splits = [sum(p.numel() for p in parts[r]) for r in range(world)]
    out_splits = [sum(lays[j].numel(r) for j in mine) for r in range(world)]
    send = torch.cat([p for ps in parts for p in ps]) if n else torch.empty(0, dtype=wire, device=device)
    recv = torch.empty(sum(out_splits), dtype=wire, device=device)
    all_to_all(recv, send, out_splits, in_splits, group, tag, rank)
    pieces = list(recv.split(out_splits))
    offs = [0] * world
    fulls = []
    for j in mine:
        lay = lays[j]
        full = torch.empty(lay.shape, dtype=locals_[j].dtype, device=device)
        for r in range(world):
            k = lay.numel(r)
            full[box_slices(lay.boxes[r])] = pieces[r][offs[r] : offs[r] + k].view(_box_shape(lay.boxes[r]))
            offs[r] += k
        fulls.append(full)
    outs = fn(fulls) if mine else []
    # 2. result boxes -> their ranks
    parts2: list = [[] for _ in range(world)]
    for j, o in zip(mine, outs):
        for r in range(world):
            parts2[r].append(o[box_slices(lays[j].boxes[r])].reshape(-1).to(wire))
    in2 = [sum(p.numel() for p in parts2[r]) for r in range(world)]
    out2 = [sum(lays[j].numel(rank) for j in range(n) if owner[j] == r) for r in range(world)]
    flat2 = [p for ps in parts2 for p in ps]
    send2 = torch.cat(flat2) if flat2 else torch.empty(0, dtype=wire, device=device)
    recv2 = torch.empty(sum(out2), dtype=wire, device=device)
    all_to_all(recv2, send2, out2, in2, group, tag, rank)
    pieces2 = list(recv2.split(out2))
    offs = [0] * world
    res = []
    for j in range(n):
        r, k = owner[j], lays[j].numel(rank)
        res.append(pieces2[r][offs[r] : offs[r] + k].view(_box_shape(lays[j].box)).to(locals_[j].dtype))
        offs[r] += k
    return res


def owner_map(lays: list[ShardLayout]) -> dict[Any, list[int]]:
    """Jobs grouped by process group (first-appearance order, the same on every rank since every
    rank walks the same parameters): ``{key: [job indices]}``; replicated jobs under ``None``."""
    out: dict[Any, list[int]] = {}
    for j, lay in enumerate(lays):
        out.setdefault(None if lay.group is None else id(lay.group), []).append(j)
    return out


def box_owner_compute(
    tensors: list[Any], costs: list[float], fn: Callable[[list[torch.Tensor]], list[torch.Tensor]], tag: str
) -> list[torch.Tensor]:
    """``fn(list of full tensors) -> list of full results`` (same shapes) for DTensors of any
    supported layout, each job computed once per replica group by an owner rank. Returns this
    rank's local parts of the results (plain tensors in the layout of ``tensors``' local parts)."""
    lays: list[ShardLayout] = [shard_layout(t) for t in tensors]
    out: list[Any] = [None] * len(tensors)
    for key, idx in owner_map(lays).items():
        locs = [tensors[j].to_local() for j in idx]
        if key is None:  # replicated everywhere: every rank computes (no communication)
            res = fn(locs)
        else:
            res = owner_compute_boxes(locs, [lays[j] for j in idx], [costs[j] for j in idx], fn, tag)
        for j, r in zip(idx, res):
            out[j] = r
    return out
