"""Parallel strategies: how the work of one step is spread over processes.

A :class:`Strategy` answers two questions for the tensors it is chosen for (by
:class:`~compositional_muon.parallel.select.Parallel`):

* :meth:`Strategy.matrices`: the msign (or any whole-matrix function) of a list of matrices;
* :meth:`Strategy.cm_group`: the CM updates of a param group's factor pairs, as typed
  :class:`~compositional_muon.plan.PairBatch` es (computed, not yet written).

The CM math is :func:`~compositional_muon.cm.kernel.pair_update`; a strategy only decides which
process computes which layers/heads and supplies a :class:`~compositional_muon.cm.kernel.PairReducer`
where a pair's pieces are spread. Four strategies exist: :class:`SingleProcess`,
:class:`ReplicatedWorkSharing` (DDP), :class:`ShardedDTensor` (FSDP2) and :class:`GatherFallback`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..buckets import group_limit, pack, pair_work_bytes
from ..cm.config import CMConfig
from ..cm.functional import cm_momentum
from ..cm.kernel import ZTransform, pair_update
from ..msign import default_msign_dtype
from ..plan import PairBatch, PairEntry, PairLayout
from .work import common_dtype, msign_cost, spread

__all__ = ["Strategy", "SingleProcess", "ReplicatedWorkSharing", "CMGroupStep", "MatrixFn", "local_buckets"]

Tensor = torch.Tensor
MatrixFn = Callable[[list[Tensor]], list[Tensor]]
TransformFactory = Callable[[list[PairEntry], CMConfig, dict[str, Tensor]], ZTransform]
LocalWork = tuple[PairBatch, CMConfig, Tensor, Tensor]


@dataclass
class CMGroupStep:
    """Everything a strategy needs to compute one CM param group's updates.

    ``pairs``: the group's typed layouts; ``params``: the group's parameters (``HeadRef.index``
    points into them); ``state``: the optimizer's per-parameter state (``momentum_buffer``,
    ``head_moment``); ``transform``: the normuon factory (None for transform="none"); ``warn``:
    a once-per-key warning callback ``(key, message)``; ``bucket_bytes``: the byte cap of the
    streamed buckets (:mod:`compositional_muon.buckets`; None: one bucket per shape)."""

    group: dict[str, Any]
    cfg: CMConfig
    pairs: list[PairLayout]
    params: list[Tensor]
    state: Any
    transform: TransformFactory | None
    warn: Callable[[str, str], None]
    bucket_bytes: int | None = None

    @property
    def eta(self) -> float:
        return float(self.group["lr"])

    def momentum(
        self, A: Tensor, B: Tensor, ga: Tensor, gb: Tensor, ma: Tensor, mb: Tensor, cfg: CMConfig
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(new_ma, new_mb, ua, ub)`` with the group's momentum settings."""
        g = self.group
        return cm_momentum(
            A,
            B,
            ga,
            gb,
            ma,
            mb,
            beta=g["momentum"],
            nesterov=g["nesterov"],
            momentum_reproject=g["momentum_reproject"],
            cfg=cfg,
        )

    def ready_pairs(self) -> list[tuple[PairLayout, Tensor, Tensor]]:
        """The pairs whose two parameters have gradients (a pair with a missing gradient is skipped whole)."""
        out = []
        for pair in self.pairs:
            pa, pb = self.params[pair.a.index], self.params[pair.b.index]
            if pa.grad is not None and pb.grad is not None:
                out.append((pair, pa, pb))
        return out


class Strategy:
    """How work is spread over processes. Subclasses override what differs from one process.

    A new strategy (tensor parallel, HSDP, expert parallel) is one subclass: implement
    :meth:`matrices` and :meth:`cm_group` for the layouts it handles (a sharded pair supplies a
    :class:`~compositional_muon.cm.kernel.PairReducer` to ``pair_update``), and a ``claims``
    classmethod; register it with :meth:`Parallel.register
    <compositional_muon.parallel.select.Parallel.register>`. See ``docs/architecture.md``.
    """

    name = "strategy"

    @classmethod
    def claims(cls, t: Tensor, parallel: Any) -> bool:
        """Whether this strategy handles tensor ``t`` (a parameter or direction) under ``parallel``."""
        return False

    def matrices(self, mats: list[Tensor], compute: MatrixFn) -> list[Tensor]:
        """``compute`` (a batched, shape-preserving whole-matrix map) of every matrix, in the layout of ``mats``."""
        raise NotImplementedError

    def cm_group(self, step: CMGroupStep) -> list[PairBatch]:
        """The CM updates of the group's pairs (``dA``/``dB`` filled, nothing written)."""
        raise NotImplementedError

    #: whether :meth:`cm_buckets` streams (one byte-capped bucket at a time)
    streams = False

    def cm_buckets(self, step: CMGroupStep) -> Iterator[list[PairBatch]]:
        """The group's CM updates as successive lists of batches; the optimizer checks and writes
        each list before asking for the next, so only one is held at a time. The default is the
        whole group at once (:meth:`cm_group`)."""
        yield self.cm_group(step)


def local_buckets(step: CMGroupStep) -> list[tuple[str, list[PairEntry]]]:
    """The ready pairs of plain (non-DTensor) parameters as ``(kind, entries)`` buckets: same-shape
    pairs together, cut into runs whose estimated working memory
    (:func:`~compositional_muon.buckets.pair_work_bytes`) stays under the group's limit
    (:func:`~compositional_muon.buckets.group_limit` of the bytes of every pair's weights)."""
    normuon = step.transform is not None
    keyed: dict[tuple[Any, ...], list[PairEntry]] = {}
    for pair, pa, pb in step.ready_pairs():
        A, B = pair.views(pa, pb)
        st_a, st_b = step.state[pa], step.state[pb]
        entry = PairEntry(
            name=pair.name,
            w=(A, B),
            g=pair.views(_grad(pa), _grad(pb)),
            m=pair.views(st_a["momentum_buffer"], st_b["momentum_buffer"]),
            v=pair.views(st_a["head_moment"], st_b["head_moment"]) if normuon else None,
        )
        key = (pair.kind, tuple(A.shape), tuple(B.shape), pa.dtype, pb.dtype)
        keyed.setdefault(key, []).append(entry)
    entries = [e for run in keyed.values() for e in run]
    limit = group_limit(sum(w.numel() * w.element_size() for e in entries for w in e.w), step.bucket_bytes)
    work = step.cfg.msign_dtype or (default_msign_dtype(entries[0].w[0].device) if entries else None)
    out = []
    for key, run in keyed.items():
        costs = [sum(pair_work_bytes(w.numel(), w.dtype, work) for w in e.w) for e in run]
        out += [(key[0], [run[i] for i in idx]) for idx in pack(costs, limit)]
    return out


def stack_views(views: list[Tensor]) -> Tensor:
    """Same-shape head views stacked along a new layer dim ``(L, ...)``, each layer in the memory
    layout of its view: a view that is a permutation of a dense block (the rows of a q/k/v weight,
    the columns of ``W_o``) is stacked in its memory order and permuted back, so bucketing never
    changes the layout a kernel reads (results do not depend on the buckets, bit for bit), and a
    single such view is returned as a ``(1, ...)`` view of itself, not copied (a byte-capped
    bucket often holds one pair). Other views are stacked contiguously. Callers read the result
    before anything is written."""
    v = views[0]
    order = sorted(range(v.ndim), key=lambda i: -v.stride()[i])
    if not v.permute(order).is_contiguous():
        return torch.stack(views)
    if len(views) == 1:
        return v.unsqueeze(0)
    back = [0] + [1 + order.index(i) for i in range(v.ndim)]
    return torch.stack([x.permute(order) for x in views]).permute(back)


def stack_bucket(step: CMGroupStep, kind: str, entries: list[PairEntry]) -> LocalWork:
    """One bucket's weights stacked with its new momenta: ``(batch, pair config, ua, ub)``, with
    ``dA``/``dB`` still empty (the stacked gradients and old momenta are freed on return). With
    one pair, ``batch.A``/``batch.B`` are views of the weights (:func:`stack_views`): the write
    reads them before it updates the weights."""
    A, B, ga, gb, ma, mb = (stack_views([getattr(e, f)[i] for e in entries]) for f in "wgm" for i in (0, 1))
    new_ma, new_mb, ua, ub = step.momentum(A, B, ga, gb, ma, mb, step.cfg)
    batch = PairBatch(entries=entries, kind=kind, A=A, B=B, new_ma=new_ma, new_mb=new_mb)
    return batch, step.cfg.for_kind(kind), ua, ub


def bucket_config(step: CMGroupStep, cfg: CMConfig, A: Tensor) -> CMConfig:
    """The pair config a bucket is computed with: normuon's rows are defined in the symmetric
    root's basis, so ``root_method="auto"`` resolves to it there."""
    if step.transform is not None and cfg.root_method == "auto":
        return dataclasses.replace(cfg, root_method=_symmetric_root(A))
    return cfg


class SingleProcess(Strategy):
    """Everything on this process: one batched kernel call per byte-capped bucket, streamed."""

    name = "single"
    streams = True

    def matrices(self, mats: list[Tensor], compute: MatrixFn) -> list[Tensor]:
        return compute(mats)

    def cm_group(self, step: CMGroupStep) -> list[PairBatch]:
        return [batch for bucket in self.cm_buckets(step) for batch in bucket]

    def cm_buckets(self, step: CMGroupStep) -> Iterator[list[PairBatch]]:
        for kind, entries in local_buckets(step):
            yield [self._update(step, *stack_bucket(step, kind, entries))]

    @staticmethod
    def _update(step: CMGroupStep, batch: PairBatch, cfg: CMConfig, ua: Tensor, ub: Tensor) -> PairBatch:
        cfg = bucket_config(step, cfg, batch.A)
        zt = None
        moments: dict[str, Tensor] = {}
        if step.transform is not None:
            zt = step.transform(batch.entries, cfg, moments)
        batch.dA, batch.dB = pair_update(batch.A, batch.B, ua, ub, step.eta, cfg, z_transform=zt)
        if zt is not None:
            batch.new_va, batch.new_vb = moments["new_va"], moments["new_vb"]
        return batch


def _grad(p: Tensor) -> Tensor:
    if p.grad is None:
        raise RuntimeError("a CM pair without a gradient reached the update")
    return p.grad


def _symmetric_root(A: Tensor) -> str:
    return "eigh" if A.device.type == "cpu" else "newton"


class ReplicatedWorkSharing(Strategy):
    """Replicated parameters (DDP): every rank holds everything; each rank computes a share of the
    msigns / CM layers (greedy balance by cost) and one ``all_gather`` per call gives every rank
    every result, so all ranks apply identical updates."""

    name = "replicated"

    def __init__(self, group: Any):
        self.group = group

    def matrices(self, mats: list[Tensor], compute: MatrixFn) -> list[Tensor]:
        dtype = common_dtype(u.dtype for u in mats)
        flat = spread(
            [u.numel() for u in mats],
            [msign_cost(u.shape) for u in mats],
            lambda idx: compute([mats[i] for i in idx]),
            dtype,
            mats[0].device,
            self.group,
            "muon.msign",
        )
        return [f.view(u.shape).to(u.dtype) for f, u in zip(flat, mats)]

    streams = True

    def cm_group(self, step: CMGroupStep) -> list[PairBatch]:
        return [batch for bucket in self.cm_buckets(step) for batch in bucket]

    def cm_buckets(self, step: CMGroupStep) -> Iterator[list[PairBatch]]:
        # every rank builds the same buckets (same shapes, same gradients present) in the same order
        for kind, entries in local_buckets(step):
            work = [stack_bucket(step, kind, entries)]
            self._spread_pair_updates(work, step.eta)
            yield [work.pop()[0]]  # nothing of this bucket stays referenced here while the next is stacked

    def _spread_pair_updates(self, work: list[LocalWork], eta: float) -> None:
        """Fill ``dA``/``dB`` of every batch, each rank computing ``pair_update`` for a share of the
        layers (greedy over all of ``work``), then one ``all_gather``."""
        units, numels, costs = [], [], []
        for e, (batch, _, ua, ub) in enumerate(work):
            L, H, d, D = batch.A.shape
            hkv = batch.B.size(1)
            for i in range(L):
                units.append((e, i))
                numels.append(ua[i].numel() + ub[i].numel())
                costs.append(float(H + hkv) * d * d * D)

        def compute(idx: list[int]) -> list[Tensor]:
            by_entry: dict[int, list[int]] = {}
            for i in idx:
                e, layer = units[i]
                by_entry.setdefault(e, []).append(layer)
            res = {}
            for e, ls in by_entry.items():
                batch, cfg, ua, ub = work[e]
                sel = torch.tensor(ls, device=batch.A.device)
                A, B, ua_l, ub_l = (t.index_select(0, sel) for t in (batch.A, batch.B, ua, ub))
                dA, dB = pair_update(A, B, ua_l, ub_l, eta, cfg)
                for j, layer in enumerate(ls):
                    res[(e, layer)] = torch.cat([dA[j].reshape(-1), dB[j].reshape(-1)])
            return [res[units[i]] for i in idx]

        dtype = common_dtype(t.dtype for _, _, ua, ub in work for t in (ua, ub))
        flat = spread(numels, costs, compute, dtype, work[0][0].A.device, self.group, "cm.spread")
        for e, (batch, _, ua, ub) in enumerate(work):
            na = ua[0].numel()
            mine = [flat[i] for i, (ue, _) in enumerate(units) if ue == e]
            batch.dA = torch.stack([f[:na].view(ua.shape[1:]) for f in mine]).to(ua.dtype)
            batch.dB = torch.stack([f[na:].view(ub.shape[1:]) for f in mine]).to(ub.dtype)
