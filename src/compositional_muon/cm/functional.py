"""The functional CM API: one in-place step on an attention layer's QK or OV weights.

``cm_qk`` / ``cm_ov`` take nn.Linear weights (out x in), their gradients and caller-managed
momentum buffers, validate them, and run :func:`~compositional_muon.cm.kernel.pair_update` on
head views of the caller's tensors. Their CM options are those of :class:`CMConfig` (one set of
defaults); pass ``config=CMConfig(...)`` or the options as keywords.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..connection import horizontal_projection
from ..finite import NonFiniteError, all_finite
from ..ops import decoupled_add
from ..validation import check_functional
from .config import CONFIG_FIELDS, NONFINITE, CMConfig, choice
from .kernel import pair_update

__all__ = ["cm_qk", "cm_ov", "cm_momentum", "apply_update", "decoupled_add"]

Tensor = torch.Tensor


def _check_tensor(
    name: str, t: object, like: Tensor | None = None, shape: tuple[int, ...] | None = None, grad: bool = False
) -> None:
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


def _check_pair_args(
    names: tuple[str, ...],
    wa: Tensor,
    wb: Tensor,
    ga: Tensor,
    gb: Tensor,
    ma: Tensor,
    mb: Tensor,
    head_dim: int,
    num_kv_heads: int | None,
    a_rows_are_heads: bool,
) -> tuple[int, int, int, int]:
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


def cm_momentum(
    A: Tensor,
    B: Tensor,
    ga: Tensor,
    gb: Tensor,
    ma: Tensor,
    mb: Tensor,
    *,
    beta: float,
    nesterov: bool,
    momentum_reproject: bool,
    cfg: CMConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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


@dataclasses.dataclass(frozen=True)
class _Step:
    """The scalar settings of one functional CM step."""

    eta: float
    beta: float
    nesterov: bool
    weight_decay: float
    momentum_reproject: bool
    cfg: CMConfig
    on_nonfinite: str


def _apply_pair(views: tuple[Tensor, ...], step: _Step, grad_names: tuple[str, str]) -> bool:
    """Shared body of cm_qk / cm_ov on kernel-layout head views ``(A, B, gA, gB, mA, mB)``
    (``(H, d, D)`` / ``(Hkv, d, D)``) of the caller's tensors; writes through the views."""
    A, B, ga, gb, ma, mb = views
    cfg = step.cfg
    new_ma, new_mb, ua, ub = cm_momentum(
        A,
        B,
        ga,
        gb,
        ma,
        mb,
        beta=step.beta,
        nesterov=step.nesterov,
        momentum_reproject=step.momentum_reproject,
        cfg=cfg,
    )
    dA, dB = pair_update(A.unsqueeze(0), B.unsqueeze(0), ua.unsqueeze(0), ub.unsqueeze(0), step.eta, cfg)
    if not all_finite(dA, dB, new_ma, new_mb):
        bad = [n for n, g in zip(grad_names, (ga, gb)) if not all_finite(g)]
        if bad:
            if step.on_nonfinite == "skip":
                return False
            raise NonFiniteError(
                f"non-finite values in {', '.join('`' + b + '`' for b in bad)}; the step was not applied"
            )
        bad_w = ["`w" + n[1:] + "`" for n, w in zip(grad_names, (A, B)) if not all_finite(w)]
        if bad_w:  # the weights themselves, not the gradients
            raise NonFiniteError(
                f"the weights {', '.join(bad_w)} hold NaN/inf (not the gradients); nothing was written"
            )
        raise NonFiniteError(
            "the CM update is not finite although the gradients are: a partner Gram is singular "
            f"(lam={cfg.lam}); use lam > 0. Nothing was written"
        )
    ma.copy_(new_ma)
    mb.copy_(new_mb)
    apply_update(A, dA[0], step.eta * step.weight_decay)
    apply_update(B, dB[0], step.eta * step.weight_decay)
    return True


def apply_update(w: Tensor, delta: Tensor, decay: float) -> None:
    """``w <- (1 - decay) w + delta`` in place (``w`` may be a view of a parameter)."""
    decoupled_add(w, delta, decay)


def _validate_scalars(
    eta: object, beta: object, weight_decay: object, on_nonfinite: str, momentum_reproject: bool, connection: str
) -> None:
    if not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"`eta` must be a number >= 0, got {eta!r}")
    if not isinstance(beta, (int, float)) or not 0 <= beta < 1:
        raise ValueError(f"`beta` must be in [0, 1), got {beta!r}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
    choice("on_nonfinite", on_nonfinite, NONFINITE)
    if momentum_reproject and connection == "none":
        raise ValueError(
            "momentum_reproject=True projects the momentum with the connection's metric; choose a connection other than 'none'"
        )


def resolve_config(config: CMConfig | None, options: dict[str, Any], fn: str) -> CMConfig:
    """``config`` (default :class:`CMConfig`) with the CM ``options`` given as keywords applied."""
    bad = sorted(set(options) - set(CONFIG_FIELDS))
    if bad:
        raise TypeError(f"{fn}() got unexpected keyword argument(s) {bad}; CM options are {list(CONFIG_FIELDS)}")
    if config is not None and not isinstance(config, CMConfig):
        raise TypeError(f"`config` must be a CMConfig, got {type(config).__name__}")
    base = CMConfig() if config is None else config
    return dataclasses.replace(base, **options) if options else base


@torch.no_grad()
def cm_qk(
    wq: Tensor,
    wk: Tensor,
    gq: Tensor,
    gk: Tensor,
    mq: Tensor,
    mk: Tensor,
    *,
    head_dim: int,
    eta: float,
    config: CMConfig | None = None,
    beta: float = 0.95,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    momentum_reproject: bool = False,
    num_kv_heads: int | None = None,
    on_nonfinite: str = "raise",
    **options: Any,
) -> bool:
    """One in-place CM step on an attention layer's query/key weights.

    ``wq`` (``H*d x D``) and ``wk`` (``Hkv*d x D``) are nn.Linear weights, ``gq``/``gk`` their
    gradients, ``mq``/``mk`` caller-managed momentum buffers (zeros at init) updated in place as
    ``m <- beta m + g``. Per head ``h`` (key head ``g`` of its group)::

        dWq_h = -(eta/2) C_K^-1 msign(C_K^-1 Uq_h),  C_K = (Wk_g Wk_g^T + lam I)^(1/2)
        dWk_g = -(eta/2) C_Q^-1 msign(C_Q^-1 Uk_g),  C_Q = (sum_{h in g} Wq_h Wq_h^T + lam I)^(1/2)

    with ``U = m`` (or ``g + beta m`` when ``nesterov``), then decoupled weight decay
    ``W <- (1 - eta*weight_decay) W``. CM options: ``config`` and/or the :class:`CMConfig` fields
    as keywords (``method``, ``isotropic``, ``whitening``, ``connection``, ``per_mat_renorm``,
    ``lam``, ``msign_backend``, ``msign_steps``, ``msign_dtype``, ``root_method``, ``root_iters``;
    ``hybrid`` is an OV option and is not accepted here). Returns True if the step was applied,
    False if it was skipped for a non-finite gradient (``on_nonfinite="skip"``; the default
    "raise" raises :class:`NonFiniteError` and writes nothing).
    """
    if "hybrid" in options:
        raise TypeError("cm_qk() got an unexpected keyword argument 'hybrid' (hybrid is an OV option)")
    cfg = resolve_config(config, options, "cm_qk").for_kind("qk")
    _validate_scalars(eta, beta, weight_decay, on_nonfinite, momentum_reproject, cfg.connection)
    check_functional("cm_qk", eta=eta, beta=beta, weight_decay=weight_decay, lam=cfg.lam, msign_steps=cfg.msign_steps)
    _, _, d, _ = _check_pair_args(
        ("wq", "wk", "gq", "gk", "mq", "mk"), wq, wk, gq, gk, mq, mk, head_dim, num_kv_heads, a_rows_are_heads=True
    )

    def heads(t: Tensor) -> Tensor:  # (H d, D) -> (H, d, D)
        return t.unflatten(0, (-1, d))

    step = _Step(eta, beta, nesterov, weight_decay, momentum_reproject, cfg, on_nonfinite)
    return _apply_pair(tuple(heads(t) for t in (wq, wk, gq, gk, mq, mk)), step, ("gq", "gk"))


@torch.no_grad()
def cm_ov(
    wv: Tensor,
    wo: Tensor,
    gv: Tensor,
    go: Tensor,
    mv: Tensor,
    mo: Tensor,
    *,
    head_dim: int,
    eta: float,
    config: CMConfig | None = None,
    beta: float = 0.95,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    momentum_reproject: bool = False,
    num_kv_heads: int | None = None,
    on_nonfinite: str = "raise",
    **options: Any,
) -> bool:
    """One in-place CM step on an attention layer's value/output weights.

    ``wv`` (``Hkv*d x D``) and ``wo`` (``D x H*d``) are nn.Linear weights; ``gv``/``go`` their
    gradients; ``mv``/``mo`` caller-managed momentum buffers. With
    ``C_O = (sum_{h in g} Wo_h^T Wo_h + lam I)^(1/2)`` and ``C_V = (Wv_g Wv_g^T + lam I)^(1/2)``::

        dWv_g = -(eta/2) C_O^-1 msign(C_O^-1 Uv_g)                       (per head)
        dWo   = -(eta/2) [Z_1 C_V1^-1 | ... | Z_H C_VH^-1],
                Z = msign([Uo_1 C_V1^-1 | ... | Uo_H C_VH^-1])           (hybrid=True: one msign)
        dWo_h = -(eta/2) msign(Uo_h C_Vh^-1) C_Vh^-1                     (hybrid=False: per head)

    ``hybrid`` defaults to True (:class:`CMConfig`). Other arguments as in :func:`cm_qk`.
    """
    cfg = resolve_config(config, options, "cm_ov").for_kind("ov")
    _validate_scalars(eta, beta, weight_decay, on_nonfinite, momentum_reproject, cfg.connection)
    check_functional("cm_ov", eta=eta, beta=beta, weight_decay=weight_decay, lam=cfg.lam, msign_steps=cfg.msign_steps)
    _, _, d, _ = _check_pair_args(
        ("wv", "wo", "gv", "go", "mv", "mo"), wv, wo, gv, go, mv, mo, head_dim, num_kv_heads, a_rows_are_heads=False
    )

    def v_heads(t: Tensor) -> Tensor:  # (Hkv d, D) -> (Hkv, d, D)
        return t.unflatten(0, (-1, d))

    def o_heads(t: Tensor) -> Tensor:  # (D, H d) -> (H, d, D): A_h = Wo_h^T
        return t.mT.unflatten(0, (-1, d))

    # The kernel's A factor is W_o^T (H heads), B is W_v (Hkv heads).
    views = (o_heads(wo), v_heads(wv), o_heads(go), v_heads(gv), o_heads(mo), v_heads(mv))
    step = _Step(eta, beta, nesterov, weight_decay, momentum_reproject, cfg, on_nonfinite)
    return _apply_pair(views, step, ("go", "gv"))
