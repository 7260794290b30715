"""Circuit-Muon: the closest prior art to CM, as a baseline (modded-nanogpt track 3, record #41).

Muon on every hidden matrix (one msign per whole matrix), then, for each attention OV pair only,
a partner-aware rescaling of the finished updates (no whitening, no QK treatment):

1. per value head ``g``: ``dV_g *= s_O,g``, ``s_O,g = (sum_{h in g} ||Wo_h||_F^2 / d + lam)^(-1/2)``;
   per output head ``h``: ``dO_h *= s_V,g(h)``, ``s_V,g = (||Wv_g||_F^2 / d + lam)^(-1/2)``;
2. each leg's (``W_v``'s, ``W_o``'s) total Frobenius norm restored to its value before step 1;
3. a scalar gauge step per head group:
   ``x = (<Wv_g, dV_g> - sum_h <Wo_h, dO_h>) / (||Wv_g||^2 + sum_h ||Wo_h||^2 + 2 d lam)``,
   ``dV_g -= x Wv_g``, ``dO_h += x Wo_h``.

``lam = 1e-3`` as in the record. Compare with CM's ``isotropic=True``: CM's scalars divide the step
per head without restoring the leg norm, and CM also treats QK and whitens with full Grams.
"""

from __future__ import annotations

import torch
from torch import nn

from . import validation
from .attention import DEFAULT_ADAMW_PATTERNS, AttentionSpec, find_attention, route_parameters
from .muon import Muon, shape_scale
from .ops import decoupled_add
from .plan import HeadRef, PairLayout

__all__ = ["CircuitMuon"]


class CircuitMuon(Muon):
    """Muon + Circuit-Muon's OV rescaling. Build with :meth:`from_model`."""

    checked_attributes = ("lam",)  # validated with the param groups at every step (validation.py)
    bucketed = False  # the V/O circuit correction couples the matrices of a pair
    supports_experts = False  # expert stacks (3-D) are refused: no per-expert rule here

    def __init__(self, param_groups, ov_pairs=(), *, lam: float = 1e-3, nonfinite: str = "raise"):
        validation.check_value("lam", lam, "CircuitMuon: ")
        self.lam = lam
        # OV pairs in the library's one pair schema: (PairLayout, W_v, W_o); an AttentionSpec is
        # converted (its ``o`` is the layout's ``a`` factor, ``v`` the ``b`` factor, as in CM)
        self.ov_pairs: list[tuple[PairLayout, torch.Tensor, torch.Tensor]] = [_ov_pair(s) for s in ov_pairs]
        super().__init__(param_groups, nonfinite=nonfinite)
        muon_ids = {id(p) for g in self.param_groups if g["use_muon"] for p in g["params"]}
        for layout, pv, po in self.ov_pairs:
            if id(pv) not in muon_ids or id(po) not in muon_ids:
                raise ValueError(f"OV pair {layout.name!r}: its weights must be in a use_muon=True group")

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        lr: float = 0.02,
        adamw_lr: float = 3e-4,
        weight_decay: float = 0.0,
        adamw_weight_decay: float = 0.0,
        adamw_betas=(0.9, 0.95),
        lam: float = 1e-3,
        momentum: float = 0.95,
        attention=None,
        adamw_patterns=DEFAULT_ADAMW_PATTERNS,
        **muon_kwargs,
    ):
        specs = list(attention) if attention is not None else find_attention(model)
        cm, muon, adamw = route_parameters(model, specs, adamw_patterns)
        groups = [
            dict(
                params=[p for _, p in cm + muon],
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                use_muon=True,
                **muon_kwargs,
            )
        ]
        if adamw:
            groups.append(
                dict(
                    params=[p for _, p in adamw],
                    lr=adamw_lr,
                    betas=adamw_betas,
                    weight_decay=adamw_weight_decay,
                    use_muon=False,
                )
            )
        return cls(groups, [s for s in specs if s.v is not None], lam=lam)

    @torch.no_grad()
    def _matrix_step(self, group: dict, params: list) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        zs = self._orthogonalize(group, self._directions(group, params))
        deltas = {}
        for p, z in zip(params, zs):
            deltas[id(p)] = (-lr * shape_scale(z.size(0), z.size(1), group["adjust_lr_fn"])) * z.reshape(p.shape).to(
                p.dtype
            )
        for layout, pv, po in self.ov_pairs:
            if id(pv) in deltas and id(po) in deltas:
                self._circuit(layout, pv, po, deltas[id(pv)], deltas[id(po)])
        for p in params:
            decoupled_add(p, deltas[id(p)], lr * wd)

    def _circuit(self, layout: PairLayout, pv, po, delta_v, delta_o) -> None:
        """Rescale, renormalize and gauge-fix the OV pair's updates in place (they are views)."""
        H, hkv, d, lam = layout.num_heads, layout.num_kv_heads, layout.head_dim, self.lam
        G = layout.group_size
        work = torch.promote_types(pv.dtype, torch.float32)
        O, V = (x.to(work) for x in layout.views(po, pv))  # O: (H, d, D) = Wo_h^T
        do_view, dv_view = layout.views(delta_o, delta_v)
        dV, dO = dv_view.to(work), do_view.to(work)
        o_sq = O.square().sum((-2, -1)).view(hkv, G)  # ||Wo_h||^2 per head, by group
        v_sq = V.square().sum((-2, -1))
        s_O = (o_sq.sum(1) / d + lam).rsqrt()  # per value head
        s_V = (v_sq / d + lam).rsqrt()  # per value head, applied to its group's O heads
        nv, no = dV.norm(), dO.norm()
        dV = dV * s_O.view(hkv, 1, 1)
        dO = (dO.view(hkv, G, d, -1) * s_V.view(hkv, 1, 1, 1)).view(H, d, -1)
        dV = dV * torch.where(dV.norm() > 0, nv / dV.norm(), torch.ones((), dtype=work))
        dO = dO * torch.where(dO.norm() > 0, no / dO.norm(), torch.ones((), dtype=work))
        num = (V * dV).sum((-2, -1)) - (O * dO).sum((-2, -1)).view(hkv, G).sum(1)
        den = v_sq + o_sq.sum(1) + 2 * d * lam
        x = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
        dV = dV - x.view(hkv, 1, 1) * V
        dO = dO + (x.view(hkv, 1, 1, 1) * O.view(hkv, G, d, -1)).view(H, d, -1)
        dv_view.copy_(dV)
        do_view.copy_(dO)


def _ov_pair(spec: AttentionSpec) -> tuple[PairLayout, torch.Tensor, torch.Tensor]:
    """The OV pair of an attention spec in the library's pair schema, with its two weights."""
    if not isinstance(spec, AttentionSpec) or spec.v is None or spec.o is None:
        raise TypeError(f"CircuitMuon's ov_pairs must be AttentionSpecs with v and o, got {spec!r}")
    d, what = spec.head_dim, f"attention {spec.name!r}"
    refs = [HeadRef(-1, *hs.resolved(n, d, what)) for hs, n in ((spec.o, spec.num_heads), (spec.v, spec.num_kv_heads))]
    layout = PairLayout(spec.name, "ov", d, spec.num_heads, spec.num_kv_heads, refs[0], refs[1])
    return layout, spec.v.param, spec.o.param
