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

from .attention import DEFAULT_ADAMW_PATTERNS, find_attention, head_view, route_parameters
from .muon import Muon, shape_scale

__all__ = ["CircuitMuon"]


class CircuitMuon(Muon):
    """Muon + Circuit-Muon's OV rescaling. Build with :meth:`from_model`."""

    def __init__(self, param_groups, ov_pairs=(), *, lam: float = 1e-3, nonfinite: str = "raise"):
        if lam < 0:
            raise ValueError(f"`lam` must be >= 0, got {lam}")
        self.lam = lam
        self.ov_pairs = list(ov_pairs)
        Muon.__init__(self, param_groups, nonfinite=nonfinite)
        muon_ids = {id(p) for g in self.param_groups if g["use_muon"] for p in g["params"]}
        for pair in self.ov_pairs:
            if id(pair["v"].param) not in muon_ids or id(pair["o"].param) not in muon_ids:
                raise ValueError(f"OV pair {pair['name']!r}: its weights must be in a use_muon=True group")

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
        pairs = [
            dict(name=s.name, v=s.v, o=s.o, H=s.num_heads, Hkv=s.num_kv_heads, d=s.head_dim)
            for s in specs
            if s.v is not None
        ]
        return cls(groups, pairs, lam=lam)

    @torch.no_grad()
    def _matrix_step(self, group: dict, params: list) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        zs = self._orthogonalize(group, self._directions(group, params))
        deltas = {}
        for p, z in zip(params, zs):
            deltas[id(p)] = (-lr * shape_scale(z.size(0), z.size(1), group["adjust_lr_fn"])) * z.reshape(p.shape).to(
                p.dtype
            )
        for pair in self.ov_pairs:
            pv, po = pair["v"].param, pair["o"].param
            if id(pv) in deltas and id(po) in deltas:
                self._circuit(pair, pv, po, deltas[id(pv)], deltas[id(po)])
        for p in params:
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(deltas[id(p)])

    def _circuit(self, pair, pv, po, delta_v, delta_o) -> None:
        """Rescale, renormalize and gauge-fix the OV pair's updates in place (they are views)."""
        H, hkv, d, lam = pair["H"], pair["Hkv"], pair["d"], self.lam
        G = H // hkv
        vs, os_ = pair["v"], pair["o"]
        work = torch.promote_types(pv.dtype, torch.float32)
        V = head_view(pv, vs.axis, vs.offset, vs.stride or d, hkv, d).to(work)
        O = head_view(po, os_.axis, os_.offset, os_.stride or d, H, d).to(work)  # (H, d, D): Wo_h^T
        dv_view = head_view(delta_v, vs.axis, vs.offset, vs.stride or d, hkv, d)
        do_view = head_view(delta_o, os_.axis, os_.offset, os_.stride or d, H, d)
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
