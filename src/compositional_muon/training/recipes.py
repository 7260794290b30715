"""Build any optimizer of the library for a model by name (used by the training CLI and the
experiments runner).

Every recipe routes the same way: attention pairs (for CM), other hidden matrices (the matrix rule)
and everything else (embeddings, output head, gains, biases: AdamW). ``lr`` is the matrix rule's
learning rate (CM's composed step ``eta``), ``adamw_lr`` the AdamW groups'.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import find_attention, route_parameters
from ..baselines import CircuitMuon
from ..compositional import CompositionalMuon
from ..layouts import mark_layouts
from ..muon import Muon
from ..per_head import PerHeadMuon
from ..variants import AdaMuon, Mano, NewtonMuon, NorMuon

__all__ = ["OPTIMIZERS", "DEFAULT_LR", "build_optimizer", "matrix_and_adamw_groups"]

# Defaults for the small byte-level models of this library (see docs/results.md for the sweep).
DEFAULT_LR = {
    "adamw": 3e-3,
    "muon": 0.02,
    "muon-per-head": 0.02,
    "cm": 0.02,
    "cm-isotropic": 0.02,
    "circuit-muon": 0.02,
    "normuon": 3e-3,
    "adamuon": 3e-3,
    "mano": 3e-3,
    "newton-muon": 0.02,
}
OPTIMIZERS = tuple(DEFAULT_LR)
DEFAULT_ADAMW_LR = 3e-3
_MATRIX_CLASSES = {"muon": Muon, "normuon": NorMuon, "adamuon": AdaMuon, "mano": Mano, "newton-muon": NewtonMuon}


def matrix_and_adamw_groups(
    model: nn.Module,
    *,
    lr: float,
    adamw_lr: float,
    weight_decay: float,
    adamw_weight_decay: float,
    adamw_betas=(0.9, 0.95),
    **matrix_options,
) -> list:
    """``use_muon`` param groups: every hidden matrix (attention included) in one matrix group,
    embeddings/head/gains/biases in an AdamW group. Expert stacks are tagged (:func:`mark_layouts`)."""
    mark_layouts(model)
    cm, muon, adamw = route_parameters(model, find_attention(model))
    groups = [dict(params=[p for _, p in cm + muon], lr=lr, weight_decay=weight_decay, use_muon=True, **matrix_options)]
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
    return groups


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float | None = None,
    adamw_lr: float | None = None,
    weight_decay: float = 0.0,
    adamw_weight_decay: float = 0.0,
    adamw_betas=(0.9, 0.95),
    options: dict | None = None,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) for ``model``.

    ``options``: extra keyword arguments of the matrix rule, e.g. CM variant switches
    (``{"method": "joint"}``) or NorMuon's ``beta2``. ``"adamw"`` is plain AdamW on every
    parameter at ``lr``.
    """
    if name not in DEFAULT_LR:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    options = dict(options or {})
    lr = DEFAULT_LR[name] if lr is None else lr
    adamw_lr = DEFAULT_ADAMW_LR if adamw_lr is None else adamw_lr
    if name == "adamw":
        if options:
            raise ValueError(f"adamw takes no extra options, got {sorted(options)}")
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        return torch.optim.AdamW(
            [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)],
            lr=lr,
            betas=adamw_betas,
        )
    if name in ("cm", "cm-isotropic", "muon-per-head"):
        if name == "cm-isotropic":
            options.setdefault("isotropic", True)
        cls = PerHeadMuon if name == "muon-per-head" else CompositionalMuon
        return cls.from_model(
            model,
            lr=lr,
            muon_lr=options.pop("muon_lr", lr),
            adamw_lr=adamw_lr,
            weight_decay=weight_decay,
            adamw_weight_decay=adamw_weight_decay,
            adamw_betas=adamw_betas,
            **options,
        )
    if name == "circuit-muon":
        return CircuitMuon.from_model(
            model,
            lr=lr,
            adamw_lr=adamw_lr,
            weight_decay=weight_decay,
            adamw_weight_decay=adamw_weight_decay,
            adamw_betas=adamw_betas,
            **options,
        )
    cls = _MATRIX_CLASSES[name]
    groups = matrix_and_adamw_groups(
        model,
        lr=lr,
        adamw_lr=adamw_lr,
        weight_decay=weight_decay,
        adamw_weight_decay=adamw_weight_decay,
        adamw_betas=adamw_betas,
    )
    if name == "normuon":  # the paper's set (AdamW-sized update RMS) at the recipe's AdamW-sized lr
        options.setdefault("scale", "paper")
        options.setdefault("nesterov", False)
    if name == "newton-muon":  # needs the model: its forward hooks capture the layer inputs
        return cls.from_model(model, groups, **options)
    return cls(groups, **options)
