"""The CM update of a layer-batched factor pair, written once (:func:`pair_update`).

Layout is nn.Linear's (weight = out x in). ``D`` model width, ``H`` query heads, ``d`` head_dim,
``Hkv`` key/value heads (``G = H / Hkv`` query heads per group). A factor pair ``(A, B)``: ``A``
has ``H`` head blocks ``A_h`` (``d x D``), ``B`` has ``Hkv`` head blocks ``B_g``, and the loss sees
``M_h = A_h^T B_g`` (QK: ``A = W_q``, ``B = W_k``; OV: ``A_h = W_o,h^T``, ``B = W_v``). With
``C_B = (B_g B_g^T + lam I)^{1/2}`` and ``C_A,g = (sum_{h in g} A_h A_h^T + lam I)^{1/2}`` the
half-split rule is ``dA_h = -(eta/2) C_B^{-1} msign(C_B^{-1} U_A,h)`` and
``dB_g = -(eta/2) C_A^{-1} msign(C_A^{-1} U_B,g)``. See ``docs/math.md``.

The stages are: grouped partner statistics -> ``reducer.partner_stats`` -> inverse roots ->
pre-whitening -> ``reducer.msign_pair`` -> optional transform -> post-whitening (step folded in)
-> ``reducer.sum_norms`` (per_mat_renorm) -> gauge connection. A :class:`PairReducer` is the one
place where a sharded layout differs from a single process (``LOCAL``: nothing to combine); the
sharded reducers live in :mod:`compositional_muon.parallel`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..connection import horizontal_projection
from ..inverse_root import gram_eigh, inverse_cholesky_factor, inverse_sqrt_newton
from ..msign import default_msign_dtype, msign
from .config import CMConfig

__all__ = [
    "pair_update",
    "pair_roots",
    "used_roots",
    "compiled_pair_update",
    "PairReducer",
    "LOCAL",
    "group_stats",
    "left_apply",
    "ZTransform",
]

Tensor = torch.Tensor
ZTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class PairReducer:
    """How the pieces of one factor pair held by different processes are combined.

    The base class is the single-process case: every head and the whole width are here, so there
    is nothing to combine. A sharded layout overrides the three hooks; the CM math in
    :func:`pair_update` does not change.

    * :meth:`partner_stats` gets the grouped statistics of this process's heads (``Sa``: of ``A``,
      one per group of ``G`` heads; ``Sb``: of ``B``), ``(L, n, d, d)`` Grams or ``(L, n, 1, 1)``
      square sums if isotropic, and returns the *complete* statistics of the partners of this
      process's heads: ``(Sa for B's local groups, Sb for A's local groups)``.
    * :meth:`msign_pair` returns the msigns of the whitened momenta ``Xa`` ``(L, n, G, d, w)`` and
      ``Xb`` ``(L, n, 1, d, w)`` (half-split rule; ``hybrid``: all of ``A`` per layer as one matrix).
    * :meth:`sum_norms` sums per-layer square sums ``(L, k)`` over the processes sharing a layer.

    ``whole`` is True when this process holds the pair entirely (the joint rule, gauge connections
    and transforms need it).
    """

    whole: bool = True

    def group_size(self, A: Tensor, B: Tensor) -> int:
        """Query heads per key/value head (``G``); a sharded reducer knows it when a rank holds no heads."""
        return A.size(1) // B.size(1)

    def partner_stats(self, Sa: Tensor, Sb: Tensor) -> tuple[Tensor, Tensor]:
        return Sa, Sb

    def msign_pair(self, Xa: Tensor, Xb: Tensor, cfg: CMConfig) -> tuple[Tensor, Tensor]:
        L, hkv, G, d, D = Xa.shape
        ms: dict[str, Any] = dict(backend=cfg.msign_backend, steps=cfg.msign_steps, dtype=cfg.msign_dtype)
        if cfg.hybrid:
            Za = msign(Xa.reshape(L, hkv * G * d, D), **ms).reshape(L, hkv, G, d, D)
            return Za, msign(Xb, **ms)
        return msign(Xa, **ms), msign(Xb, **ms)  # every head of a factor in one batched call

    def sum_norms(self, sq: Tensor) -> Tensor:
        return sq


LOCAL = PairReducer()


class Roots(NamedTuple):
    """Partner whitening factors of one pair: ``pre_*`` multiply the momentum before msign,
    ``post_*`` the msign after it (``(L, n, d, d)``, or ``(L, n, 1, 1)`` if isotropic). For the
    symmetric root ``C^{-1}`` both are ``C^{-1}``; for the Cholesky factor ``C^2 = L L^T`` they are
    ``L^{-1}`` and ``L^{-T}`` (same update, see :func:`partner_roots`). ``eig_*`` and ``grams``
    are reused by the gauge connections when they were computed."""

    pre_b: Tensor
    pre_a: Tensor
    post_b: Tensor
    post_a: Tensor
    eig_a: tuple[Tensor, Tensor] | None = None
    eig_b: tuple[Tensor, Tensor] | None = None
    grams: tuple[Tensor, Tensor] | None = None


def _work(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def group_stats(A: Tensor, B: Tensor, G: int, scalar: bool) -> tuple[Tensor, Tensor]:
    """Grouped partner statistics of ``A`` ``(L, n*G, d, w)`` and ``B`` ``(L, n, d, w)``: the
    group Grams ``sum_{h in g} A_h A_h^T`` and ``B_g B_g^T`` (``(L, n, d, d)``), or with ``scalar``
    their traces (square sums, ``(L, n, 1, 1)``). Additive over column shards of the width."""
    Aw, Bw = A.to(_work(A)), B.to(_work(A))
    if scalar:
        sq_a = Aw.square().sum(dim=(-2, -1)).unflatten(1, (A.size(1) // G, G)).sum(2)
        return sq_a[..., None, None], Bw.square().sum(dim=(-2, -1))[..., None, None]
    return (Aw @ Aw.mT).unflatten(1, (A.size(1) // G, G)).sum(2), Bw @ Bw.mT


def _both(fn: Callable[[Tensor], Tensor], X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """``(fn(X), fn(Y))`` in one batched call when the shapes agree."""
    if X.shape == Y.shape:
        out = fn(torch.stack((X, Y)))
        return out[0], out[1]
    return fn(X), fn(Y)


def partner_roots(Ga: Tensor, Gb: Tensor, cfg: CMConfig, d: int, need_eigh: bool) -> Roots:
    """Whitening factors from the grouped statistics: ``Gb``'s root whitens ``A``'s update and
    ``Ga``'s (grouped) root whitens ``B``'s; plus eigendecompositions when ``need_eigh``.

    Root paths: the symmetric ``C^{-1}`` by ``eigh`` or Newton, and, with ``root_method="auto"`` on
    CPU for the half-split rule whitened on both sides, the Cholesky factor ``C^2 = L L^T``: with
    ``L = C Q`` (``Q`` orthogonal) ``L^{-T} msign(L^{-1} U) = C^{-1} Q Q^T msign(C^{-1} U)``, the
    same update, because ``msign(Q^T X) = Q^T msign(X)``; per-head or hybrid, a left orthogonal
    factor (block-diagonal over heads) commutes with msign. One batched Cholesky plus a
    triangular solve is ~5x cheaper than a batched ``eigh`` of the same ``d x d`` Grams on CPU."""
    if Ga.size(-1) == 1:  # isotropic square sums
        r_a, r_b = (Ga / d + cfg.lam).rsqrt(), (Gb / d + cfg.lam).rsqrt()
        return Roots(r_b, r_a, r_b, r_a)
    if cfg.isotropic:  # a connection needs the Grams' eigendecompositions as well
        r_a = (Ga.diagonal(dim1=-2, dim2=-1).sum(-1) / d + cfg.lam).rsqrt()[..., None, None]
        r_b = (Gb.diagonal(dim1=-2, dim2=-1).sum(-1) / d + cfg.lam).rsqrt()[..., None, None]
        return Roots(r_b, r_a, r_b, r_a, gram_eigh(Ga), gram_eigh(Gb), (Ga, Gb))
    method = cfg.root_method
    cpu = Ga.device.type == "cpu"
    if method == "auto":
        if cpu and not need_eigh and cfg.method == "half_split" and cfg.whitening == "both":
            method = "cholesky"
        else:
            method = "eigh" if (cpu or need_eigh) else "newton"
    if method == "cholesky":
        inv_b, inv_a = _both(lambda g: inverse_cholesky_factor(g, cfg.lam), Gb, Ga)
        return Roots(inv_b, inv_a, inv_b.mT, inv_a.mT, grams=(Ga, Gb))
    if method == "newton":
        r_b = inverse_sqrt_newton(Gb, cfg.lam, cfg.root_iters)
        r_a = inverse_sqrt_newton(Ga, cfg.lam, cfg.root_iters)
        return Roots(r_b, r_a, r_b, r_a, grams=(Ga, Gb))
    if Ga.shape == Gb.shape:  # one batched eigh for both Grams
        s, U = gram_eigh(torch.stack((Ga, Gb)))
        eig_a, eig_b = (s[0], U[0]), (s[1], U[1])
    else:
        eig_a, eig_b = gram_eigh(Ga), gram_eigh(Gb)

    def root(eig: tuple[Tensor, Tensor]) -> Tensor:
        s, U = eig
        return (U * (s + cfg.lam).rsqrt().unsqueeze(-2)) @ U.mT

    r_b, r_a = root(eig_b), root(eig_a)
    return Roots(r_b, r_a, r_b, r_a, eig_a, eig_b, (Ga, Gb))


def left_apply(R: Tensor, X: Tensor) -> Tensor:
    """Apply a per-group left factor ``R`` (``(L, n, d, d)`` or ``(L, n, 1, 1)``) to ``X`` of
    shape ``(L, n, G, d, w)``."""
    R = R.unsqueeze(2).to(X.dtype)
    return R * X if R.size(-1) == 1 else R @ X


def _joint_msign(Xa: Tensor, Xb: Tensor, cfg: CMConfig) -> tuple[Tensor, Tensor]:
    """The joint rule: one msign over the whitened factors stacked along the head (row) axis:
    per group ``[A_1; ...; A_G; B]`` (``(G+1) d x D``), or with ``hybrid`` the whole ``W_o^T``
    over the whole ``W_v`` (``(H + Hkv) d x D``, any ``Hkv``). Gauge invariant (docs/math.md)."""
    L, hkv, G, d, D = Xa.shape
    ms: dict[str, Any] = dict(backend=cfg.msign_backend, steps=cfg.msign_steps, dtype=cfg.msign_dtype)
    if cfg.hybrid:
        H = hkv * G
        Z = msign(torch.cat((Xa.reshape(L, H * d, D), Xb.reshape(L, hkv * d, D)), dim=1), **ms)
        return Z[:, : H * d].reshape(L, hkv, G, d, D), Z[:, H * d :].reshape(L, hkv, 1, d, D)
    Z = msign(torch.cat((Xa, Xb), dim=2).flatten(2, 3), **ms).unflatten(2, (G + 1, d))
    return Z[:, :, :G], Z[:, :, G:]


def _renorm(Za: Tensor, dA: Tensor, Zb: Tensor, dB: Tensor, reducer: PairReducer) -> tuple[Tensor, Tensor]:
    """Per-layer ratios ``||Z||_F / ||dX||_F`` over all heads of each factor (0/0 -> 1), ``(L, 1, 1, 1, 1)``."""
    dims = tuple(range(1, dA.ndim))
    sq = torch.stack([Za.square().sum(dims), dA.square().sum(dims), Zb.square().sum(dims), dB.square().sum(dims)], -1)
    rt = reducer.sum_norms(sq).sqrt()

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        r = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.ones_like(den))
        return r.view(-1, 1, 1, 1, 1)

    return ratio(rt[:, 0], rt[:, 1]), ratio(rt[:, 2], rt[:, 3])


def pair_roots(A: Tensor, B: Tensor, cfg: CMConfig, reducer: PairReducer = LOCAL) -> Roots:
    """The partner whitening factors of a layer-batched pair (shapes as in :func:`pair_update`):
    grouped statistics -> ``reducer.partner_stats`` -> :func:`partner_roots`. With ``lam = 0`` a
    singular partner Gram makes them non-finite, the one way a finite step yields a non-finite update."""
    need_eigh = cfg.connection in ("frobenius", "scale_aware")
    Sa, Sb = group_stats(A, B, reducer.group_size(A, B), cfg.isotropic and not need_eigh)
    Ga, Gb = reducer.partner_stats(Sa, Sb)
    return partner_roots(Ga, Gb, cfg, B.size(2), need_eigh)


def used_roots(roots: Roots, cfg: CMConfig) -> list[Tensor]:
    """The whitening factors of ``roots`` that :func:`pair_update` multiplies into the update."""
    pre = [roots.pre_b, roots.pre_a] if cfg.whitening in ("both", "pre") else []
    return pre + ([roots.post_b, roots.post_a] if cfg.whitening in ("both", "post") else [])


def pair_update(
    A: Tensor,
    B: Tensor,
    Ua: Tensor,
    Ub: Tensor,
    eta: float | Tensor,
    cfg: CMConfig,
    z_transform: ZTransform | None = None,
    reducer: PairReducer = LOCAL,
) -> tuple[Tensor, Tensor]:
    """The CM update ``(dA, dB)`` for a layer-batched factor pair (nothing is modified).

    ``A, Ua``: ``(L, H, d, D)``; ``B, Ub``: ``(L, Hkv, d, D)`` with ``H % Hkv == 0`` (with a
    sharded ``reducer``: this process's heads / width, whole groups). ``Ua, Ub`` are the (momentum)
    directions to descend along; ``A, B`` the current weights, from which the partner roots are
    computed. Returns updates in the dtype of ``Ua`` / ``Ub``.

    Every head of every layer goes through one batched call per stage; the step ``-eta/2`` is
    folded into the small post-whitening factors instead of a pass over the update.
    ``z_transform``: optional ``(Za, Zb) -> (Za, Zb)`` applied to the msign outputs in whitened
    coordinates (``(L, Hkv, G, d, D)`` and ``(L, Hkv, 1, d, D)``) before the post-whitening (the
    optimizer's ``transform="normuon"``, :func:`~compositional_muon.cm.normalize_head_rows`).
    """
    G = reducer.group_size(A, B)
    if not reducer.whole and (cfg.method != "half_split" or cfg.connection != "none" or z_transform is not None):
        raise ValueError("a sharded CM pair supports method='half_split' without connection or transform only")
    roots = pair_roots(A, B, cfg, reducer)
    pre = cfg.whitening in ("both", "pre")
    post = cfg.whitening in ("both", "post")
    work = roots.pre_b.dtype
    Ua_g = Ua.unflatten(1, (Ua.size(1) // G, G)).to(work)  # (L, Hkv, G, d, D)
    Ub_g = Ub.unsqueeze(2).to(work)  # (L, Hkv, 1, d, D)
    Xa = left_apply(roots.pre_b, Ua_g) if pre else Ua_g
    Xb = left_apply(roots.pre_a, Ub_g) if pre else Ub_g
    if cfg.method == "half_split":
        scale = eta / 2
        Za, Zb = reducer.msign_pair(Xa, Xb, cfg)
    else:  # joint: eta/2 per factor too (the stacked msign's blocks each have norm <= 1)
        scale = eta / 2
        Za, Zb = _joint_msign(Xa, Xb, cfg)
    if z_transform is not None:
        Za, Zb = z_transform(Za, Zb)
    # The step -scale rides on the small d x d post factors (or on the per-layer renorm ratio).
    k = 1.0 if cfg.per_mat_renorm else -scale
    dA = left_apply(roots.post_b * k, Za) if post else Za * k
    dB = left_apply(roots.post_a * k, Zb) if post else Zb * k
    if cfg.per_mat_renorm:
        ra, rb = _renorm(Za, dA, Zb, dB, reducer)
        dA, dB = dA * (ra * -scale), dB * (rb * -scale)
    dA, dB = dA.flatten(1, 2), dB.squeeze(2)
    if cfg.connection != "none":
        dA, dB = horizontal_projection(
            A.to(work), B.to(work), dA, dB, cfg.connection, cfg.lam, roots.eig_a, roots.eig_b, grams=roots.grams
        )
    return dA.to(Ua.dtype), dB.to(Ub.dtype)


_COMPILED: dict[Any, Callable[..., tuple[Tensor, Tensor]]] = {}


def compiled_pair_update(
    A: Tensor, B: Tensor, Ua: Tensor, Ub: Tensor, eta: float, cfg: CMConfig, **compile_options: Any
) -> tuple[Tensor, Tensor]:
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
    return fn(A, B, Ua, Ub, torch.tensor(float(eta), dtype=_work(A), device=A.device))
