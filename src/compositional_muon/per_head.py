"""PerHeadMuon: Muon with every attention head's slice orthogonalized on its own.

For an attention layer with ``H`` query heads, ``Hkv`` key/value heads of size ``d`` and model
width ``D`` (nn.Linear layout), the "heads" param group updates each head block separately::

    q, k, v: the d x D row block W[h d:(h+1) d] of the projection       (per q / kv head)
    o:       the D x d column block W_o[:, h d:(h+1) d], taken as its d x D transpose
    dW_blk = -lr * s(d, D) * msign(U_blk)       U: Muon's momentum direction of the whole weight

``s`` is Muon's shape factor of the head block in that d x D orientation (``adjust_lr_fn``:
"original" gives ``sqrt(max(1, d / D)) = 1`` for ``d <= D``; "match_rms_adamw" gives
``0.2 sqrt(max(d, D))``, so every block has update RMS ``0.2 lr``). Fused ``qkv`` weights, GPT-2's
transposed Conv1D and GQA/MQA come from :func:`~compositional_muon.find_attention`'s head slices.
The other hidden matrices take plain Muon and the rest AdamW (groups as for :class:`Muon`).

Correspondence with CM (tested): where every partner Gram is the identity (``B_g B_g^T = I`` and
``sum_{h in g} A_h A_h^T = I``), CM with ``method="half_split"``, ``hybrid=False``, ``lam=0`` at
step ``eta`` gives ``dW_blk = -(eta/2) msign(U_blk)``: exactly PerHeadMuon at ``lr = eta/2``
(same msign backend and Nesterov setting; CM's momentum ``m <- beta m + g`` is Muon's EMA times
``1/(1 - beta)``, and msign is scale-invariant; CM's decay ``eta*wd`` is PerHeadMuon's ``lr*(2 wd)``).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import (
    DEFAULT_ADAMW_PATTERNS,
    AttentionSpec,
    _check_coverage,
    find_attention,
    route_parameters,
)
from .layouts import mark_layouts
from .muon import Muon, muon_momentum, shape_scale
from .ops import decoupled_add
from .parallel.heads import head_updates
from .parallel.layout import local, local_part

__all__ = ["PerHeadMuon", "head_blocks", "PER_HEAD_KINDS"]

PER_HEAD_KINDS = ("heads", "muon", "adamw")  # a group's ``kind``: per-head attention, plain Muon, AdamW


def head_blocks(specs) -> tuple[list, list]:
    """AttentionSpecs -> (unique params, ``[param index, axis, offset, stride, n, d]`` per factor)."""
    params: list[torch.Tensor] = []
    index: dict[int, int] = {}
    blocks: list[list[int]] = []
    for spec in specs:
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"`attention` must hold AttentionSpec objects, got {type(spec).__name__}")
        for f, n in (("q", spec.num_heads), ("k", spec.num_kv_heads), ("v", spec.num_kv_heads), ("o", spec.num_heads)):
            hs = getattr(spec, f)
            if hs is None:
                continue
            axis, offset, stride = hs.resolved(n, spec.head_dim, f"attention {spec.name!r} factor {f}")
            if id(hs.param) not in index:
                index[id(hs.param)] = len(params)
                params.append(hs.param)
            blocks.append([index[id(hs.param)], axis, offset, stride, n, spec.head_dim])
    _check_coverage(specs)
    return params, blocks


def _extra_groups(muon: list, adamw: list, muon_kw: dict, adamw_kw: dict) -> list:
    """The Muon and AdamW groups of ``from_model`` (each only when it has parameters)."""
    out = []
    if muon:
        out.append(dict(params=[p for _, p in muon], use_muon=True, **muon_kw))
    if adamw:
        out.append(dict(params=[p for _, p in adamw], use_muon=False, **adamw_kw))
    return out


def _plain_group_kind(group: dict) -> None:
    """A non-heads group's ``kind`` and ``use_muon``: either given (they must agree), the other derived."""
    kind = group.setdefault("kind", "muon" if group.get("use_muon", True) else "adamw")
    if kind not in PER_HEAD_KINDS:
        raise ValueError(f"PerHeadMuon: unknown param group kind {kind!r}; expected one of {PER_HEAD_KINDS}")
    use_muon = group.setdefault("use_muon", kind == "muon")
    if use_muon is not (kind == "muon"):
        raise ValueError(f"PerHeadMuon: a kind={kind!r} group cannot set use_muon={use_muon!r}")


class PerHeadMuon(Muon):
    """Per-head Muon on attention, Muon on the other matrices, AdamW on the rest.

    Build it with :meth:`from_model`, or pass groups: ``dict(kind="heads", attention=[AttentionSpec,
    ...], lr=...)`` (its ``params`` come from the specs; every such parameter must be covered
    exactly once by head slices), plus Muon (``use_muon=True``) and AdamW (``use_muon=False``)
    groups as for :class:`MuonWithAuxAdam`. A heads group takes Muon's options (``lr``,
    ``momentum``, ``nesterov``, ``ns_steps``, ``weight_decay``, ``adjust_lr_fn``, ``backend``,
    ``msign_dtype``). DDP: the head msigns are spread over the ranks like Muon's matrices.
    DTensor weights (FSDP2, TP, HSDP, FSDP x TP, HSDP x TP; :mod:`.parallel.heads`): a weight whose
    head blocks each lie whole on one rank (TP's q/k/v rows and o columns) is orthogonalized where
    it lives, with no communication; one whose blocks' width is split (FSDP2's o rows) from the
    all-reduced ``d x d`` Grams; any other (a head across a shard boundary) is gathered, its
    head msigns spread, and each rank keeps its part.
    """

    def __init__(self, param_groups, *, nonfinite: str = "raise", distributed="auto"):
        self.routing: list = []  # (name, "heads" | "muon" | "adamw", shape), filled by from_model
        super().__init__(param_groups, nonfinite=nonfinite, distributed=distributed)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        lr: float = 0.02,
        muon_lr: float | None = None,
        adamw_lr: float = 3e-4,
        weight_decay: float = 0.0,
        adamw_weight_decay: float = 0.0,
        adamw_betas=(0.9, 0.95),
        adamw_eps: float = 1e-10,
        attention=None,
        head_dim=None,
        num_heads=None,
        num_kv_heads=None,
        adamw_patterns=DEFAULT_ADAMW_PATTERNS,
        muon_patterns=(),
        nonfinite: str = "raise",
        distributed="auto",
        **muon_options,
    ) -> PerHeadMuon:
        """Per-head Muon on every attention layer ``find_attention`` (or ``attention``) gives, Muon
        (``muon_lr``, default ``lr``) on the other matrices, AdamW on embeddings, head, gains and
        biases. ``muon_options`` (``momentum``, ``nesterov``, ``ns_steps``, ``adjust_lr_fn``,
        ``backend``, ``msign_dtype``) apply to both matrix groups. Expert stacks are tagged with
        :func:`~compositional_muon.layouts.mark_layouts` and orthogonalized per expert."""
        unknown = set(muon_options) - (set(Muon.matrix_defaults) - {"lr", "weight_decay"})
        if unknown:
            raise TypeError(f"unknown PerHeadMuon option(s) {sorted(unknown)}")
        heads_kw = dict(head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
        specs = list(attention) if attention is not None else find_attention(model, **heads_kw)
        if not specs:
            raise ValueError("no attention layer found in the model; pass attention=[AttentionSpec(...)] or use Muon")
        mark_layouts(model)
        heads, muon, adamw = route_parameters(model, specs, adamw_patterns, muon_patterns)
        muon_kw = dict(lr=lr if muon_lr is None else muon_lr, weight_decay=weight_decay, **muon_options)
        adamw_kw = dict(lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay)
        groups = [dict(kind="heads", attention=specs, lr=lr, weight_decay=weight_decay, **muon_options)]
        groups += _extra_groups(muon, adamw, muon_kw, adamw_kw)
        opt = cls(groups, nonfinite=nonfinite, distributed=distributed)
        opt.routing = [
            (n, kind, tuple(p.shape))
            for kind, ps in (("heads", heads), ("muon", muon), ("adamw", adamw))
            for n, p in ps
        ]
        return opt

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        if group.get("kind") == "heads" or "attention" in group:
            if group.get("use_muon", True) is not True:
                raise ValueError("a heads group is a matrix group; it cannot set use_muon=False")
            if "attention" in group:
                if "params" in group or "head_blocks" in group:
                    raise ValueError("give a heads group either `attention` specs or `params` + `head_blocks`")
                group["params"], group["head_blocks"] = head_blocks(group.pop("attention"))
            elif "head_blocks" not in group or "params" not in group:
                raise ValueError("a heads group needs `attention=[AttentionSpec, ...]`")
            group["kind"], group["use_muon"] = "heads", True
        else:
            _plain_group_kind(group)
        super().add_param_group(group)

    def _matrix_step(self, group: dict, params: list) -> None:
        if group["kind"] != "heads":
            return super()._matrix_step(group, params)
        lr, wd = float(group["lr"]), group["weight_decay"]
        present = {id(p) for p in params}
        blocks_of: dict[int, list] = {}
        for blk in group["head_blocks"]:
            blocks_of.setdefault(blk[0], []).append(blk)
        dirs = {}
        for i, p in enumerate(group["params"]):
            if id(p) in present:
                buf = self._state_buffer(p, "momentum_buffer")
                dirs[i] = muon_momentum(buf, p.grad, group["momentum"], group["nesterov"])
        updates = head_updates(
            dirs,
            blocks_of,
            lambda mats: self._orthogonalize_local(group, mats),
            lambda mats: self._orthogonalize(group, mats),
            group["backend"],
            None if group["backend"] == "svd" else int(group["ns_steps"]),
            lambda d, width: shape_scale(d, width, group["adjust_lr_fn"]),
        )
        for i, (upd, is_local) in updates.items():
            p = group["params"][i]
            decoupled_add(local(p), upd if is_local else local_part(upd, p), lr * wd, alpha=-lr)
