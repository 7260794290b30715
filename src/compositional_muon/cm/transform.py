"""NorMuon's row normalization in CM's whitened head space (``transform="normuon"``)."""

from __future__ import annotations

import torch

__all__ = ["normalize_head_rows"]


def normalize_head_rows(
    Z: torch.Tensor, v: torch.Tensor, beta2: float, eps: float = 1e-8, *, unit_dims: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """NorMuon's row normalization (arXiv:2510.05491, Alg. 1) in CM's whitened head space.

    ``Z``: msign outputs ``(..., d, D)``, one row per head channel; ``v``: their running second
    moments ``(..., d, 1)``. With ``v' = beta2 v + (1 - beta2) mean_cols(Z * Z)`` the rows become
    ``Z / (sqrt(v') + eps)``, then every msign unit (one head's ``d x D`` block for ``unit_dims=0``;
    ``unit_dims=k`` joins the ``k`` dims before the row dim into one unit, e.g. ``k=2`` for the
    hybrid O leg's layer-wide msign over ``(Hkv, G, d)`` rows) is
    rescaled to the spectral norm it had before, so CM's composed-norm bound is unchanged.
    Returns ``(Z', v')``; works in float32 at least; pure.
    """
    work = torch.promote_types(Z.dtype, torch.float32)
    Zw = Z.to(work)
    new_v = v.to(work).lerp(Zw.square().mean(dim=-1, keepdim=True), 1 - beta2)
    Zn = Zw / (new_v.sqrt() + eps)

    def opnorm(
        X: torch.Tensor,
    ) -> torch.Tensor:  # spectral norm of each unit: sqrt(lambda_max(X X^T)) on the small side
        X = X.flatten(-2 - unit_dims, -2) if unit_dims else X
        gram = X @ X.mT if X.size(-2) <= X.size(-1) else X.mT @ X
        lam = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()
        for _ in range(unit_dims + 2):
            lam = lam.unsqueeze(-1)
        return lam

    before, after = opnorm(Zw), opnorm(Zn)
    ratio = torch.where(
        after > 0, before / torch.where(after > 0, after, torch.ones_like(after)), torch.zeros_like(after)
    )
    return (Zn * ratio).to(Z.dtype), new_v
