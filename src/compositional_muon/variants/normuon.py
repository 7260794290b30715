"""NorMuon: Muon followed by a neuron-wise (row-wise) second-moment normalization.

Li, Liu, Liang, Chen, Zhao, "NorMuon: Making Muon more efficient and scalable", arXiv:2510.05491
(Algorithm 1). For a weight ``W`` of shape ``m x n`` (``nn.Linear`` layout, out x in: row ``i`` holds
the incoming weights of output neuron ``i``; conv weights are flattened to ``out x (in*kh*kw)``)::

    M_t   = beta M_{t-1} + (1 - beta) G_t                    first moment (lerp form)
    O_t   = msign(M_t)                                       Newton-Schulz in the paper
    v_t   = beta2 v_{t-1} + (1 - beta2) mean_cols(O_t * O_t)  one value per row (neuron), v in R^m
    O^_t  = O_t / (sqrt(v_t) + eps)                          v broadcast along each row
    W_t   = W_{t-1} - lr wd W_{t-1} - lr s_t O^_t

``scale="paper"`` uses the paper's ``s_t = 0.2 sqrt(m n) / ||O^_t||_F`` (update RMS 0.2 lr, as AdamW);
``scale="reference"`` reproduces the authors' released code: ``s_t = sqrt(max(1, m/n)) ||O_t||_F /
||O^_t||_F`` (the normalized update keeps Muon's norm, then Muon's shape factor, chosen by
``adjust_lr_fn``). The released code also uses Nesterov momentum (``nesterov=True``); the paper's
algorithm does not.

Defaults: one source's coherent set, the authors' released code (``lr=0.02``, ``nesterov=True``,
``scale="reference"``: update RMS that of Muon at the same lr). The paper's set (``scale="paper"``,
``nesterov=False``) gives update RMS ``0.2 lr``, AdamW's, and wants AdamW-sized learning rates
(the training recipe ``normuon`` uses it at 3e-3, explicitly).
"""

from __future__ import annotations

import math

import torch

from .. import parallel as _par
from ..buckets import DEFAULT_BUCKET_BYTES
from ..muon import MsignOptimizer, shape_scale
from ..ops import decoupled_add

__all__ = ["NorMuon", "normuon_normalize", "NORMUON_SCALES"]

NORMUON_SCALES = ("paper", "reference")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def normuon_normalize(
    O: torch.Tensor,
    v: torch.Tensor,
    beta2: float,
    eps: float = 1e-10,
    *,
    scale: str = "reference",
    adjust_lr_fn: str | None = "original",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neuron-wise normalization of an orthogonalized update (arXiv:2510.05491, Algorithm 1).

    ``O``: ``(..., m, n)`` orthogonalized momentum; ``v``: ``(..., m, 1)`` per-row second moment.
    Returns ``(U, new_v)`` where ``U = s * O / (sqrt(new_v) + eps)`` is the step direction (the
    caller applies ``W <- W - lr*wd*W - lr*U``) and ``new_v = beta2 v + (1 - beta2) mean_cols(O*O)``.
    Pure: neither input is modified. ``scale`` picks ``s`` (module docstring); an all-zero ``O``
    gives ``U = 0``. Works in float32 at least; ``U`` and ``new_v`` come back in that precision.
    """
    if scale not in NORMUON_SCALES:
        raise ValueError(f"unknown NorMuon scale {scale!r}; expected one of {NORMUON_SCALES}")
    wd = _work_dtype(O.dtype)
    O = O.to(wd)
    m, n = O.shape[-2], O.shape[-1]
    new_v = v.to(wd).lerp(O.square().mean(dim=-1, keepdim=True), 1 - beta2)
    O_hat = O / (new_v.sqrt() + eps)
    hat_norm = torch.linalg.matrix_norm(O_hat, keepdim=True)
    if scale == "paper":
        s = torch.where(hat_norm > 0, 0.2 * math.sqrt(m * n) / hat_norm, torch.zeros_like(hat_norm))
    else:
        s = torch.linalg.matrix_norm(O, keepdim=True) / (hat_norm + eps) * shape_scale(m, n, adjust_lr_fn)
    return O_hat * s, new_v


class NorMuon(MsignOptimizer):
    """NorMuon (arXiv:2510.05491, Algorithm 1) with AdamW for ``use_muon=False`` groups.

    Args: ``lr`` (0.02), ``momentum`` (beta, 0.95), ``beta2`` (0.95), ``eps`` (1e-10),
    ``weight_decay`` (0, decoupled ``W <- W - lr*wd*W``), ``nesterov`` (True, as the released code;
    the paper's Algorithm 1 uses False), ``scale`` ("reference": the released code's norm-preserving
    rescale times Muon's shape factor ``adjust_lr_fn``; or "paper": ``0.2 sqrt(mn)/||O^||_F``),
    ``ns_steps`` (5), ``backend`` ("newton_schulz"), ``msign_dtype`` (None: the device default),
    ``nonfinite`` ("raise" or "skip").

    Every default is the authors' released code's (lr 0.02, beta 0.95, beta2 0.95, wd 0,
    nesterov=True, scale="reference"): update RMS about Muon's at the same lr. ``scale="paper"``
    gives RMS ``0.2 * lr`` (AdamW-matched), 5.5x Muon's for a 768 x 768 matrix and 11x
    for 768 x 3072: pair it with AdamW-sized learning rates (and the paper's nesterov=False). Per-parameter state:
    ``momentum_buffer`` (like ``p``) and ``second_moment`` (``m x 1``, one value per output neuron).
    """

    supports_experts = False  # expert stacks (3-D) are refused: no per-expert rule here

    matrix_defaults = dict(
        lr=0.02,
        momentum=0.95,
        beta2=0.95,
        eps=1e-10,
        nesterov=True,
        weight_decay=0.0,
        scale="reference",
        adjust_lr_fn="original",
        ns_steps=5,
        backend="newton_schulz",
        msign_dtype=None,
    )

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        beta2: float = 0.95,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        scale: str = "reference",
        adjust_lr_fn: str = "original",
        ns_steps: int = 5,
        backend: str = "newton_schulz",
        msign_dtype: torch.dtype | None = None,
        *,
        nonfinite: str = "raise",
        distributed="auto",
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                beta2=beta2,
                eps=eps,
                nesterov=nesterov,
                weight_decay=weight_decay,
                scale=scale,
                adjust_lr_fn=adjust_lr_fn,
                ns_steps=ns_steps,
                backend=backend,
                msign_dtype=msign_dtype,
            ),
            nonfinite=nonfinite,
            distributed=distributed,
            bucket_bytes=bucket_bytes,
        )

    def _matrix_step(self, group: dict, params: list) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        zs = self._orthogonalize(group, self._directions(group, params))
        for p, z in zip(params, zs):
            st = self.state[p]
            if "second_moment" not in st:
                # row-sharded like z under FSDP2 (a plain zeros(m, 1) otherwise)
                st["second_moment"] = _par.zeros_rows(z, 1, p.dtype)
            v = st["second_moment"]
            u, new_v = normuon_normalize(
                z, v, group["beta2"], group["eps"], scale=group["scale"], adjust_lr_fn=group["adjust_lr_fn"]
            )
            v.copy_(new_v)
            decoupled_add(p, u.reshape(p.shape), lr * wd, alpha=-lr)
