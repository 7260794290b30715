"""AdamW learning-rate transfer for CM: ``adjust_lr_fn="match_rms_adamw"`` on a CM group.

Muon's ``match_rms_adamw`` (Moonlight's convention, as ``torch.optim.Muon``) multiplies
``msign(U)`` of an ``m x n`` weight by ``0.2 sqrt(max(m, n))``: a full-rank polar factor has
element RMS ``1 / sqrt(max(m, n))``, so every update has RMS ``0.2 lr``, the RMS of a typical AdamW
update, and AdamW's learning rate and weight decay carry over.

CM's update of a factor, ``dA_h = -(eta/2) C_B^{-1} Z_h`` (whitened, then post-whitened), has no
fixed RMS: the partner roots ``C^{-1}`` scale heads by their partners' inverse singular values.
Matching keeps CM's direction, including the relative sizes of the heads, and fixes the size: for
each layer and each factor (``W_q``, ``W_k``, ``W_v``, ``W_o``) the update is rescaled to element RMS
``0.2 eta``, ``dA <- 0.2 eta sqrt(numel(dA)) dA / ||dA||_F``. Where every partner Gram is the
identity this is exactly :class:`~compositional_muon.PerHeadMuon` with ``match_rms_adamw`` at the
same ``lr`` (derivation in ``docs/math.md``). A zero update stays zero.
"""

from __future__ import annotations

import torch

from .muon import ADJUST_LR_FNS
from .parallel import is_dtensor
from .plan import PairBatch

__all__ = ["match_factor_rms", "match_plan_rms", "match_group_rms", "check_rms_match", "CM_ADJUST_LR_FNS"]

CM_ADJUST_LR_FNS = ADJUST_LR_FNS  # Muon's names (one source); "original" leaves CM's step as it is
RMS = 0.2


def match_factor_rms(d: torch.Tensor, eta: float) -> torch.Tensor:
    """``d`` (``(L, ...)``, one factor's update per layer) rescaled to element RMS ``0.2 eta`` per layer."""
    dims = tuple(range(1, d.ndim))
    work = torch.promote_types(d.dtype, torch.float32)
    rms = d.to(work).square().mean(dims, keepdim=True).sqrt()
    ratio = torch.where(rms > 0, (RMS * eta) / rms.clamp_min(torch.finfo(work).tiny), torch.zeros_like(rms))
    return (d.to(work) * ratio).to(d.dtype)


def match_plan_rms(plan: list[PairBatch], eta: float) -> list[PairBatch]:
    """Rescale the ``dA``/``dB`` of every batch of a CM step plan (whole layers: local or DDP), in
    place; returns ``plan``."""
    for batch in plan:
        if batch.apply is not None or batch.path != "local" or batch.dA is None or batch.dB is None:
            raise ValueError(
                "adjust_lr_fn='match_rms_adamw' is not supported for DTensor (FSDP2) CM parameters; "
                "use it single-process or under DDP"
            )
        batch.dA = match_factor_rms(batch.dA, eta)
        batch.dB = match_factor_rms(batch.dB, eta)
    return plan


def check_rms_match(group: dict) -> None:
    """Construction-time refusal of ``match_rms_adamw`` on DTensor (FSDP2) CM parameters."""
    if group.get("adjust_lr_fn") == "match_rms_adamw" and any(is_dtensor(p) for p in group["params"]):
        raise ValueError("adjust_lr_fn='match_rms_adamw' is not supported for DTensor (FSDP2) CM parameters")


def match_group_rms(plan: list[PairBatch], group: dict) -> list[PairBatch]:
    """``plan`` of a CM group, matched (:func:`match_plan_rms`) when its ``adjust_lr_fn`` asks for it."""
    return match_plan_rms(plan, float(group["lr"])) if group.get("adjust_lr_fn") == "match_rms_adamw" else plan
