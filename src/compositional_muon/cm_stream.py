"""The CM half of :meth:`CompositionalMuon.step <compositional_muon.CompositionalMuon.step>`:
byte-capped buckets, computed, checked and written one at a time.

A CM group's ready pairs are cut into buckets (:func:`~compositional_muon.parallel.strategy.local_buckets`:
same-shape pairs together, the estimated working memory of a bucket under the group's limit
``min(bucket_bytes, max(4 MiB, 0.4 x the group's CM weight bytes))``, the rule and the default of
:mod:`compositional_muon.buckets`; a pair over the limit is a bucket of its own). Each bucket is
stacked, its update computed and checked for NaN/inf, its momenta, head moments and weights
written, and its tensors freed before the next bucket is stacked, so the step's transient memory
is about one bucket's, not a multiple of all CM weights.

The all-or-nothing guarantee. The one way finite gradients and weights give a non-finite CM update
short of overflow is the partner root of a singular partner Gram ``G + lam I``: with ``lam = 0``,
or with a ``lam`` so small that the float32 round-off of ``G`` (about ``1e-7`` of its largest
eigenvalue) can outweigh it. So when a group has ``lam <`` :data:`PREPASS_LAM` (``1e-4``; the
default ``lam`` is ``1e-2``), a pre-pass first computes the partner roots the update uses (the
``d x d`` Grams and their roots, bucket by bucket; no msign) for every such group and raises
:class:`~compositional_muon.finite.NonFiniteError` before anything is written if one is
non-finite. Every bucket is then still checked before it is written; a bucket that fails after
earlier ones were written (an overflow from an absurd ``lr``, or weights that were already NaN/inf
while the gradients were finite) raises ``NonFiniteError`` saying how many buckets of this step
were written. Pairs are disjoint head slices (a parameter covered twice is refused when specs are
routed), so writing one bucket does not change the inputs of another. The DTensor strategies (FSDP2, TP, HSDP, expert parallel, the
gather fallback) compute their whole plan before writing anything, as before (see
``docs/performance.md``).
"""

from __future__ import annotations

from typing import Any

import torch

from . import validation
from .buckets import check_bucket_bytes
from .cm import CMConfig, apply_update, normalize_head_rows
from .cm.kernel import ZTransform, pair_roots, used_roots
from .diagnostics import pair_stats
from .finite import NonFiniteError, all_finite
from .parallel import CMGroupStep, is_dtensor
from .parallel.strategy import Strategy, bucket_config, local_buckets, stack_views
from .plan import PairBatch, PairEntry, PairLayout
from .rms_match import match_group_rms

__all__ = ["prepare", "step_groups", "write", "normuon_transform", "PREPASS_LAM"]

#: groups with ``lam`` below this get the partner-root pre-pass before anything is written
PREPASS_LAM = 1e-4


def prepare(opt: Any, group: dict) -> CMGroupStep:
    """A CM group's :class:`CMGroupStep` (its momentum / head-moment buffers created on first use)."""
    params = group["params"]
    try:
        bucket_bytes = check_bucket_bytes(group.get("bucket_bytes", opt.bucket_bytes))
    except ValueError as e:
        raise ValueError(f"{type(opt).__name__}: param group {_index(opt, group)}: {e}") from None
    for p in params:
        opt._state_buffer(p, "momentum_buffer")
    normuon = group["transform"] == "normuon"
    if normuon:
        if any(is_dtensor(p) for p in params):
            raise ValueError(
                "transform='normuon' is not supported for DTensor (FSDP2) parameters; use transform='none' there"
            )
        for p in params:
            # per head-channel second moments, stored broadcast along the model dim so the
            # same head views (fused / transposed layouts) address them
            opt._state_buffer(p, "head_moment", dtype=torch.promote_types(p.dtype, torch.float32))
    return CMGroupStep(
        group=group,
        cfg=CMConfig.from_options(group),
        pairs=[PairLayout.from_dict(p) for p in group["cm_pairs"]],
        params=params,
        state=opt.state,
        transform=normuon_transform(group) if normuon else None,
        warn=opt._warn_once,
        bucket_bytes=bucket_bytes,
    )


def _index(opt: Any, group: dict) -> int:
    return next(i for i, g in enumerate(opt.param_groups) if g is group)


def step_groups(opt: Any, groups: list[dict]) -> dict:
    """Step the CM ``groups`` of ``opt``; returns the per-pair stats (``track_stats``).

    Groups whose strategy does not stream (DTensor) are computed and checked first, the small-``lam``
    pre-pass runs over the streaming ones, and only then is anything written."""
    jobs = [(g, prepare(opt, g)) for g in groups]
    strategies: list[Strategy] = [opt.parallel.cm_strategy(s.params, s.transform is not None) for _, s in jobs]
    whole = [(g, match_group_rms(st.cm_group(s), g)) for (g, s), st in zip(jobs, strategies) if not st.streams]
    for g, plan in whole:
        _check(g, plan, written=0)
    streamed = [(g, s, st) for (g, s), st in zip(jobs, strategies) if st.streams]
    _prepass([(g, s) for g, s, _ in streamed if g["lam"] < PREPASS_LAM])
    stats: dict = {}
    written = 0
    for g, plan in whole:
        write(opt, g, plan, stats)
        written += 1
    whole.clear()
    for g, s, st in streamed:
        for bucket in st.cm_buckets(s):
            bucket = match_group_rms(bucket, g)
            _check(g, bucket, written)
            write(opt, g, bucket, stats)
            written += 1
            bucket.clear()  # free this bucket's tensors before the next one is stacked
    return stats


def _prepass(jobs: list[tuple[dict, CMGroupStep]]) -> None:
    """``lam < PREPASS_LAM``: raise before anything is written when a partner root the update uses is not finite."""
    for g, step in jobs:
        for kind, entries in local_buckets(step):
            A, B = (stack_views([e.w[i] for e in entries]) for i in (0, 1))
            cfg = bucket_config(step, step.cfg.for_kind(kind), A)
            roots = used_roots(pair_roots(A, B, cfg), cfg)
            if roots and not all_finite(*roots):
                names = [e.name for e in entries]
                raise NonFiniteError(validation.nonfinite_cm_update_message(names, (A, B), g["lam"]))


def _check(group: dict, plan: list[PairBatch], written: int) -> None:
    for batch in plan:
        if batch.finite is not None:  # set (agreed across ranks) by the sharded strategies
            ok = batch.finite
        else:  # an update that was not computed is refused by `write`
            ok = batch.dA is None or batch.dB is None or all_finite(batch.dA, batch.dB)
        if ok:
            continue
        message = validation.nonfinite_cm_update_message(batch.names, (batch.A, batch.B), group["lam"])
        if written:
            message = (
                f"{message.rsplit('; nothing was written', 1)[0]}; {written} earlier bucket(s) of this CM step were already written "
                "(CM streams byte-capped buckets, see docs/performance.md): restore a checkpoint"
            )
        raise NonFiniteError(message)


def write(opt: Any, group: dict, plan: list[PairBatch], stats: dict) -> None:
    """Write ``plan`` (checked): new momenta and head moments, then the decoupled-decay updates."""
    decay = float(group["lr"]) * group["weight_decay"]
    for batch in plan:
        if batch.apply is not None:  # FSDP2 gather fallback: writes this rank's rows of the pair's heads
            batch.apply(decay)
            continue
        if batch.dA is None or batch.dB is None:
            raise RuntimeError(f"the CM update of {batch.names} was not computed")
        if opt.track_stats and batch.stats:  # before the weights change (batch.A may be a view of them)
            s = pair_stats(batch.A, batch.B, batch.dA, batch.dB, batch.kind)
            for i, name in enumerate(batch.names):
                stats[name] = {k: v[i] for k, v in s.items()}
        for i, e in enumerate(batch.entries):
            e.m[0].copy_(batch.new_ma[i])
            e.m[1].copy_(batch.new_mb[i])
            if batch.new_va is not None and batch.new_vb is not None and e.v is not None:
                e.v[0].copy_(batch.new_va[i].expand_as(e.v[0]))
                e.v[1].copy_(batch.new_vb[i].expand_as(e.v[1]))
            apply_update(e.w[0], batch.dA[i], decay)
            apply_update(e.w[1], batch.dB[i], decay)


def normuon_transform(group: dict):
    """The factory of :func:`cm.pair_update`'s ``z_transform`` for ``transform="normuon"``: reads
    the stacked head-channel moments of a batch's entries and leaves the new ones in ``out``."""
    beta2, eps = group["transform_beta2"], group["transform_eps"]

    def factory(entries: list[PairEntry], cfg: CMConfig, out: dict) -> ZTransform:
        va = torch.stack([e.v[0][..., :1] for e in entries if e.v is not None])  # (L, H, d, 1)
        vb = torch.stack([e.v[1][..., :1] for e in entries if e.v is not None])  # (L, Hkv, d, 1)

        def transform(Za: torch.Tensor, Zb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            L, hkv, G = Za.shape[:3]
            za, new_va = normalize_head_rows(
                Za, va.reshape(L, hkv, G, *va.shape[-2:]), beta2, eps, unit_dims=2 if cfg.hybrid else 0
            )
            zb, new_vb = normalize_head_rows(Zb, vb.unsqueeze(2), beta2, eps)
            out["new_va"], out["new_vb"] = new_va.flatten(1, 2), new_vb.squeeze(2)
            return za, zb

        return transform

    return factory
