"""Work distribution primitives: greedy assignment of work units to ranks, replicated work
computed once across ranks (:func:`spread`), and whole-matrix work on row-sharded tensors done by
one owner rank per matrix (:func:`owner_compute`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .comm import all_gather, all_to_all
from .comm import world as group_world

__all__ = ["assign", "common_dtype", "spread", "owner_compute", "msign_cost"]


def assign(costs: Sequence[float], world: int) -> list[int]:
    """Deterministic greedy (longest first) assignment of work units to ranks: ``owner[i]``."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += costs[i]
    return owner


def common_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    out: torch.dtype | None = None
    for dt in dtypes:
        out = dt if out is None else torch.promote_types(out, dt)
    if out is None:
        raise ValueError("common_dtype of no tensors")
    return out


def spread(
    numels: Sequence[int],
    costs: Sequence[float],
    compute: Callable[[list[int]], list[torch.Tensor]],
    dtype: torch.dtype,
    device: Any,
    group: Any,
    tag: str,
) -> list[torch.Tensor]:
    """Replicated work, computed once across ranks: rank ``r`` runs ``compute(indices)`` for its
    share (a list of result tensors, one per index, ``numels[i]`` elements each), then one
    ``all_gather`` gives every rank every result, returned as flat ``dtype`` tensors."""
    world, rank = group_world(group)
    owner = assign(costs, world)
    mine = [i for i in range(len(numels)) if owner[i] == rank]
    sizes = [0] * world
    for i, n in enumerate(numels):
        sizes[owner[i]] += n
    width = max(sizes) if sizes else 0
    buf = torch.zeros(width, dtype=dtype, device=device)
    if mine:
        outs = compute(mine)
        off = 0
        for i, o in zip(mine, outs):
            buf[off : off + numels[i]] = o.reshape(-1).to(dtype)
            off += numels[i]
    full = torch.empty(world * width, dtype=dtype, device=device)
    all_gather(full, buf, group, tag)
    offs = [r * width for r in range(world)]
    res = []
    for i, n in enumerate(numels):
        r = owner[i]
        res.append(full[offs[r] : offs[r] + n])
        offs[r] += n
    return res


def owner_compute(
    locals_: Sequence[torch.Tensor],
    shapes: Sequence[tuple[int, ...]],
    ranges: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
    costs: Sequence[float],
    fn: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    group: Any,
    tag: str,
) -> list[torch.Tensor]:
    """Whole-matrix work on row-sharded tensors, each computed by one owner rank.

    Job ``j`` is a tensor of global shape ``shapes[j]`` of which this rank holds rows
    ``ranges[j][0][r]:ranges[j][1][r]`` (``locals_[j]``). One ``all_to_all`` sends every job's
    shards to its owner, which calls ``fn(list of full tensors) -> list of full results`` (same
    shapes) on all of its jobs at once; a second ``all_to_all`` returns each rank its rows of every
    result. Returns the local result shards (dtype of the inputs)."""
    world, rank = group_world(group)
    n = len(locals_)
    owner = assign(costs, world)
    wire = common_dtype(t.dtype for t in locals_)
    device = locals_[0].device
    trail = [math.prod(shapes[j][1:]) for j in range(n)]

    def rows(j: int, r: int) -> int:
        return ranges[j][1][r] - ranges[j][0][r]

    mine = [j for j in range(n) if owner[j] == rank]
    # 1. shards -> owners
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for j in range(n):
        parts[owner[j]].append(locals_[j].reshape(-1).to(wire))
    out_splits = [sum(rows(j, r) * trail[j] for j in mine) for r in range(world)]
    pieces = _exchange(parts, out_splits, wire, device, group, tag, rank)
    offs = [0] * world
    fulls = []
    for j in mine:
        chunks = []
        for r in range(world):
            k = rows(j, r) * trail[j]
            chunks.append(pieces[r][offs[r] : offs[r] + k])
            offs[r] += k
        fulls.append(torch.cat(chunks).view(shapes[j]).to(locals_[j].dtype))
    outs = fn(fulls) if mine else []
    # 2. result rows -> their ranks
    parts2: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for j, o in zip(mine, outs):
        for r in range(world):
            parts2[r].append(o[ranges[j][0][r] : ranges[j][1][r]].reshape(-1).to(wire))
    out2 = [sum(rows(j, rank) * trail[j] for j in range(n) if owner[j] == r) for r in range(world)]
    pieces2 = _exchange(parts2, out2, wire, device, group, tag, rank)
    offs = [0] * world
    res = []
    for j in range(n):
        r = owner[j]
        k = rows(j, rank) * trail[j]
        res.append(pieces2[r][offs[r] : offs[r] + k].view((rows(j, rank),) + tuple(shapes[j][1:])).to(locals_[j].dtype))
        offs[r] += k
    return res


def _exchange(
    parts: list[list[torch.Tensor]],
    out_splits: list[int],
    wire: torch.dtype,
    device: Any,
    group: Any,
    tag: str,
    rank: int,
) -> list[torch.Tensor]:
    """One ``all_to_all``: ``parts[r]`` (flat pieces) go to rank ``r``; returns what each rank sent here."""
    in_splits = [sum(p.numel() for p in parts[r]) for r in range(len(parts))]
    flat = [p for ps in parts for p in ps]
    send = torch.cat(flat) if flat else torch.empty(0, dtype=wire, device=device)
    recv = torch.empty(sum(out_splits), dtype=wire, device=device)
    all_to_all(recv, send, out_splits, in_splits, group, tag, rank)
    return list(recv.split(out_splits))


def msign_cost(shape: Sequence[int]) -> float:
    m, n = shape[-2], shape[-1]
    return float(m) * n * min(m, n)
