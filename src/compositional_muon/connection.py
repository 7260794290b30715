"""Gauge connections: remove the vertical (gauge) component of a factor-pair update.

A factor pair is ``A`` (``H`` heads, each ``d x D``) and ``B`` (``Hkv`` heads, ``d x D``) whose
product the loss sees per head as ``M_h = A_h^T B_g`` (``g`` the group of ``h``, ``G = H / Hkv``
query heads per group). QK is ``(A, B) = (W_q, W_k)``; OV is ``(A, B) = (W_o^T, W_v)``.

The products are unchanged by ``A_h -> X A_h`` (every ``h`` in ``g``), ``B_g -> X^{-T} B_g`` for an
invertible ``d x d`` matrix ``X`` per group, so the vertical directions at ``(A, B)`` are
``(X A_h, -X^T B_g)``. They change no product to first order. A connection picks the horizontal
part of an update ``(P, Q)``: the projection that removes the vertical part in a metric:

* ``"frobenius"``: ``sum_h ||P_h||^2 + ||Q_g||^2``. Normal equations (a Sylvester equation):
  ``G_B X + X G_A = sum_h P_h A_h^T - B_g Q_g^T`` with ``G_B = B_g B_g^T``,
  ``G_A = sum_h A_h A_h^T``.
* ``"scale_aware"``: ``sum_h <P_h, C_B^2 P_h> + <Q_g, C_A^2 Q_g>`` with ``C_B^2 = G_B + lam I``,
  ``C_A^2 = G_A + lam I``: each factor is measured by how much it moves the product
  (``||P_h^T B_g||_F^2 = <P_h, G_B P_h>``), the geometry CM whitens by. Normal equations:
  ``C_B^2 X G_A + G_B X C_A^2 = C_B^2 sum_h P_h A_h^T - B_g Q_g^T C_A^2``.
* ``"frobenius_scalar"`` / ``"scale_aware_scalar"``: the same metrics, gauge restricted to
  ``X = x I``; a scalar least-squares problem per group.

Both matrix equations are solved exactly in the eigenbases of ``G_B`` and ``G_A``, where they
are diagonal. Directions with a zero denominator are themselves zero (pseudo-inverse).
The projected update is ``P_h - X A_h``, ``Q_g + X^T B_g``.
"""

from __future__ import annotations

import torch

from .inverse_root import gram_eigh

__all__ = ["CONNECTIONS", "horizontal_projection", "vertical_coefficient"]

CONNECTIONS = ("none", "frobenius", "scale_aware", "frobenius_scalar", "scale_aware_scalar")


def _grouped(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """(..., H, d, D) -> (..., Hkv, G, d, D) view."""
    return x.unflatten(-3, (hkv, x.size(-3) // hkv))


def _inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dim=(-2, -1))


def vertical_coefficient(
    A, B, P, Q, connection: str, lam: float, eig_a=None, eig_b=None, *, grams=None
) -> torch.Tensor:
    """The gauge generator ``X`` (``(..., Hkv, d, d)``; ``(..., Hkv, 1, 1)`` for scalar connections).

    ``eig_a`` / ``eig_b`` optionally pass precomputed ``gram_eigh`` of the grouped ``G_A`` and
    ``G_B`` (shape ``(..., Hkv, d, d)``) so a caller that already has them avoids a second eigh;
    ``grams`` likewise passes ``(G_A, G_B)`` themselves (used by ``"scale_aware_scalar"``).
    """
    hkv = B.size(-3)
    Ag, Pg = _grouped(A, hkv), _grouped(P, hkv)
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    Ag, Pg, B, Q = Ag.to(work), Pg.to(work), B.to(work), Q.to(work)
    if connection.endswith("_scalar"):
        if connection == "frobenius_scalar":
            num = _inner(Pg, Ag).sum(-1) - _inner(Q, B)
            den = _inner(Ag, Ag).sum(-1) + _inner(B, B)
        else:  # scale_aware_scalar
            if grams is not None:
                Ga, Gb = (g.to(work) for g in grams)
            else:
                Ga, Gb = (Ag @ Ag.mT).sum(-3), B @ B.mT
            Cb2 = Gb + lam * torch.eye(Gb.size(-1), dtype=work, device=Gb.device)
            Ca2 = Ga + lam * torch.eye(Ga.size(-1), dtype=work, device=Ga.device)
            num = _inner(Ag, Cb2.unsqueeze(-3) @ Pg).sum(-1) - _inner(B, Ca2 @ Q)
            # sum_h <A_h, C_B^2 A_h> = <C_B^2, G_A> and <B, C_A^2 B> = <C_A^2, G_B>: d x d, no pass over A, B
            den = _inner(Cb2, Ga) + _inner(Ca2, Gb)
        safe = den > torch.finfo(work).tiny
        x = torch.where(safe, num / torch.where(safe, den, torch.ones_like(den)), torch.zeros_like(num))
        return x[..., None, None]

    sa, Ua = eig_a if eig_a is not None else gram_eigh((Ag @ Ag.mT).sum(-3))
    sb, Ub = eig_b if eig_b is not None else gram_eigh(B @ B.mT)
    sa, Ua, sb, Ub = sa.to(work), Ua.to(work), sb.to(work), Ub.to(work)
    PAt = (Pg @ Ag.mT).sum(-3)  # sum_h P_h A_h^T   (..., Hkv, d, d)
    BQt = B @ Q.mT  # B_g Q_g^T
    if connection == "frobenius":
        R = PAt - BQt
        denom = sb.unsqueeze(-1) + sa.unsqueeze(-2)
    elif connection == "scale_aware":
        # Both sides in the eigenbases: C_B^2 = Ub (sb+lam) Ub^T, C_A^2 = Ua (sa+lam) Ua^T.
        Rt_left = Ub.mT @ PAt @ Ua * (sb + lam).unsqueeze(-1)
        Rt_right = Ub.mT @ BQt @ Ua * (sa + lam).unsqueeze(-2)
        Rt = Rt_left - Rt_right
        denom = (sb + lam).unsqueeze(-1) * sa.unsqueeze(-2) + sb.unsqueeze(-1) * (sa + lam).unsqueeze(-2)
        return Ub @ _safe_divide(Rt, denom) @ Ua.mT
    else:
        raise ValueError(f"unknown connection {connection!r}; expected one of {CONNECTIONS}")
    return Ub @ _safe_divide(Ub.mT @ R @ Ua, denom) @ Ua.mT


def _safe_divide(num: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    scale = denom.amax(dim=(-2, -1), keepdim=True)
    tol = scale * (denom.size(-1) * torch.finfo(denom.dtype).eps)
    ok = denom > tol
    return torch.where(ok, num / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(num))


def horizontal_projection(A, B, P, Q, connection: str, lam: float, eig_a=None, eig_b=None, *, grams=None):
    """Return ``(P', Q')``: the update ``(P, Q)`` minus its vertical component in the metric named
    by ``connection``. Shapes: ``A, P`` ``(..., H, d, D)``; ``B, Q`` ``(..., Hkv, d, D)``.
    ``"none"`` returns the inputs unchanged. The first-order change of every product
    ``P_h^T B_g + A_h^T Q_g`` is the same before and after. ``eig_a``, ``eig_b``, ``grams``: optional
    precomputed Gram data, see :func:`vertical_coefficient`."""
    if connection == "none":
        return P, Q
    if connection not in CONNECTIONS:
        raise ValueError(f"unknown connection {connection!r}; expected one of {CONNECTIONS}")
    hkv = B.size(-3)
    X = vertical_coefficient(A, B, P, Q, connection, lam, eig_a, eig_b, grams=grams)
    Ag = _grouped(A, hkv).to(X.dtype)
    if X.size(-1) == 1:  # scalar gauge
        dP = X.unsqueeze(-3) * Ag
        dQ = X * B.to(X.dtype)
    else:
        dP = X.unsqueeze(-3) @ Ag
        dQ = X.mT @ B.to(X.dtype)
    P_new = (_grouped(P, hkv) - dP.to(P.dtype)).flatten(-4, -3)
    Q_new = Q + dQ.to(Q.dtype)
    return P_new, Q_new
