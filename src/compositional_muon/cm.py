"""Compositional Muon: partner-whitened steepest descent for attention's QK and OV products.

Layout is nn.Linear's (weight = out x in). ``D`` model width, ``H`` query heads, ``d`` head_dim,
``Hkv`` key/value heads (``G = H / Hkv`` query heads per group).

Both circuits are handled by one kernel over a *factor pair* ``(A, B)``: ``A`` has ``H`` head
blocks ``A_h`` (``d x D``), ``B`` has ``Hkv`` head blocks ``B_g``, and the loss sees
``M_h = A_h^T B_g``:

* QK: ``A_h = W_q[h d:(h+1) d]``, ``B_g = W_k[g d:(g+1) d]``, ``M_h = W_q,h^T W_k,g``.
* OV: ``A_h = W_o[:, h d:(h+1) d]^T``, ``B_g = W_v[g d:(g+1) d]``, ``M_h = W_o,h W_v,g``.

With ``C_B = (B_g B_g^T + lam I)^{1/2}`` and ``C_A,g = (sum_{h in g} A_h A_h^T + lam I)^{1/2}``
the half-split rule is ``dA_h = -(eta/2) C_B^{-1} msign(C_B^{-1} U_A,h)`` and
``dB_g = -(eta/2) C_A^{-1} msign(C_A^{-1} U_B,g)`` (``U`` the momentum), which bounds every
``||dA_h^T B_g||_op`` and ``||A_h^T dB_g||_op`` by ``eta/2``. See ``docs/math.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .connection import CONNECTIONS, horizontal_projection
from .inverse_root import (
    NEWTON_ITERS,
    ROOT_METHODS,
    gram_eigh,
    inverse_cholesky_factor,
    inverse_sqrt_newton,
)
from .msign import BACKENDS, default_msign_dtype, msign

__all__ = [
    "cm_qk",
    "cm_ov",
    "CMConfig",
    "pair_update",
    "normalize_head_rows",
    "compiled_pair_update",
    "NonFiniteError",
    "cm_momentum",
    "METHODS",
    "WHITENINGS",
    "CONNECTIONS",
]

METHODS = ("half_split", "joint")
WHITENINGS = ("both", "pre", "post", "none")
NONFINITE = ("raise", "skip")


class NonFiniteError(FloatingPointError):
    """A gradient or the computed update holds NaN/inf; nothing was written."""


@dataclass(frozen=True)
class CMConfig:
    """The variant switches of one CM update (reference names and defaults).

    ``method``: "half_split" (each factor gets ``eta/2``) or "joint" (one msign over both whitened
    factors of a group stacked side by side along the shared head dimension, step ``eta``).
    ``isotropic``: replace each partner root by the scalar ``sqrt(||W_partner||_F^2 / d + lam)``.
    ``hybrid``: msign the ``A`` factor (OV: ``W_o``) as one whole matrix instead of per head.
    ``whitening``: apply ``C^{-1}`` "both" before and after msign, only "pre", only "post", "none".
    ``connection``: remove the gauge component of the update (see ``connection.py``).
    ``per_mat_renorm``: rescale each factor's update to the Frobenius norm it had before
    post-whitening. ``lam``: ridge added to every partner Gram (absolute, in the Gram's units).
    ``msign_backend`` / ``msign_steps`` / ``msign_dtype``: see ``msign.py``.
    ``root_method``: "auto", "eigh" or "newton" (see ``inverse_root.py``).
    """

    method: str = "half_split"
    isotropic: bool = False
    hybrid: bool = False
    whitening: str = "both"
    connection: str = "none"
    per_mat_renorm: bool = False
    lam: float = 1e-2
    msign_backend: str = "polar_express"
    msign_steps: int | None = None
    msign_dtype: torch.dtype | None = None
    root_method: str = "auto"
    root_iters: int = NEWTON_ITERS

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        _choice("whitening", self.whitening, WHITENINGS)
        _choice("connection", self.connection, CONNECTIONS)
        _choice("msign_backend", self.msign_backend, BACKENDS)
        _choice("root_method", self.root_method, ROOT_METHODS)
        for name in ("isotropic", "hybrid", "per_mat_renorm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be a bool, got {getattr(self, name)!r}")
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0 and self.lam == self.lam):
            raise ValueError(f"`lam` must be a finite number >= 0, got {self.lam!r}")


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {options}")


# ----------------------------------------------------------------------------------------------
# The kernel: pure function on layer-batched head blocks.
# ----------------------------------------------------------------------------------------------


class _Roots(NamedTuple):
    """Partner whitening factors of one pair: ``pre_*`` multiply the momentum before msign,
    ``post_*`` the msign after it (``(L, Hkv, d, d)``, or ``(L, Hkv, 1, 1)`` if isotropic). For the
    symmetric root ``C^{-1}`` both are ``C^{-1}``; for the Cholesky factor ``C^2 = L L^T`` they are
    ``L^{-1}`` and ``L^{-T}`` (same update, see :func:`_partner_roots`). ``eig_*`` and ``grams``
    are reused by the gauge connections when they were computed."""

    pre_b: torch.Tensor
    pre_a: torch.Tensor
    post_b: torch.Tensor
    post_a: torch.Tensor
    eig_a: tuple | None = None
    eig_b: tuple | None = None
    grams: tuple | None = None


def _partner_roots(A: torch.Tensor, B: torch.Tensor, cfg: CMConfig, need_eigh: bool) -> _Roots:
    """Whitening factors for ``B``'s partner root (applied to ``A``'s update) and ``A``'s grouped
    partner root (applied to ``B``'s), plus the eigendecompositions of the grouped Grams when
    they were computed (gauge connections need them).

    Root paths: the symmetric ``C^{-1}`` by ``eigh`` or Newton, and, with ``root_method="auto"`` on
    CPU for the half-split rule whitened on both sides, the Cholesky factor ``C^2 = L L^T``: with
    ``L = C Q`` (``Q`` orthogonal) ``L^{-T} msign(L^{-1} U) = C^{-1} Q Q^T msign(C^{-1} U)``, the
    same update, because ``msign(Q^T X) = Q^T msign(X)``; per-head or hybrid, a left orthogonal
    factor (block-diagonal over heads) commutes with msign. One batched Cholesky plus a
    triangular solve is ~5x cheaper than a batched ``eigh`` of the same ``d x d`` Grams on CPU."""
    L, hkv, d = B.size(0), B.size(1), B.size(2)
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    if cfg.isotropic and not need_eigh:
        sq_a = A.to(work).square().sum(dim=(-2, -1)).unflatten(1, (hkv, -1)).sum(2)  # (L, Hkv)
        sq_b = B.to(work).square().sum(dim=(-2, -1))
        r_a = (sq_a / d + cfg.lam).rsqrt()[..., None, None]
        r_b = (sq_b / d + cfg.lam).rsqrt()[..., None, None]
        return _Roots(r_b, r_a, r_b, r_a)
    Aw, Bw = A.to(work), B.to(work)
    Ga = (Aw @ Aw.mT).unflatten(1, (hkv, -1)).sum(2)  # (L, Hkv, d, d): stacked group Gram
    Gb = Bw @ Bw.mT
    if cfg.isotropic:
        r_a = (Ga.diagonal(dim1=-2, dim2=-1).sum(-1) / d + cfg.lam).rsqrt()[..., None, None]
        r_b = (Gb.diagonal(dim1=-2, dim2=-1).sum(-1) / d + cfg.lam).rsqrt()[..., None, None]
        return _Roots(r_b, r_a, r_b, r_a, gram_eigh(Ga), gram_eigh(Gb), (Ga, Gb))
    method = cfg.root_method
    if method == "auto":
        if A.device.type == "cpu" and not need_eigh and cfg.method == "half_split" and cfg.whitening == "both":
            method = "cholesky"
        else:
            method = "eigh" if (A.device.type == "cpu" or need_eigh) else "newton"
    if method == "cholesky":
        inv_b, inv_a = inverse_cholesky_factor(torch.stack((Gb, Ga)), cfg.lam).unbind(0)
        return _Roots(inv_b, inv_a, inv_b.mT, inv_a.mT, grams=(Ga, Gb))
    if method == "newton":
        r_b = inverse_sqrt_newton(Gb, cfg.lam, cfg.root_iters)
        r_a = inverse_sqrt_newton(Ga, cfg.lam, cfg.root_iters)
        return _Roots(r_b, r_a, r_b, r_a, grams=(Ga, Gb))
    # one batched eigh for both Grams (same shape)
    s, U = gram_eigh(torch.stack((Ga, Gb)))
    eig_a, eig_b = (s[0], U[0]), (s[1], U[1])

    def root(eig):
        s, U = eig
        return (U * (s + cfg.lam).rsqrt().unsqueeze(-2)) @ U.mT

    r_b, r_a = root(eig_b), root(eig_a)
    return _Roots(r_b, r_a, r_b, r_a, eig_a, eig_b, (Ga, Gb))


def _left(R: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Apply a per-group left factor ``R`` (``(L, Hkv, d, d)`` or ``(L, Hkv, 1, 1)``) to ``X``
    of shape ``(L, Hkv, G, d, D)``."""
    R = R.unsqueeze(2).to(X.dtype)
    return R * X if R.size(-1) == 1 else R @ X


def pair_update(A, B, Ua, Ub, eta: float, cfg: CMConfig, z_transform=None):
    """The CM update ``(dA, dB)`` for a layer-batched factor pair (nothing is modified).

    ``A, Ua``: ``(L, H, d, D)``; ``B, Ub``: ``(L, Hkv, d, D)`` with ``H % Hkv == 0``. ``Ua, Ub``
    are the (momentum) directions to descend along; ``A, B`` the current weights, from which the
    partner roots are computed. Returns updates in the dtype of ``Ua`` / ``Ub``.

    Every head of every layer goes through one batched call per stage: the roots are batched
    ``d x d`` factorizations, the whitenings batched matmuls, and the per-head msigns of both
    factors one batched msign (``(L, Hkv, G + 1, d, D)``); the step ``-eta/2`` is folded into the
    small post-whitening factors instead of a pass over the update. See :func:`compiled_pair_update`
    for the ``torch.compile`` path.

    ``z_transform``: optional ``(Za, Zb) -> (Za, Zb)`` applied to the msign outputs in whitened
    coordinates (``(L, Hkv, G, d, D)`` and ``(L, Hkv, 1, d, D)``) before the post-whitening; the
    optimizer uses it for ``transform="normuon"`` (:func:`normalize_head_rows`).
    """
    L, H, d, D = A.shape
    hkv = B.size(1)
    G = H // hkv
    need_eigh = cfg.connection in ("frobenius", "scale_aware")
    roots = _partner_roots(A, B, cfg, need_eigh)
    R_b, R_a = roots.pre_b, roots.pre_a
    pre = cfg.whitening in ("both", "pre")
    post = cfg.whitening in ("both", "post")

    Ua_g = Ua.unflatten(1, (hkv, G))  # (L, Hkv, G, d, D)
    Ub_g = Ub.unsqueeze(2)  # (L, Hkv, 1, d, D)
    work = R_b.dtype
    Xa = _left(R_b, Ua_g.to(work)) if pre else Ua_g.to(work)
    Xb = _left(R_a, Ub_g.to(work)) if pre else Ub_g.to(work)

    ms = dict(backend=cfg.msign_backend, steps=cfg.msign_steps, dtype=cfg.msign_dtype)
    if cfg.method == "half_split":
        scale = eta / 2
        if cfg.hybrid:
            Za = msign(Xa.reshape(L, H * d, D), **ms).reshape(L, hkv, G, d, D)
            Zb = msign(Xb, **ms)
        else:  # every head of both factors in one batched msign
            Z = msign(torch.cat((Xa, Xb), dim=2), **ms)
            Za, Zb = Z[:, :, :G], Z[:, :, G:]
    else:  # joint: one msign per group over [A_1 | ... | A_G | B] (d x (G+1) D), step eta
        scale = eta
        if cfg.hybrid:
            if G != 1:
                raise ValueError(
                    "method='joint' with hybrid=True stacks the whole W_o beside the whole W_v and "
                    "needs as many key/value heads as query heads; pass hybrid=False for GQA/MQA"
                )
            Z = msign(torch.cat([Xa.reshape(L, H * d, D), Xb.reshape(L, H * d, D)], dim=-1), **ms)
            Za = Z[..., :D].reshape(L, hkv, G, d, D)
            Zb = Z[..., D:].reshape(L, hkv, 1, d, D)
        else:
            stacked = torch.cat([Xa.movedim(2, -2).flatten(-2), Xb.squeeze(2)], dim=-1)  # (L, Hkv, d, (G+1) D)
            Z = msign(stacked, **ms)
            Za = Z[..., : G * D].unflatten(-1, (G, D)).movedim(-2, 2)
            Zb = Z[..., G * D :].unsqueeze(2)

    if z_transform is not None:
        Za, Zb = z_transform(Za, Zb)
    # The step -scale rides on the small d x d post factors (or on the per-layer renorm ratio);
    # only whitening "pre"/"none" without renorm needs a pass over the update for it.
    k = 1.0 if cfg.per_mat_renorm else -scale
    dA = _left(roots.post_b * k, Za) if post else Za * k
    dB = _left(roots.post_a * k, Zb) if post else Zb * k
    if cfg.per_mat_renorm:
        dA = dA * (_norm_ratio(Za, dA) * -scale)
        dB = dB * (_norm_ratio(Zb, dB) * -scale)
    dA = dA.flatten(1, 2)
    dB = dB.squeeze(2)
    if cfg.connection != "none":
        dA, dB = horizontal_projection(
            A.to(work), B.to(work), dA, dB, cfg.connection, cfg.lam, roots.eig_a, roots.eig_b, grams=roots.grams
        )
    return dA.to(Ua.dtype), dB.to(Ub.dtype)


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

    def opnorm(X):  # spectral norm of each unit: sqrt(lambda_max(X X^T)) on the small side
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


_COMPILED: dict = {}


def compiled_pair_update(A, B, Ua, Ub, eta: float, cfg: CMConfig, **compile_options):
    """:func:`pair_update` through ``torch.compile`` (same arguments, same result up to rounding).

    One compiled graph per configuration (and input shapes / dtypes / device, which
    ``torch.compile`` guards on); ``eta`` enters as a 0-d tensor so a learning-rate schedule does
    not recompile, and ``msign_dtype=None`` is resolved to the device's precision first.
    ``compile_options`` go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``).
    Raises RuntimeError where ``torch.compile`` is unavailable.
    """
    if not hasattr(torch, "compile"):
        raise RuntimeError("torch.compile is not available in this torch build")
    if cfg.msign_dtype is None and cfg.msign_backend != "svd":
        cfg = dataclasses.replace(cfg, msign_dtype=default_msign_dtype(A.device))
    key = (cfg, tuple(sorted(compile_options.items())))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = torch.compile(functools.partial(pair_update, cfg=cfg), dynamic=False, **compile_options)
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    return fn(A, B, Ua, Ub, torch.tensor(float(eta), dtype=work, device=A.device))


def _norm_ratio(ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per layer ``||ref||_F / ||x||_F`` over all heads (0/0 -> 1), shape ``(L, 1, 1, 1, 1)``."""
    dims = tuple(range(1, x.ndim))
    num = ref.square().sum(dims, keepdim=True).sqrt()
    den = x.square().sum(dims, keepdim=True).sqrt()
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.ones_like(den))


# ----------------------------------------------------------------------------------------------
# Validation and the public functional API.
# ----------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, like: torch.Tensor | None = None, shape=None, grad: bool = False) -> None:
    if t is None:
        raise TypeError(f"`{name}` is None" + (" (the parameter has no gradient)" if grad else ""))
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"`{name}` is a sparse tensor ({t.layout}); CM needs dense tensors")
    if t.is_complex():
        raise TypeError(f"`{name}` is complex ({t.dtype}); CM is defined for real weights only")
    if not t.is_floating_point():
        raise TypeError(f"`{name}` must be floating point, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"`{name}` has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if like is not None and t.device != like.device:
        raise ValueError(f"`{name}` is on {t.device} but the weights are on {like.device}")


def _check_pair_args(names, wa, wb, ga, gb, ma, mb, head_dim: int, num_kv_heads, a_rows_are_heads: bool):
    """Validate one factor pair given in nn.Linear layout; returns (H, Hkv, d, D)."""
    na, nb, nga, ngb, nma, nmb = names
    for n, w in ((na, wa), (nb, wb)):
        _check_tensor(n, w)
        if w.ndim != 2:
            raise ValueError(f"`{n}` must be a 2-D nn.Linear weight, got shape {tuple(w.shape)}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"`head_dim` must be a positive int, got {head_dim!r}")
    d = head_dim
    if a_rows_are_heads:  # QK: wa = W_q (H d, D), wb = W_k (Hkv d, D)
        D = wa.shape[1]
        if wa.shape[0] % d:
            raise ValueError(f"`{na}` has {wa.shape[0]} out-features, not divisible by head_dim={d}")
        if wb.shape[1] != D:
            raise ValueError(
                f"`{nb}` has shape {tuple(wb.shape)}; expected (num_kv_heads*{d}, {D}) to pair with `{na}` {tuple(wa.shape)}"
            )
        H = wa.shape[0] // d
    else:  # OV: wa = W_v (Hkv d, D), wb = W_o (D, H d)
        D = wa.shape[1]
        if wa.shape[0] % d:
            raise ValueError(f"`{na}` has {wa.shape[0]} out-features, not divisible by head_dim={d}")
        if wb.shape[0] != D:
            raise ValueError(
                f"`{nb}` has shape {tuple(wb.shape)}; expected ({D}, num_heads*{d}) to pair with `{na}` {tuple(wa.shape)}"
            )
        if wb.shape[1] % d:
            raise ValueError(f"`{nb}` has {wb.shape[1]} in-features, not divisible by head_dim={d}")
        H = wb.shape[1] // d
    kv_w = wb if a_rows_are_heads else wa
    if kv_w.shape[0] % d:
        raise ValueError(
            f"`{nb if a_rows_are_heads else na}` has {kv_w.shape[0]} out-features, not divisible by head_dim={d}"
        )
    hkv = kv_w.shape[0] // d
    if num_kv_heads is not None and num_kv_heads != hkv:
        raise ValueError(f"num_kv_heads={num_kv_heads} but the key/value weight has {hkv} heads of head_dim={d}")
    if hkv < 1 or H % hkv:
        raise ValueError(f"the number of heads ({H}) must be a multiple of the number of key/value heads ({hkv})")
    if wa.device != wb.device:
        raise ValueError(f"`{na}` is on {wa.device} but `{nb}` is on {wb.device}")
    for n, g, w in ((nga, ga, wa), (ngb, gb, wb)):
        _check_tensor(n, g, like=w, shape=w.shape, grad=True)
        if g.dtype != w.dtype:
            raise TypeError(f"`{n}` has dtype {g.dtype} but its weight has {w.dtype}")
    for n, m, w in ((nma, ma, wa), (nmb, mb, wb)):
        _check_tensor(n, m, like=w, shape=w.shape)
    return H, hkv, d, D


def cm_momentum(A, B, ga, gb, ma, mb, *, beta: float, nesterov: bool, momentum_reproject: bool, cfg: CMConfig):
    """New momenta ``beta m + g`` (projected to the horizontal space if ``momentum_reproject``) and
    the directions the update descends along (``g + beta m_new`` with ``nesterov``). Out of place;
    shapes as in :func:`pair_update`; momenta keep their buffers' dtype."""
    new_ma = torch.add(ga.to(ma.dtype), ma, alpha=beta)
    new_mb = torch.add(gb.to(mb.dtype), mb, alpha=beta)
    if momentum_reproject:
        pa, pb = horizontal_projection(A, B, new_ma, new_mb, cfg.connection, cfg.lam)
        new_ma, new_mb = pa.to(ma.dtype), pb.to(mb.dtype)
    if nesterov:
        return (
            new_ma,
            new_mb,
            torch.add(ga.to(ma.dtype), new_ma, alpha=beta),
            torch.add(gb.to(mb.dtype), new_mb, alpha=beta),
        )
    return new_ma, new_mb, new_ma, new_mb


def finite_flags(tensors) -> torch.Tensor:
    """A bool vector: is each tensor free of NaN/inf. One reduction pass per tensor (the sum, in
    float32 at least, is non-finite whenever an element is); only where a sum is non-finite is the
    exact elementwise check run, so a finite tensor whose sum overflows is not misreported."""
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    sums = torch.stack([t.sum(dtype=torch.promote_types(t.dtype, torch.float32)).float() for t in tensors])
    flags = torch.isfinite(sums)
    if not bool(flags.all()):
        flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    return flags


def all_finite(*tensors) -> bool:
    """One host sync for the finiteness of several tensors."""
    return bool(finite_flags(list(tensors)).all())


def _apply_pair(
    views, *, eta, beta, nesterov, weight_decay, momentum_reproject, cfg: CMConfig, on_nonfinite: str, grad_names
) -> bool:
    """Shared body of cm_qk / cm_ov on kernel-layout head views ``(A, B, gA, gB, mA, mB)``
    (``(H, d, D)`` / ``(Hkv, d, D)``) of the caller's tensors; writes through the views."""
    A, B, ga, gb, ma, mb = views
    new_ma, new_mb, ua, ub = cm_momentum(
        A, B, ga, gb, ma, mb, beta=beta, nesterov=nesterov, momentum_reproject=momentum_reproject, cfg=cfg
    )
    dA, dB = pair_update(A.unsqueeze(0), B.unsqueeze(0), ua.unsqueeze(0), ub.unsqueeze(0), eta, cfg)
    if not all_finite(dA, dB, new_ma, new_mb):
        bad = [n for n, g in zip(grad_names, (ga, gb)) if not all_finite(g)]
        if bad:
            if on_nonfinite == "skip":
                return False
            raise NonFiniteError(
                f"non-finite values in {', '.join('`' + b + '`' for b in bad)}; the step was not applied"
            )
        raise NonFiniteError(
            "the CM update is not finite although the gradients are: a partner Gram is singular "
            f"(lam={cfg.lam}); use lam > 0. Nothing was written"
        )
    ma.copy_(new_ma)
    mb.copy_(new_mb)
    apply_update(A, dA[0], eta * weight_decay)
    apply_update(B, dB[0], eta * weight_decay)
    return True


def apply_update(w: torch.Tensor, delta: torch.Tensor, decay: float) -> None:
    """``w <- (1 - decay) w + delta`` in place (``w`` may be a view of a parameter)."""
    if decay:
        w.mul_(1 - decay)
    w.add_(delta.to(w.dtype))


def _validate_scalars(eta, beta, weight_decay, on_nonfinite, momentum_reproject, connection):
    if not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"`eta` must be a number >= 0, got {eta!r}")
    if not isinstance(beta, (int, float)) or not 0 <= beta < 1:
        raise ValueError(f"`beta` must be in [0, 1), got {beta!r}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
    _choice("on_nonfinite", on_nonfinite, NONFINITE)
    if momentum_reproject and connection == "none":
        raise ValueError(
            "momentum_reproject=True projects the momentum with the connection's metric; choose a connection other than 'none'"
        )


@torch.no_grad()
def cm_qk(
    wq: torch.Tensor,
    wk: torch.Tensor,
    gq: torch.Tensor,
    gk: torch.Tensor,
    mq: torch.Tensor,
    mk: torch.Tensor,
    *,
    head_dim: int,
    eta: float,
    method: str = "half_split",
    isotropic: bool = False,
    whitening: str = "both",
    connection: str = "none",
    momentum_reproject: bool = False,
    per_mat_renorm: bool = False,
    beta: float = 0.95,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    lam: float = 1e-2,
    num_kv_heads: int | None = None,
    msign_backend: str = "polar_express",
    msign_steps: int | None = None,
    msign_dtype: torch.dtype | None = None,
    root_method: str = "auto",
    on_nonfinite: str = "raise",
) -> bool:
    """One in-place CM step on an attention layer's query/key weights.

    ``wq`` (``H*d x D``) and ``wk`` (``Hkv*d x D``) are nn.Linear weights, ``gq``/``gk`` their
    gradients, ``mq``/``mk`` caller-managed momentum buffers (zeros at init) updated in place as
    ``m <- beta m + g``. Per head ``h`` (key head ``g`` of its group)::

        dWq_h = -(eta/2) C_K^-1 msign(C_K^-1 Uq_h),  C_K = (Wk_g Wk_g^T + lam I)^(1/2)
        dWk_g = -(eta/2) C_Q^-1 msign(C_Q^-1 Uk_g),  C_Q = (sum_{h in g} Wq_h Wq_h^T + lam I)^(1/2)

    with ``U = m`` (or ``g + beta m`` when ``nesterov``), then decoupled weight decay
    ``W <- (1 - eta*weight_decay) W``. Returns True if the step was applied, False if it was
    skipped for a non-finite gradient (``on_nonfinite="skip"``; the default "raise" raises
    :class:`NonFiniteError` and writes nothing).
    """
    cfg = CMConfig(
        method=method,
        isotropic=isotropic,
        hybrid=False,
        whitening=whitening,
        connection=connection,
        per_mat_renorm=per_mat_renorm,
        lam=lam,
        msign_backend=msign_backend,
        msign_steps=msign_steps,
        msign_dtype=msign_dtype,
        root_method=root_method,
    )
    _validate_scalars(eta, beta, weight_decay, on_nonfinite, momentum_reproject, connection)
    H, hkv, d, D = _check_pair_args(
        ("wq", "wk", "gq", "gk", "mq", "mk"), wq, wk, gq, gk, mq, mk, head_dim, num_kv_heads, a_rows_are_heads=True
    )

    def heads(t):  # (H d, D) -> (H, d, D)
        return t.unflatten(0, (-1, d))

    return _apply_pair(
        tuple(heads(t) for t in (wq, wk, gq, gk, mq, mk)),
        eta=eta,
        beta=beta,
        nesterov=nesterov,
        weight_decay=weight_decay,
        momentum_reproject=momentum_reproject,
        cfg=cfg,
        on_nonfinite=on_nonfinite,
        grad_names=("gq", "gk"),
    )


@torch.no_grad()
def cm_ov(
    wv: torch.Tensor,
    wo: torch.Tensor,
    gv: torch.Tensor,
    go: torch.Tensor,
    mv: torch.Tensor,
    mo: torch.Tensor,
    *,
    head_dim: int,
    eta: float,
    method: str = "half_split",
    isotropic: bool = False,
    hybrid: bool = True,
    whitening: str = "both",
    connection: str = "none",
    momentum_reproject: bool = False,
    per_mat_renorm: bool = False,
    beta: float = 0.95,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    lam: float = 1e-2,
    num_kv_heads: int | None = None,
    msign_backend: str = "polar_express",
    msign_steps: int | None = None,
    msign_dtype: torch.dtype | None = None,
    root_method: str = "auto",
    on_nonfinite: str = "raise",
) -> bool:
    """One in-place CM step on an attention layer's value/output weights.

    ``wv`` (``Hkv*d x D``) and ``wo`` (``D x H*d``) are nn.Linear weights; ``gv``/``go`` their
    gradients; ``mv``/``mo`` caller-managed momentum buffers. With
    ``C_O = (sum_{h in g} Wo_h^T Wo_h + lam I)^(1/2)`` and ``C_V = (Wv_g Wv_g^T + lam I)^(1/2)``::

        dWv_g = -(eta/2) C_O^-1 msign(C_O^-1 Uv_g)                       (per head)
        dWo   = -(eta/2) [Z_1 C_V1^-1 | ... | Z_H C_VH^-1],
                Z = msign([Uo_1 C_V1^-1 | ... | Uo_H C_VH^-1])           (hybrid=True: one msign)
        dWo_h = -(eta/2) msign(Uo_h C_Vh^-1) C_Vh^-1                     (hybrid=False: per head)

    Other arguments as in :func:`cm_qk`.
    """
    cfg = CMConfig(
        method=method,
        isotropic=isotropic,
        hybrid=hybrid,
        whitening=whitening,
        connection=connection,
        per_mat_renorm=per_mat_renorm,
        lam=lam,
        msign_backend=msign_backend,
        msign_steps=msign_steps,
        msign_dtype=msign_dtype,
        root_method=root_method,
    )
    _validate_scalars(eta, beta, weight_decay, on_nonfinite, momentum_reproject, connection)
    H, hkv, d, D = _check_pair_args(
        ("wv", "wo", "gv", "go", "mv", "mo"), wv, wo, gv, go, mv, mo, head_dim, num_kv_heads, a_rows_are_heads=False
    )

    def v_heads(t):  # (Hkv d, D) -> (Hkv, d, D)
        return t.unflatten(0, (-1, d))

    def o_heads(t):  # (D, H d) -> (H, d, D): A_h = Wo_h^T
        return t.mT.unflatten(0, (-1, d))

    # The kernel's A factor is W_o^T (H heads), B is W_v (Hkv heads).
    views = (o_heads(wo), v_heads(wv), o_heads(go), v_heads(gv), o_heads(mo), v_heads(mv))
    return _apply_pair(
        views,
        eta=eta,
        beta=beta,
        nesterov=nesterov,
        weight_decay=weight_decay,
        momentum_reproject=momentum_reproject,
        cfg=cfg,
        on_nonfinite=on_nonfinite,
        grad_names=("go", "gv"),
    )
