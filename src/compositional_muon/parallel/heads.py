"""Per-head msigns of sharded attention weights (PerHeadMuon) without gathering the weights.

A head block of a weight ``W`` (nn.Linear layout, out x in) is ``d`` consecutive indices along its
head axis: a ``d x D`` row block of ``q``/``k``/``v``, the transposed ``D x d`` column block of
``o``. Each block gets its own ``msign``. Where a block lives is read from the placements with
:func:`~.layout.factor_layout` (the machinery CM's sharded path uses):

* **local**: every block of the weight lies whole on one rank (TP's column-parallel ``q``/``k``/``v``
  rows, TP's row-parallel ``o`` columns, FSDP2's ``q``/``k``/``v`` rows when ``d`` divides the
  chunks): each rank orthogonalizes its own blocks, **no communication**;
* **width**: the blocks' ``D``-long width is split (FSDP2's ``o`` rows; FSDP x TP's ``o`` box, width
  rows over ``dp``, head columns over ``tp``): ``msign(X) = Q(S) X`` from the all-reduced ``d x d``
  Gram ``S = sum_r X_r X_r^T`` (:func:`.gram_msign.gram_msign`): ``d^2`` numbers per head
  instead of ``d D``;
* **gather**: anything else (a head straddling a shard boundary, mixed layouts): the exact
  fallback, the weight's direction all-gathered (its full bytes) and the blocks' msigns spread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..attention import head_view
from .comm import all_reduce
from .gram_msign import gram_msign
from .layout import Factor, factor_layout, gather_full, is_dtensor, local, local_heads

__all__ = ["head_route", "local_blocks", "width_msigns", "head_updates"]

Block = Sequence[int]  # [param index, axis, offset, stride, n, d]


def head_route(p: Any, blocks: Sequence[Block]) -> tuple[str, list[Factor]]:
    """``("local" | "width" | "gather", factors)`` for the head ``blocks`` of parameter ``p``.

    Plain tensors take "gather" (a no-op gather; DDP spreads their msigns). "width" needs every
    block width-split over one process group and ``d <= D``."""
    if not is_dtensor(p):
        return "gather", []
    fs = [factor_layout(p, (axis, offset, stride), n, d) for _, axis, offset, stride, n, d in blocks]
    modes = {f.mode for f in fs}
    if modes <= {"heads", "full"}:
        return "local", fs
    if modes == {"width"}:
        groups = {id(f.rows.group) for f in fs if f.rows is not None}
        width = [p.size(1 - blk[1]) for blk in blocks]
        if len(groups) == 1 and all(f.rows is not None for f in fs) and all(b[5] <= w for b, w in zip(blocks, width)):
            return "width", fs
    return "gather", fs


def local_blocks(t: torch.Tensor, blocks: Sequence[Block], fs: Sequence[Factor]) -> list[torch.Tensor]:
    """Views ``(heads here, d, width here)`` of the blocks in this rank's local part ``t``."""
    return [local_heads(t, (axis, offset, stride), f, d) for (_, axis, offset, stride, _, d), f in zip(blocks, fs)]


def width_msigns(
    items: list[tuple[torch.Tensor, Any, int]],
    backend: str,
    steps: int | None,
    tag: str,
) -> list[torch.Tensor]:
    """``msign`` of width-split head blocks: ``items`` are ``(X, group, D)`` with ``X`` this rank's
    ``(heads, d, D_r)`` part of ``heads`` blocks of full width ``D``; one ``all_reduce`` of the
    ``d x d`` Grams per process group (first-appearance order, the same on every rank of it).
    Returns this rank's ``(heads, d, D_r)`` parts of the msigns."""
    out: list[Any] = [None] * len(items)
    by_group: dict[int, list[int]] = {}
    for j, (_, group, _) in enumerate(items):
        by_group.setdefault(id(group), []).append(j)
    for idx in by_group.values():
        grams = [_gram(items[j][0]) for j in idx]
        flat = all_reduce(torch.cat([s.reshape(-1) for s in grams]), items[idx[0]][1], tag)
        off = 0
        for j, s in zip(idx, grams):
            X, _, D = items[j]
            S = flat[off : off + s.numel()].view_as(s)
            off += s.numel()
            out[j] = gram_msign(X, S, D, backend, steps)
    return out


def _gram(X: torch.Tensor) -> torch.Tensor:
    """``X X^T`` per head (float32 at least)."""
    Xf = X.to(torch.promote_types(X.dtype, torch.float32))
    return Xf @ Xf.mT


MatrixFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def head_updates(
    dirs: dict[int, Any],
    blocks_of: dict[int, list[Block]],
    local_fn: MatrixFn,
    spread_fn: MatrixFn,
    backend: str,
    steps: int | None,
    scale: Callable[[int, int], float],
) -> dict[int, tuple[torch.Tensor, bool]]:
    """Every head block's ``scale(d, D) msign`` written into an update per parameter.

    ``dirs``: Muon directions by parameter index (DTensors or plain); ``local_fn``: msign of a list
    of (batched) matrices on this rank only; ``spread_fn``: msign of a list of full matrices that
    every rank holds (spread over the ranks, see :meth:`Muon._orthogonalize`). Returns
    ``{index: (update, is_local)}``: the local part of the update when ``is_local``, else the
    full update (the caller keeps its part)."""
    out: dict[int, tuple[torch.Tensor, bool]] = {}
    local_x: list = []
    local_dst: list = []
    width_x: list = []
    width_dst: list = []
    spread_x: list = []
    spread_dst: list = []
    for i, u in dirs.items():
        blocks = blocks_of[i]
        route, fs = head_route(u, blocks)
        if route == "gather":
            full = gather_full(u, "per_head.gather")
            upd = torch.zeros_like(full)
            for _, axis, offset, stride, n, d in blocks:
                spread_x.extend(head_view(full, axis, offset, stride, n, d).unbind(0))
                spread_dst.append(head_view(upd, axis, offset, stride, n, d))
            out[i] = (upd, False)
            continue
        loc = local(u)
        upd = torch.zeros_like(loc)
        xs, ds = local_blocks(loc, blocks, fs), local_blocks(upd, blocks, fs)
        if route == "local":
            local_x.extend(xs)
            local_dst.extend(ds)
        else:
            width_x.extend(
                (x, f.rows.group if f.rows is not None else None, u.size(1 - b[1])) for x, f, b in zip(xs, fs, blocks)
            )
            width_dst.extend(ds)
        out[i] = (upd, True)
    wz = width_msigns(width_x, backend, steps, "per_head.gram") if width_x else []
    sz = spread_fn(spread_x) if spread_x else []
    lz = local_fn(local_x) if local_x else []
    full_w = [x[2] for x in width_x]
    _write(local_dst, lz, scale, [None] * len(lz))
    _write(width_dst, wz, scale, full_w)
    _write(spread_dst, _restack(sz, spread_dst), scale, [None] * len(spread_dst))
    return out


def _restack(zs: list[torch.Tensor], dst: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-head results back into one ``(heads, d, D)`` stack per block."""
    out, k = [], 0
    for v in dst:
        n = v.size(0)
        out.append(torch.stack(zs[k : k + n]) if n else v.new_empty(v.shape))
        k += n
    return out


def _write(dst: list, zs: list, scale: Callable[[int, int], float], widths: list) -> None:
    """``dst[i] <- scale(d, D) zs[i]`` (``D``: the full width, ``widths[i]`` or the view's own)."""
    for v, z, w in zip(dst, zs, widths):
        v.copy_(z.to(v.dtype) * scale(v.size(-2), v.size(-1) if w is None else w))
