"""CompositionalMuon: one optimizer for a whole transformer.

CM on every attention QK and OV pair, Muon on the other hidden matrices, AdamW on embeddings, the
output head, gains and biases. It owns all state (momentum buffers included) and follows
torch.optim's conventions (state_dict, schedulers, closures, add_param_group).

Param groups carry a ``kind``: ``"cm"`` (with ``cm_pairs``, the head slices of its parameters),
``"muon"`` or ``"adamw"``. Groups written for ``MuonWithAuxAdam`` (``use_muon`` flags, no ``kind``)
work as Muon / AdamW groups. Same-shape pairs of a CM group are stacked, in byte-capped buckets, and
updated by one batched kernel call per bucket (see ``cm.pair_update`` and ``cm_stream``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from . import cm_stream, state_check, validation
from .attention import DEFAULT_ADAMW_PATTERNS, AttentionSpec, find_attention, route_parameters
from .buckets import DEFAULT_BUCKET_BYTES, check_bucket_bytes
from .cm import CMConfig
from .layouts import mark_layouts
from .muon import Muon
from .plan import HeadRef, PairBatch, PairLayout, check_checkpoint_layout
from .rms_match import check_rms_match, match_group_rms

__all__ = ["CompositionalMuon"]

KINDS = ("cm", "muon", "adamw")
# CM's variant switches come from CMConfig (one set of defaults); the rest are the group's own.
# root_iters stays a CMConfig-only option (groups use its default).
CM_DEFAULTS: dict[str, Any] = dict(
    lr=0.02,
    momentum=0.95,
    nesterov=False,
    weight_decay=0.0,
    **{f.name: f.default for f in dataclasses.fields(CMConfig) if f.name != "root_iters"},
    momentum_reproject=False,
    transform="none",
    transform_beta2=0.95,
    transform_eps=1e-8,
    adjust_lr_fn="original",
)
TRANSFORMS = ("none", "normuon")
_NEWTON_REFUSAL = (
    "transform='newton' is not defined for CM: Newton-Muon right-multiplies each update by the inverse "
    "second moment of the layer's *input*. For o_proj that input is the heads' output, the very d-dim "
    "space that CM already whitens with the partner root C_V^-1, so the two preconditioners would act on "
    "the same side with no single steepest-descent problem behind them. Use NewtonMuon for the Muon "
    "matrices and CM (transform='none' or 'normuon') for attention; see docs/variants.md."
)


def _cfg(group: dict) -> CMConfig:
    return CMConfig.from_options(group)


def pair_layouts(group: dict) -> list[PairLayout]:
    """The typed layouts of a CM group's pairs (stored as dicts in the group for checkpoints)."""
    return [PairLayout.from_dict(p) for p in group["cm_pairs"]]


class CompositionalMuon(Muon):
    """CM + Muon + AdamW in one ``torch.optim.Optimizer``.

    Build it from a model with :meth:`from_model` (attention found automatically), or pass param
    groups: a CM group is ``dict(kind="cm", attention=[AttentionSpec, ...], lr=..., ...)`` (its
    ``params`` are filled in from the specs), Muon/AdamW groups are as for :class:`MuonWithAuxAdam`.

    CM group options (reference names): ``lr`` (the composed step ``eta``), ``momentum`` (beta,
    momentum ``m <- beta m + g``), ``nesterov``, ``weight_decay``, ``lam``, ``method``,
    ``isotropic``, ``hybrid`` (OV), ``whitening``, ``connection``, ``momentum_reproject``,
    ``per_mat_renorm``, ``msign_backend``, ``msign_steps``, ``msign_dtype``, ``root_method``,
    ``adjust_lr_fn`` ("original"; "match_rms_adamw": each factor's update per layer at element RMS
    ``0.2 lr``, so AdamW lrs carry over, :mod:`.rms_match`; :meth:`from_model` passes it to Muon);
    and ``transform`` ("none" or "normuon": NorMuon's row normalization of the msign output in the
    whitened head space, with ``transform_beta2`` (0.95) and ``transform_eps`` (1e-8), see
    :func:`~compositional_muon.cm.normalize_head_rows` and ``docs/variants.md``; "newton" is refused).
    ``track_stats=True`` records per-head step sizes and composed-update norms after every step in
    :attr:`last_stats` (costs a few small SVDs per layer; not recorded for DTensor parameters).
    ``distributed`` ("auto", True, False): under DDP the CM layers and Muon matrices are split
    among the ranks and the updates all-gathered; DTensor (FSDP2) parameters take the shard-aware
    path (see :mod:`compositional_muon.distributed` and ``docs/distributed.md``).

    ``bucket_bytes`` (constructor keyword, default 256 MiB, :mod:`~compositional_muon.buckets`;
    also a CM group option, the constructor's value by default; a positive int or None): the CM
    step runs over buckets of same-shape pairs whose estimated working memory stays under
    ``min(bucket_bytes, max(4 MiB, 0.4 x the group's CM weight bytes))`` (a pair over it is a bucket
    of its own; None: one bucket per shape), each stacked, computed, checked and written before the
    next (:mod:`~compositional_muon.cm_stream`); the Muon groups use the same cap. The result does
    not depend on the buckets. Guarantee: gradients with NaN/inf, or a singular partner Gram (possible
    with ``lam=0`` or a tiny ``lam``: groups with ``lam < 1e-4`` get a partner-root pre-pass over
    all buckets first), raise :class:`NonFiniteError` with nothing written; a bucket that is non-finite for another reason
    (an overflow from an absurd ``lr``) raises after the earlier buckets were written, and says so.
    DTensor CM groups compute their whole plan before writing anything.

    A QK/OV pair is stepped whole: a pair where neither weight has a gradient is skipped; a pair
    where exactly one has a gradient raises ``ValueError`` at ``step`` before anything is written
    (stepping one factor alone would silently be another optimizer, see ``docs/math.md``); a pair
    with one frozen (``requires_grad=False``) and one trained weight is refused when built.
    Hyperparameters are checked at construction and at every step (:mod:`~compositional_muon.validation`).
    """

    def __init__(
        self,
        param_groups,
        *,
        nonfinite: str = "raise",
        track_stats: bool = False,
        distributed="auto",
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
    ):
        self.track_stats = track_stats
        self.last_stats: dict = {}
        self.routing: list = []
        self._names: dict[int, str] = {}
        super().__init__(param_groups, nonfinite=nonfinite, distributed=distributed, bucket_bytes=bucket_bytes)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        lr: float = 0.02,
        muon_lr: float = 0.02,
        adamw_lr: float = 3e-4,
        weight_decay: float = 0.0,
        muon_weight_decay: float | None = None,
        adamw_weight_decay: float = 0.0,
        adamw_betas=(0.9, 0.95),
        adamw_eps: float = 1e-10,
        muon_momentum: float = 0.95,
        attention=None,
        head_dim=None,
        num_heads=None,
        num_kv_heads=None,
        adamw_patterns=DEFAULT_ADAMW_PATTERNS,
        muon_patterns=(),
        nonfinite: str = "raise",
        track_stats: bool = False,
        verbose: bool = False,
        distributed="auto",
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
        **cm_options,
    ):
        """CM on every attention pair of ``model``, Muon on the other matrices, AdamW on the rest.

        ``attention``: explicit :class:`AttentionSpec` list (default: :func:`find_attention` with
        the ``head_dim`` / ``num_heads`` / ``num_kv_heads`` overrides). ``cm_options`` are the CM
        group options (``momentum``, ``method``, ``isotropic``, ...); ``msign_dtype`` also sets the
        Muon group's iteration precision (one precision for the whole model). ``verbose`` prints
        :meth:`summary`. Raises ValueError when no attention is found (use :class:`Muon` then).
        Under DDP pass the wrapped model's ``.module`` (or the model before wrapping); under FSDP2
        pass the model after ``fully_shard``.
        """
        unknown = set(cm_options) - set(CM_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown CM option(s) {sorted(unknown)}; expected some of {sorted(CM_DEFAULTS)}")
        specs = (
            list(attention)
            if attention is not None
            else find_attention(model, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        )
        if not specs:
            raise ValueError(
                "no attention layer found in the model; pass attention=[AttentionSpec(...)] "
                "or head counts, or use Muon/MuonWithAuxAdam for a model without attention"
            )
        mark_layouts(model)  # expert stacks in the Muon group are orthogonalized per expert
        cm, muon, adamw = route_parameters(model, specs, adamw_patterns, muon_patterns)
        groups = [dict(kind="cm", attention=specs, lr=lr, weight_decay=weight_decay, **cm_options)]
        if muon:
            groups.append(
                dict(
                    kind="muon",
                    params=[p for _, p in muon],
                    lr=muon_lr,
                    momentum=muon_momentum,
                    weight_decay=weight_decay if muon_weight_decay is None else muon_weight_decay,
                    msign_dtype=cm_options.get("msign_dtype"),
                    adjust_lr_fn=cm_options.get("adjust_lr_fn", "original"),
                )
            )
        if adamw:
            groups.append(
                dict(
                    kind="adamw",
                    params=[p for _, p in adamw],
                    lr=adamw_lr,
                    betas=adamw_betas,
                    eps=adamw_eps,
                    weight_decay=adamw_weight_decay,
                )
            )
        opt = cls(
            groups, nonfinite=nonfinite, track_stats=track_stats, distributed=distributed, bucket_bytes=bucket_bytes
        )
        names = {id(p): n for n, p in model.named_parameters()}
        opt.routing = (
            [(n, "cm", tuple(p.shape)) for n, p in cm]
            + [(n, "muon", tuple(p.shape)) for n, p in muon]
            + [(n, "adamw", tuple(p.shape)) for n, p in adamw]
        )
        opt._names = names
        if verbose:
            print(opt.summary())
        return opt

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        kind = group.pop("kind", None)
        if kind is None:
            kind = (
                "cm"
                if "attention" in group or "cm_pairs" in group
                else ("muon" if group.get("use_muon", True) else "adamw")
            )
        if kind not in KINDS:
            raise ValueError(f"unknown param group kind {kind!r}; expected one of {KINDS}")
        if kind != "cm":
            if "attention" in group:
                raise ValueError(f"a {kind!r} group cannot take `attention`")
            group["use_muon"] = kind == "muon"
            group["kind"] = kind
            return super().add_param_group(group)
        if "use_muon" in group and group["use_muon"] is not True:
            raise ValueError("a CM group is a matrix group; it cannot set use_muon=False")
        if "attention" in group:
            if "params" in group or "cm_pairs" in group:
                raise ValueError("give a CM group either `attention` specs or `params` + `cm_pairs`, not both")
            group["params"], group["cm_pairs"] = self._serialize(group.pop("attention"))
        elif "cm_pairs" not in group or "params" not in group:
            raise ValueError("a CM group needs `attention=[AttentionSpec, ...]`")
        for k, v in CM_DEFAULTS.items():
            group.setdefault(k, v)
        try:  # the byte cap of the streamed buckets (cm_stream.py); the optimizer's by default
            group["bucket_bytes"] = check_bucket_bytes(group.get("bucket_bytes", self.bucket_bytes))
        except ValueError as e:
            raise ValueError(f"a CM group's {e}") from None
        group["kind"], group["use_muon"] = "cm", True
        group.setdefault("skipped_steps", 0)
        validation.check_new_group(self, group)  # the ranges table (validation.py)
        _cfg(group)  # validates the variant switches
        # (momentum, transform and its beta2/eps are checked by the ranges table)
        if group["transform"] == "normuon" and group["method"] != "half_split":
            raise ValueError(
                "transform='normuon' needs method='half_split': the joint rule's msign units span "
                "all G+1 factors of a group, so the per-unit norm restore is not per weight"
            )
        check_rms_match(group)  # (the name of adjust_lr_fn is checked by the ranges table)
        if group["momentum_reproject"] and group["connection"] == "none":
            raise ValueError("momentum_reproject=True needs a connection other than 'none'")
        self._register_group(group)
        self._check_pairs(group)

    @staticmethod
    def _serialize(specs) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """AttentionSpecs -> (unique params, serialized :class:`PairLayout` s referencing them by index)."""
        params: list[torch.Tensor] = []
        index: dict[int, int] = {}
        pairs = []
        for spec in specs:
            if not isinstance(spec, AttentionSpec):
                raise TypeError(f"`attention` must hold AttentionSpec objects, got {type(spec).__name__}")
            for kind, a, b in spec.pairs():
                refs = []
                for hs, n in ((a, spec.num_heads), (b, spec.num_kv_heads)):
                    axis, offset, stride = hs.resolved(n, spec.head_dim, f"attention {spec.name!r}")
                    if id(hs.param) not in index:
                        index[id(hs.param)] = len(params)
                        params.append(hs.param)
                    refs.append(HeadRef(index[id(hs.param)], axis, offset, stride))
                layout = PairLayout(
                    f"{spec.name}.{kind}", kind, spec.head_dim, spec.num_heads, spec.num_kv_heads, refs[0], refs[1]
                )
                pairs.append(layout.to_dict())
        return params, pairs

    def _check_pairs(self, group: dict) -> None:
        n = len(group["params"])
        for pair in pair_layouts(group):
            for ref in (pair.a, pair.b):
                if not 0 <= ref.index < n:
                    raise ValueError(f"CM pair {pair.name!r} refers to parameter {ref.index} of a group of {n}")

    # -- checkpoints ------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        state_check.check_state_dict(self, state_dict)  # class first (state_check.py)
        check_checkpoint_layout(state_dict, self.param_groups)
        super().load_state_dict(state_dict)

    # -- step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss, proceed = self._begin_step(closure)
        if not proceed:
            return loss
        # CM first, in byte-capped buckets (cm_stream.py: the small-lam pre-pass, then each bucket
        # checked before it is written), so a failure leaves the Muon/AdamW groups untouched.
        self.last_stats = cm_stream.step_groups(self, [g for g in self.param_groups if g["kind"] == "cm"])
        self._step_groups([g for g in self.param_groups if g["kind"] != "cm"])
        return loss

    def _cm_plan(self, group: dict) -> list[PairBatch]:
        """The group's CM updates, all buckets at once (nothing written), computed by the strategy
        ``self.parallel`` picks."""
        return match_group_rms(self.parallel.cm_group(cm_stream.prepare(self, group)), group)

    # -- reporting --------------------------------------------------------------------------------
    def summary(self) -> str:
        """A readable table of which parameters got CM, Muon and AdamW, with their learning rates."""
        lines = []
        for gi, g in enumerate(self.param_groups):
            lines.append(f"group {gi}: {g['kind']}  lr={float(g['lr']):g}  weight_decay={g['weight_decay']:g}")
            if g["kind"] == "cm":
                opts = ", ".join(
                    f"{k}={g[k]}" for k in ("method", "isotropic", "hybrid", "whitening", "connection", "lam") if k in g
                )
                lines.append(f"  {opts}")
                for pair in pair_layouts(g):
                    lines.append(
                        f"  {pair.name:<40} {pair.kind}  heads={pair.num_heads}"
                        f" kv_heads={pair.num_kv_heads} head_dim={pair.head_dim}"
                    )
            names = getattr(self, "_names", {})
            for p in g["params"]:
                lines.append(f"  {names.get(id(p), '<param>'):<40} {tuple(p.shape)}")
        return "\n".join(lines)
