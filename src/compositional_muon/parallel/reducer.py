"""The sharded :class:`~compositional_muon.cm.kernel.PairReducer`: what CM's pair update combines
across ranks when its factors are sharded by head ("heads") or by width ("width", FSDP2 ``o_proj``).

* partner statistics: each rank fills its groups' slots; width-sharded factors all-reduce them
  (``2 L Hkv d^2`` numbers, ``2 L Hkv`` if isotropic);
* msigns: per head where a head is whole on this rank; the hybrid ``W_o`` by one owner rank per
  layer (two ``all_to_all``); a width-sharded head from its all-reduced ``d x d`` msign Gram
  (:func:`gram_msign`);
* per_mat_renorm: ``4 L`` square sums all-reduced.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cm.config import CMConfig
from ..cm.kernel import PairReducer
from ..msign import msign
from .box import owner_compute_boxes
from .comm import all_reduce
from .gram_msign import gram_msign
from .layout import Factor
from .mesh import ShardLayout
from .work import msign_cost, owner_compute

__all__ = ["ShardedReducer"]

Tensor = torch.Tensor


class ShardedReducer(PairReducer):
    """Combine a pair whose factors ``fa`` (``A``, ``H`` heads) and ``fb`` (``B``, ``Hkv`` heads) are
    sharded over ``group``; collectives are tagged ``tag + ".gram" / ".msign" / ".hybrid" / ".renorm"``."""

    whole = False

    def __init__(self, fa: Factor, fb: Factor, H: int, hkv: int, D: int, group: Any, tag: str):
        self.fa, self.fb, self.H, self.hkv, self.D = fa, fb, H, hkv, D
        self.group, self.tag = group, tag
        self.width = "width" in (fa.mode, fb.mode)

    def group_size(self, A: Tensor, B: Tensor) -> int:
        return self.H // self.hkv

    def partner_stats(self, Sa: Tensor, Sb: Tensor) -> tuple[Tensor, Tensor]:
        G = self.H // self.hkv
        ga = (self.fa.lo // G, self.fa.hi // G)  # groups of this rank's A heads
        gb = (self.fb.lo, self.fb.hi)  # groups of this rank's B heads
        L, k = Sa.size(0), Sa.size(-1)
        full_a = Sa.new_zeros(L, self.hkv, k, k)
        full_b = Sb.new_zeros(L, self.hkv, k, k)
        full_a[:, ga[0] : ga[1]] = Sa
        full_b[:, gb[0] : gb[1]] = Sb
        if self.width:
            flat = all_reduce(torch.cat([full_a.reshape(-1), full_b.reshape(-1)]), self.group, self.tag + ".gram")
            full_a, full_b = flat[: full_a.numel()].view_as(full_a), flat[full_a.numel() :].view_as(full_b)
        return full_a[:, gb[0] : gb[1]], full_b[:, ga[0] : ga[1]]

    def msign_pair(self, Xa: Tensor, Xb: Tensor, cfg: CMConfig) -> tuple[Tensor, Tensor]:
        ms: dict[str, Any] = dict(backend=cfg.msign_backend, steps=cfg.msign_steps, dtype=cfg.msign_dtype)
        za = self._hybrid_msign(Xa, ms) if cfg.hybrid else None
        by_gram = ([("a", Xa)] if za is None and self.fa.mode == "width" else []) + (
            [("b", Xb)] if self.fb.mode == "width" else []
        )
        out = dict(self._gram_msigns(by_gram, cfg)) if by_gram else {}
        if za is None:
            za = out["a"] if "a" in out else _local_msign(Xa, ms)
        zb = out["b"] if "b" in out else _local_msign(Xb, ms)
        return za, zb

    def sum_norms(self, sq: Tensor) -> Tensor:
        group = self.fa.all_group if self.fa.whole is not None else self.group
        return all_reduce(sq, group, self.tag + ".renorm")

    def _gram_msigns(self, items: list[tuple[str, Tensor]], cfg: CMConfig) -> list[tuple[str, Tensor]]:
        """Width-sharded heads: one all-reduce of every head's ``d x d`` msign Gram, then msign from it."""
        S = [X @ X.mT for _, X in items]
        flat = all_reduce(torch.cat([s.reshape(-1) for s in S]), self.group, self.tag + ".msign")
        out, off = [], 0
        for (name, X), s in zip(items, S):
            s_all = flat[off : off + s.numel()].view_as(s)
            off += s.numel()
            out.append((name, gram_msign(X, s_all, self.D, cfg.msign_backend, cfg.msign_steps)))
        return out

    def _hybrid_msign(self, Xa: Tensor, ms: dict[str, Any]) -> Tensor:
        """One msign per layer of the whole ``(H d) x D`` factor, computed by an owner rank per layer."""
        fa, H, D = self.fa, self.H, self.D
        L, ng, G, d = Xa.size(0), Xa.size(1), Xa.size(2), Xa.size(3)
        if fa.rows is None:
            raise RuntimeError("a sharded factor has no row layout")
        if fa.whole is not None:
            return self._hybrid_boxes(Xa, ms)
        if fa.mode == "width":  # heads are columns: shard rows are the width D -> jobs are M^T (D x H d)
            jobs = [Xa[i].reshape(H * d, Xa.size(-1)).mT.contiguous() for i in range(L)]
            shapes = [(D, H * d)] * L
            ranges = [(fa.rows.starts, fa.rows.ends)] * L

            def fn(fulls: list[Tensor]) -> list[Tensor]:
                return list(msign(torch.stack(fulls).mT, **ms).mT.unbind(0))

        else:  # heads are rows of the shards
            jobs = [Xa[i].reshape(-1, D).contiguous() for i in range(L)]
            shapes = [(H * d, D)] * L
            ranges = [(tuple(s[0] * d for s in fa.spans), tuple(s[1] * d for s in fa.spans))] * L

            def fn(fulls: list[Tensor]) -> list[Tensor]:
                return list(msign(torch.stack(fulls), **ms).unbind(0))

        outs = owner_compute(jobs, shapes, ranges, [msign_cost((H * d, D))] * L, fn, self.group, self.tag + ".hybrid")
        if fa.mode == "width":
            return torch.stack([o.mT for o in outs]).reshape(L, ng, G, d, -1)
        return torch.stack(outs).reshape(L, ng, G, d, D)

    def _hybrid_boxes(self, Xa: Tensor, ms: dict[str, Any]) -> Tensor:
        """The hybrid msign of a ``W_o`` split along both dims (FSDP x TP): every rank's box of the
        kernel-layout ``(H d) x D`` matrix to the layer's owner and back, over all ranks."""
        fa, H, D = self.fa, self.H, self.D
        w, k, d, L = fa.whole, fa.dim, Xa.size(3), Xa.size(0)
        boxes = tuple((b[1 - k], b[k]) for b in w.boxes)  # (head axis, width) of each rank's part
        lay = ShardLayout((H * d, D), w.group, w.rank, w.world, boxes, w.replicas)
        jobs = [Xa[i].reshape(-1, Xa.size(-1)).contiguous() for i in range(L)]

        def fn(fulls: list[Tensor]) -> list[Tensor]:
            return list(msign(torch.stack(fulls), **ms).unbind(0))

        outs = owner_compute_boxes(jobs, [lay] * L, [msign_cost((H * d, D))] * L, fn, self.tag + ".hybrid")
        return torch.stack(outs).reshape(Xa.shape)


def _local_msign(X: Tensor, ms: dict[str, Any]) -> Tensor:
    return msign(X, **ms) if X.numel() else X.clone()
