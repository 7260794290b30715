"""CompositionalMuon: one optimizer for a whole transformer.

CM on every attention QK and OV pair, Muon on the other hidden matrices, AdamW on embeddings, the
output head, gains and biases. It owns all state (momentum buffers included) and follows
torch.optim's conventions (state_dict, schedulers, closures, add_param_group).

Param groups carry a ``kind``: ``"cm"`` (with ``cm_pairs``, the head slices of its parameters),
``"muon"`` or ``"adamw"``. Groups written for ``MuonWithAuxAdam`` (``use_muon`` flags, no ``kind``)
work as Muon / AdamW groups. Same-shape pairs of a CM group are stacked and updated by one batched
kernel call (see ``cm.pair_update``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import distributed as _dist
from .adamw import adamw_step
from .attention import DEFAULT_ADAMW_PATTERNS, AttentionSpec, find_attention, head_view, route_parameters
from .cm import CMConfig, NonFiniteError, all_finite, apply_update, cm_momentum, normalize_head_rows, pair_update
from .diagnostics import pair_stats
from .muon import Muon
from .routing import RoutedOptimizer

__all__ = ["CompositionalMuon"]

KINDS = ("cm", "muon", "adamw")
CM_DEFAULTS = dict(
    lr=0.02,
    momentum=0.95,
    nesterov=False,
    weight_decay=0.0,
    lam=1e-2,
    method="half_split",
    isotropic=False,
    hybrid=True,
    whitening="both",
    connection="none",
    momentum_reproject=False,
    per_mat_renorm=False,
    msign_backend="polar_express",
    msign_steps=None,
    msign_dtype=None,
    root_method="auto",
    transform="none",
    transform_beta2=0.95,
    transform_eps=1e-8,
)
TRANSFORMS = ("none", "normuon")
_NEWTON_REFUSAL = (
    "transform='newton' is not defined for CM: Newton-Muon right-multiplies each update by the inverse "
    "second moment of the layer's *input*. For o_proj that input is the heads' output, the very d-dim "
    "space that CM already whitens with the partner root C_V^-1, so the two preconditioners would act on "
    "the same side with no single steepest-descent problem behind them. Use NewtonMuon for the Muon "
    "matrices and CM (transform='none' or 'normuon') for attention; see docs/variants.md."
)
_CM_CFG_KEYS = (
    "method",
    "isotropic",
    "hybrid",
    "whitening",
    "connection",
    "per_mat_renorm",
    "lam",
    "msign_backend",
    "msign_steps",
    "msign_dtype",
    "root_method",
)


def _cfg(group: dict) -> CMConfig:
    return CMConfig(**{k: group[k] for k in _CM_CFG_KEYS})


class CompositionalMuon(Muon):
    """CM + Muon + AdamW in one ``torch.optim.Optimizer``.

    Build it from a model with :meth:`from_model` (attention found automatically), or pass param
    groups: a CM group is ``dict(kind="cm", attention=[AttentionSpec, ...], lr=..., ...)`` (its
    ``params`` are filled in from the specs), Muon/AdamW groups are as for :class:`MuonWithAuxAdam`.

    CM group options (reference names): ``lr`` (the composed step ``eta``), ``momentum`` (beta,
    momentum ``m <- beta m + g``), ``nesterov``, ``weight_decay``, ``lam``, ``method``,
    ``isotropic``, ``hybrid`` (OV), ``whitening``, ``connection``, ``momentum_reproject``,
    ``per_mat_renorm``, ``msign_backend``, ``msign_steps``, ``msign_dtype``, ``root_method``;
    and ``transform`` ("none" or "normuon": NorMuon's row normalization of the msign output in the
    whitened head space, with ``transform_beta2`` (0.95) and ``transform_eps`` (1e-8), see
    :func:`~compositional_muon.cm.normalize_head_rows` and ``docs/variants.md``; "newton" is refused).
    ``track_stats=True`` records per-head step sizes and composed-update norms after every step in
    :attr:`last_stats` (costs a few small SVDs per layer; not recorded for DTensor parameters).
    ``distributed`` ("auto", True, False): under DDP the CM layers and Muon matrices are split
    among the ranks and the updates all-gathered; DTensor (FSDP2) parameters take the shard-aware
    path (see :mod:`compositional_muon.distributed` and ``docs/distributed.md``).
    """

    def __init__(self, param_groups, *, nonfinite: str = "raise", track_stats: bool = False, distributed="auto"):
        self.track_stats = track_stats
        self.last_stats: dict = {}
        self.routing: list = []
        RoutedOptimizer.__init__(self, param_groups, None, nonfinite=nonfinite, distributed=distributed)

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
        opt = cls(groups, nonfinite=nonfinite, track_stats=track_stats, distributed=distributed)
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
        group["kind"], group["use_muon"] = "cm", True
        group.setdefault("skipped_steps", 0)
        _cfg(group)  # validates the variant switches
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"CM momentum must be in [0, 1), got {group['momentum']!r}")
        if group["transform"] == "newton":
            raise ValueError(_NEWTON_REFUSAL)
        if group["transform"] not in TRANSFORMS:
            raise ValueError(f"unknown CM transform {group['transform']!r}; expected one of {TRANSFORMS}")
        if group["transform"] == "normuon":
            if group["method"] != "half_split":
                raise ValueError(
                    "transform='normuon' needs method='half_split': the joint rule's msign rows span "
                    "all G+1 factors of a group, so a row is not one weight's channel"
                )
            if not 0 <= group["transform_beta2"] < 1 or not group["transform_eps"] >= 0:
                raise ValueError(
                    f"transform_beta2 must be in [0, 1) and transform_eps >= 0, got "
                    f"{group['transform_beta2']!r}, {group['transform_eps']!r}"
                )
        if group["momentum_reproject"] and group["connection"] == "none":
            raise ValueError("momentum_reproject=True needs a connection other than 'none'")
        RoutedOptimizer._validate_group(self, group)
        torch.optim.Optimizer.add_param_group(self, group)
        self._check_pairs(group)

    @staticmethod
    def _serialize(specs):
        """AttentionSpecs -> (unique params, pair dicts referencing them by index)."""
        params, index, pairs = [], {}, []
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
                    refs.append([index[id(hs.param)], axis, offset, stride])
                pairs.append(
                    dict(
                        name=f"{spec.name}.{kind}",
                        kind=kind,
                        head_dim=spec.head_dim,
                        num_heads=spec.num_heads,
                        num_kv_heads=spec.num_kv_heads,
                        a=refs[0],
                        b=refs[1],
                    )
                )
        return params, pairs

    def _check_pairs(self, group) -> None:
        n = len(group["params"])
        for pair in group["cm_pairs"]:
            for ref in (pair["a"], pair["b"]):
                if not 0 <= ref[0] < n:
                    raise ValueError(f"CM pair {pair['name']!r} refers to parameter {ref[0]} of a group of {n}")

    # -- checkpoints ------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("param_groups", [])
        if len(saved) != len(self.param_groups):
            raise ValueError(
                f"optimizer/model mismatch: the checkpoint has {len(saved)} param groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        for i, (s, g) in enumerate(zip(saved, self.param_groups)):
            if s.get("kind") != g["kind"]:
                raise ValueError(
                    f"optimizer/model mismatch: param group {i} is {s.get('kind')!r} in the checkpoint "
                    f"but {g['kind']!r} here"
                )
            if g["kind"] == "cm" and s.get("cm_pairs") != g["cm_pairs"]:
                raise ValueError(
                    f"optimizer/model mismatch: the attention layout of param group {i} differs from "
                    "the checkpoint's (different model or head counts)"
                )
        by_index = {}
        idx = 0
        for g in self.param_groups:
            for p in g["params"]:
                by_index[idx] = p
                idx += 1
        for k, st in state_dict.get("state", {}).items():
            p = by_index.get(k)
            for name, v in st.items():
                if p is not None and isinstance(v, torch.Tensor) and v.ndim and v.shape != p.shape:
                    raise ValueError(
                        f"optimizer/model mismatch: state {name!r} of parameter {k} has shape "
                        f"{tuple(v.shape)}, the parameter has {tuple(p.shape)}"
                    )
        super().load_state_dict(state_dict)

    # -- step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss, proceed = self._begin_step(closure)
        if not proceed:
            return loss
        # CM updates are computed for every group before anything is written, so a failure
        # (a singular partner with lam=0) leaves parameters and state untouched.
        plans = [(g, self._cm_plan(g)) for g in self.param_groups if g["kind"] == "cm"]
        for g, plan in plans:
            for item in plan:
                # "finite" is set (agreed across ranks) by the FSDP2 path
                if not (item["finite"] if "finite" in item else all_finite(item["dA"], item["dB"])):
                    raise NonFiniteError(
                        f"the CM update of {item['names']} is not finite (singular partner Gram "
                        f"with lam={g['lam']}?); nothing was written"
                    )
        stats = {}
        for g, plan in plans:
            self._cm_apply(g, plan, stats)
        self.last_stats = stats
        for group in self.param_groups:
            if group["kind"] == "cm":
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["use_muon"]:
                self._matrix_step(group, params)
            else:
                adamw_step(
                    params,
                    [p.grad for p in params],
                    [self.state[p] for p in params],
                    lr=float(group["lr"]),
                    betas=group["betas"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
        return loss

    def _cm_plan(self, group: dict) -> list:
        cfg = _cfg(group)
        params = group["params"]
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        normuon = group["transform"] == "normuon"
        if any(_dist.is_dtensor(p) for p in params):  # FSDP2 / DTensor parameters
            if normuon:
                raise ValueError(
                    "transform='normuon' is not supported for DTensor (FSDP2) parameters; use transform='none' there"
                )
            return _dist.sharded_cm_plan(self, group, cfg)
        if normuon:
            for p in params:
                # per head-channel second moments, stored broadcast along the model dim so the
                # same head views (fused / transposed layouts) address them
                if "head_moment" not in self.state[p]:
                    self.state[p]["head_moment"] = torch.zeros_like(
                        p, dtype=torch.promote_types(p.dtype, torch.float32), memory_format=torch.preserve_format
                    )
        # DDP: split the layers among the ranks (the normuon transform's state is computed everywhere)
        spread = None if normuon else _dist.replicated_group(self)
        buckets: dict = {}
        for pair in group["cm_pairs"]:
            pa, pb = params[pair["a"][0]], params[pair["b"][0]]
            if pa.grad is None or pb.grad is None:
                continue  # a pair with a missing gradient is skipped whole
            d, H, hkv = pair["head_dim"], pair["num_heads"], pair["num_kv_heads"]

            def views(t_a, t_b, pair=pair, d=d, H=H, hkv=hkv):
                return (head_view(t_a, *pair["a"][1:], H, d), head_view(t_b, *pair["b"][1:], hkv, d))

            A, B = views(pa, pb)
            key = (pair["kind"], tuple(A.shape), tuple(B.shape), pa.dtype, pb.dtype)
            buckets.setdefault(key, []).append(
                dict(
                    name=pair["name"],
                    w=(A, B),
                    g=views(pa.grad, pb.grad),
                    m=views(self.state[pa]["momentum_buffer"], self.state[pb]["momentum_buffer"]),
                    v=views(self.state[pa]["head_moment"], self.state[pb]["head_moment"]) if normuon else None,
                )
            )
        plan = []
        for key, items in buckets.items():
            stack = [torch.stack([it[f][i] for it in items]) for f in ("w", "g", "m") for i in (0, 1)]
            A, B, ga, gb, ma, mb = stack
            new_ma, new_mb, ua, ub = cm_momentum(
                A,
                B,
                ga,
                gb,
                ma,
                mb,
                beta=group["momentum"],
                nesterov=group["nesterov"],
                momentum_reproject=group["momentum_reproject"],
                cfg=cfg,
            )
            # `hybrid` is an OV option: QK's A factor (W_q) is always per head.
            pair_cfg = cfg if key[0] == "ov" else dataclasses.replace(cfg, hybrid=False)
            if spread is not None:
                plan.append(
                    dict(
                        items=items,
                        names=[it["name"] for it in items],
                        A=A,
                        B=B,
                        ua=ua,
                        ub=ub,
                        cfg=pair_cfg,
                        new_ma=new_ma,
                        new_mb=new_mb,
                        kind=key[0],
                    )
                )
                continue
            moments: dict = {}
            zt = None
            if normuon:
                if pair_cfg.root_method == "auto":  # the symmetric root: rows are defined in its basis
                    pair_cfg = dataclasses.replace(pair_cfg, root_method="eigh" if A.device.type == "cpu" else "newton")
                zt = self._normuon_transform(group, items, pair_cfg, moments)
            dA, dB = pair_update(A, B, ua, ub, float(group["lr"]), pair_cfg, z_transform=zt)
            plan.append(
                dict(
                    items=items,
                    names=[it["name"] for it in items],
                    A=A,
                    B=B,
                    dA=dA,
                    dB=dB,
                    new_ma=new_ma,
                    new_mb=new_mb,
                    kind=key[0],
                    **moments,
                )
            )
        if spread is not None and plan:
            _dist.spread_pair_updates(plan, float(group["lr"]), spread)
        return plan

    @staticmethod
    def _normuon_transform(group: dict, items: list, cfg: CMConfig, out: dict):
        """The ``z_transform`` of :func:`cm.pair_update` for ``transform="normuon"``: reads the
        stacked head-channel moments of ``items`` and leaves the new ones in ``out``."""
        va = torch.stack([it["v"][0][..., :1] for it in items])  # (L, H, d, 1)
        vb = torch.stack([it["v"][1][..., :1] for it in items])  # (L, Hkv, d, 1)
        beta2, eps = group["transform_beta2"], group["transform_eps"]

        def transform(Za, Zb):
            L, hkv, G = Za.shape[:3]
            za, new_va = normalize_head_rows(
                Za, va.reshape(L, hkv, G, *va.shape[-2:]), beta2, eps, unit_dims=2 if cfg.hybrid else 0
            )
            zb, new_vb = normalize_head_rows(Zb, vb.unsqueeze(2), beta2, eps)
            out["new_va"], out["new_vb"] = new_va.flatten(1, 2), new_vb.squeeze(2)
            return za, zb

        return transform

    def _cm_apply(self, group: dict, plan: list, stats: dict) -> None:
        decay = float(group["lr"]) * group["weight_decay"]
        for item in plan:
            if "apply" in item:  # FSDP2 gather fallback: writes this rank's rows of the pair's heads
                item["apply"](decay)
                continue
            for i, it in enumerate(item["items"]):
                it["m"][0].copy_(item["new_ma"][i])
                it["m"][1].copy_(item["new_mb"][i])
                if "new_va" in item:
                    it["v"][0].copy_(item["new_va"][i].expand_as(it["v"][0]))
                    it["v"][1].copy_(item["new_vb"][i].expand_as(it["v"][1]))
                apply_update(it["w"][0], item["dA"][i], decay)
                apply_update(it["w"][1], item["dB"][i], decay)
            if self.track_stats and item.get("stats", True):
                s = pair_stats(item["A"], item["B"], item["dA"], item["dB"], item["kind"])
                for i, name in enumerate(item["names"]):
                    stats[name] = {k: v[i] for k, v in s.items()}

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
                for pair in g["cm_pairs"]:
                    lines.append(
                        f"  {pair['name']:<40} {pair['kind']}  heads={pair['num_heads']}"
                        f" kv_heads={pair['num_kv_heads']} head_dim={pair['head_dim']}"
                    )
            names = getattr(self, "_names", {})
            for p in g["params"]:
                lines.append(f"  {names.get(id(p), '<param>'):<40} {tuple(p.shape)}")
        return "\n".join(lines)
