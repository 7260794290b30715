"""DTensor strategies: FSDP2's dim-0 row shards (:class:`ShardedDTensor`) and the gather fallback
for every layout it cannot handle shard-locally (:class:`GatherFallback`).

Muon-family msigns on row shards go to one owner rank per matrix and back (two ``all_to_all``).
CM exploits its structure: a factor whose heads are rows of the sharded dim ("heads": separate
``q``/``k``/``v``) is updated where its heads live, so an aligned QK pair needs no communication;
a factor whose heads are columns ("width": ``o_proj``) needs its partner Grams and per-head msign
Grams all-reduced (:class:`~compositional_muon.parallel.reducer.ShardedReducer`). Pairs whose
heads straddle shards, or variants that are not head-local, use :class:`GatherFallback`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..cm.config import CMConfig
from ..cm.functional import apply_update
from ..cm.kernel import pair_update
from ..plan import PairBatch, PairEntry, PairLayout
from .comm import all_reduce
from .layout import (
    Factor,
    factor_layout,
    from_local,
    gather_full,
    is_dtensor,
    local,
    local_heads,
    local_part,
    reshard,
    row_sharding,
)
from .reducer import ShardedReducer
from .strategy import CMGroupStep, MatrixFn, Strategy, _grad
from .work import msign_cost, owner_compute

__all__ = ["ShardedDTensor", "GatherFallback", "pair_path"]

Tensor = torch.Tensor


class GatherFallback(Strategy):
    """Any DTensor layout: gather the full tensors, compute as one process would (on every rank),
    and keep this rank's part. Correct for every layout; costs a full gather per tensor."""

    name = "gather"

    @classmethod
    def claims(cls, t: Tensor, parallel: Any) -> bool:
        return is_dtensor(t)

    def matrices(self, mats: list[Tensor], compute: MatrixFn) -> list[Tensor]:
        fulls = [gather_full(u, "muon.msign") for u in mats]
        return [reshard(z, u) for u, z in zip(mats, compute(fulls))]

    def cm_group(self, step: CMGroupStep) -> list[PairBatch]:
        return [self.cm_pair(step, pair, pa, pb) for pair, pa, pb in step.ready_pairs()]

    def cm_pair(self, step: CMGroupStep, pair: PairLayout, pa: Tensor, pb: Tensor) -> PairBatch:
        """Gather the pair's full weights, gradients and momenta, compute its update, and return a
        batch whose ``apply`` writes back only this rank's rows of the pair's heads."""
        uniq = [pa] if pa is pb else [pa, pb]
        full = {}
        for p in uniq:
            m = step.state[p]["momentum_buffer"]
            full[id(p)] = tuple(gather_full(t, "cm.fallback") for t in (p.detach(), _grad(p), m))

        def views(i: int) -> tuple[Tensor, Tensor]:
            a, b = pair.views(full[id(pa)][i], full[id(pb)][i])
            return a.unsqueeze(0), b.unsqueeze(0)

        (A, B), (ga, gb), (ma, mb) = views(0), views(1), views(2)
        cfg = step.cfg.for_kind(pair.kind)
        new_ma, new_mb, ua, ub = step.momentum(A, B, ga, gb, ma, mb, cfg)
        dA, dB = pair_update(A, B, ua, ub, step.eta, cfg)

        def apply(decay: float) -> None:
            for p in uniq:
                w, _, m = full[id(p)]
                new_w, new_m = w.clone(), m.clone()
                mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
                for q, ref, n, dX, nm in (
                    (pa, pair.a, pair.num_heads, dA, new_ma),
                    (pb, pair.b, pair.num_kv_heads, dB, new_mb),
                ):
                    if q is p:
                        apply_update(ref.view(new_w, n, pair.head_dim), dX[0], decay)
                        ref.view(new_m, n, pair.head_dim).copy_(nm[0])
                        ref.view(mask, n, pair.head_dim).fill_(True)
                for dst, src in ((p, new_w), (step.state[p]["momentum_buffer"], new_m)):
                    loc = local(dst)
                    loc.copy_(torch.where(local_part(mask, dst), local_part(src, dst).to(loc.dtype), loc))

        return PairBatch(
            entries=[], names=[pair.name], kind=pair.kind, A=A, B=B, new_ma=new_ma, new_mb=new_mb,
            dA=dA, dB=dB, path="gather", stats=False, apply=apply,
        )  # fmt: skip


class ShardedDTensor(Strategy):
    """DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2's ``fully_shard``)."""

    name = "sharded"

    def __init__(self, group: Any = None):
        self.group = group

    @classmethod
    def claims(cls, t: Tensor, parallel: Any) -> bool:
        return row_sharding(t) is not None

    def matrices(self, mats: list[Any], compute: MatrixFn) -> list[Tensor]:
        rows = [row_sharding(u) for u in mats]
        zs = owner_compute(
            [u.to_local() for u in mats],
            [tuple(u.shape) for u in mats],
            [(r.starts, r.ends) for r in rows if r is not None],
            [msign_cost(u.shape) for u in mats],
            compute,
            self.group,
            "muon.msign",
        )
        return [from_local(z.contiguous(), u) for u, z in zip(mats, zs)]

    def cm_group(self, step: CMGroupStep) -> list[PairBatch]:
        buckets: dict[tuple[Any, ...], list[tuple[PairLayout, Tensor, Tensor, Factor, Factor]]] = {}
        key: tuple[Any, ...]
        pg = None
        plan: list[PairBatch] = []
        for pair, pa, pb in step.ready_pairs():
            fa = factor_layout(pa, pair.a.slot, pair.num_heads, pair.head_dim)
            fb = factor_layout(pb, pair.b.slot, pair.num_kv_heads, pair.head_dim)
            D = pa.shape[1 - pair.a.axis]
            path, reason = pair_path(fa, fb, pair, D, step.cfg.for_kind(pair.kind), step.group["momentum_reproject"])
            for f in (fa, fb):  # agree over every rank holding a part (the widest group seen)
                if f.rows is not None and (pg is None or f.whole is not None):
                    pg = f.all_group
            if path == "gather":
                step.warn(
                    pair.name,
                    f"CompositionalMuon under FSDP2/DTensor: {pair.name!r}: {reason}; "
                    "its update uses the gather fallback (full weights, gradients and momenta are "
                    "all-gathered and the update computed on every rank). See docs/distributed.md.",
                )
                plan.append(GatherFallback().cm_pair(step, pair, pa, pb))
                continue
            key = (path, pair.kind, tuple(pa.shape), tuple(pb.shape), pair.a.slot, pair.b.slot)
            key += (pair.num_heads, pair.num_kv_heads, pair.head_dim, pa.dtype, pb.dtype, pa is pb)
            buckets.setdefault(key, []).append((pair, pa, pb, fa, fb))
        plan = [self._batch(step, key[0], items) for key, items in buckets.items()] + plan
        _agree_finite(plan, pg, step.params[0].device)
        return plan

    def _batch(
        self, step: CMGroupStep, path: str, items: list[tuple[PairLayout, Tensor, Tensor, Factor, Factor]]
    ) -> PairBatch:
        pair0, pa0, _, fa, fb = items[0]
        d = pair0.head_dim
        entries = []
        for pair, pa, pb, _, _ in items:

            def views(ta: Tensor, tb: Tensor, pair: PairLayout = pair) -> tuple[Tensor, Tensor]:
                return local_heads(local(ta), pair.a.slot, fa, d), local_heads(local(tb), pair.b.slot, fb, d)

            st_a, st_b = step.state[pa], step.state[pb]
            entries.append(
                PairEntry(
                    pair.name,
                    views(pa, pb),
                    views(_grad(pa), _grad(pb)),
                    views(st_a["momentum_buffer"], st_b["momentum_buffer"]),
                )
            )
        A, B, ga, gb, ma, mb = (torch.stack([getattr(e, f)[i] for e in entries]) for f in "wgm" for i in (0, 1))
        new_ma, new_mb, ua, ub = step.momentum(A, B, ga, gb, ma, mb, step.cfg)
        cfg = step.cfg.for_kind(pair0.kind)
        if path == "sharded" and fa.rows is not None:
            D = pa0.shape[1 - pair0.a.axis]
            reducer = ShardedReducer(fa, fb, pair0.num_heads, pair0.num_kv_heads, D, fa.rows.group, f"cm.{pair0.kind}")
            dA, dB = pair_update(A, B, ua, ub, step.eta, cfg, reducer=reducer)
        elif A.size(1) and B.size(1):
            dA, dB = pair_update(A, B, ua, ub, step.eta, cfg)
        else:  # this rank holds none of the pair's heads
            dA, dB = torch.zeros_like(ua), torch.zeros_like(ub)
        return PairBatch(entries, pair0.kind, A, B, new_ma, new_mb, dA, dB, path=path, stats=False)


def pair_path(fa: Factor, fb: Factor, pair: PairLayout, D: int, cfg: CMConfig, reproject: bool) -> tuple[str, str]:
    """``("local" | "sharded" | "gather", reason)`` for one CM pair (today's selection rules)."""
    modes, G, d = (fa.mode, fb.mode), pair.group_size, pair.head_dim
    if "other" in modes:
        return "gather", "a weight is split along both dims with heads that are not whole or not packed"
    if "split" in modes:
        return "gather", "a head straddles a shard boundary (shards do not align with heads)"
    if "full" in modes:
        if modes == ("full", "full"):
            return "local", ""
        return "gather", "one factor is sharded and the other is not"
    if fa.rows is None or fb.rows is None:
        return "gather", "its factors live on different meshes"
    if fa.whole is not None or fb.whole is not None:
        why = _two_dims_ok(fa, fb, G)
        if why:
            return "gather", why
    elif fa.rows.group is not fb.rows.group:
        return "gather", "its factors live on different meshes"
    if modes == ("heads", "heads"):
        if any(sa != (sb[0] * G, sb[1] * G) for sa, sb in zip(fa.spans, fb.spans)):
            return "gather", "a query/output head is not on the rank of its key/value head"
        if not cfg.per_mat_renorm and not (pair.kind == "ov" and cfg.hybrid):
            return "local", ""
    if fa.mode == "heads" and any(a % G or b % G for a, b in fa.spans):
        return "gather", "a group of heads sharing a key/value head straddles a shard boundary"
    if cfg.method != "half_split":
        return "gather", f"method={cfg.method!r} stacks a width-sharded factor with its partner"
    if cfg.connection != "none" or reproject:
        return "gather", f"connection={cfg.connection!r} couples the shards of a width-sharded factor"
    if d > D:
        return "gather", f"head_dim {d} exceeds the width {D}"
    return "sharded", ""


def _two_dims_ok(fa: Factor, fb: Factor, G: int) -> str:
    """Why a pair whose ``W_o`` (``fa``) is split along both dims cannot take the sharded path
    ("" if it can): the partner heads held by this rank's width peers must be exactly the groups
    of ``fa``'s heads, so one all-reduce over the peers completes both factors' statistics."""
    if fa.whole is None or fb.whole is not None or fb.mode != "heads" or fa.rows is None or fb.rows is None:
        return "a weight is split along both dims and its partner is not split by heads"
    if fa.lo % G or fa.hi % G:
        return "a group of heads sharing a key/value head straddles a shard boundary"
    peers = dist.get_process_group_ranks(fa.rows.group)
    b_ranks = dist.get_process_group_ranks(fb.rows.group)
    if not set(peers) <= set(b_ranks):
        return "its factors live on different meshes"
    held = sorted(s for s in (fb.spans[b_ranks.index(q)] for q in peers) if s[1] > s[0])
    contiguous = bool(held) and all(a[1] == b[0] for a, b in zip(held, held[1:]))
    if not contiguous or (held[0][0], held[-1][1]) != (fa.lo // G, fa.hi // G):
        return "a value head is not on a rank of its output heads' width group"
    return ""


def _agree_finite(plan: list[PairBatch], pg: Any, device: torch.device) -> None:
    flags = [
        bool(torch.isfinite(b.dA).all() and torch.isfinite(b.dB).all())
        for b in plan
        if b.dA is not None and b.dB is not None
    ]
    ok = all(flags)
    if pg is not None:
        t = torch.tensor([1.0 if ok else 0.0], device=device)
        all_reduce(t, pg, "finite", dist.ReduceOp.MIN)
        ok = bool(t.item() > 0)
    for b, f in zip(plan, flags):
        b.finite = f
    if not ok and all(flags) and plan:
        plan[0].finite = False
        plan[0].names = list(plan[0].names) + ["(non-finite on another rank)"]
