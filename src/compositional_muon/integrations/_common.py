"""The one builder the framework adapters share: CompositionalMuon, Muon (with AdamW) or the
library's defaults, from a model and a typed set of options."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attention import DEFAULT_ADAMW_PATTERNS, AttentionSpec, route_parameters
from ..compositional import CM_DEFAULTS, CompositionalMuon
from ..muon import MuonWithAuxAdam

__all__ = ["OPTIMIZER_NAMES", "OptimizerChoice", "build_for_model", "aliases"]

OPTIMIZER_NAMES = ("cm", "muon")


@dataclass(frozen=True)
class OptimizerChoice:
    """What to build. ``name``: "cm" (CM on attention, Muon on the other hidden matrices, AdamW on
    the rest) or "muon" (Muon on every hidden matrix, attention included, AdamW on the rest).
    ``lr`` is CM's composed step (or Muon's lr for "muon"); ``muon_lr`` the Muon matrices' lr under
    "cm" (None: ``lr``); ``adamw_lr`` for embeddings, output head, norms and biases. ``options``
    are CM group options (``lam``, ``method``, ``msign_dtype``...; see CompositionalMuon)."""

    name: str = "cm"
    lr: float = float(CM_DEFAULTS["lr"])  # type: ignore[arg-type]
    muon_lr: float | None = None
    adamw_lr: float = 3e-4
    weight_decay: float = 0.0
    adamw_weight_decay: float = 0.0
    momentum: float = float(CM_DEFAULTS["momentum"])  # type: ignore[arg-type]
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"unknown optimizer {self.name!r}; expected one of {OPTIMIZER_NAMES}")
        if self.name == "muon" and self.options:
            raise ValueError(f"CM options {sorted(self.options)} do not apply to optimizer 'muon'")


def aliases(model: nn.Module, params: Sequence[torch.Tensor]) -> tuple[str, ...]:
    """Every name (tied aliases included) under which ``params`` appear in ``model``."""
    ids = {id(p) for p in params}
    return tuple(n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids)


def build_for_model(
    model: nn.Module,
    choice: OptimizerChoice,
    *,
    attention: Sequence[AttentionSpec] = (),
    adamw_params: Sequence[torch.Tensor] = (),
) -> torch.optim.Optimizer:
    """Build ``choice`` for ``model``. ``attention``: its AttentionSpecs (required for "cm");
    ``adamw_params``: tensors forced to AdamW (input/output embeddings) whatever their names.
    Every trainable tensor lands in exactly one group, once (tied weights included)."""
    patterns = tuple(DEFAULT_ADAMW_PATTERNS) + aliases(model, adamw_params)
    if choice.name == "cm":
        if not attention:
            raise ValueError("optimizer 'cm' needs the model's attention layers; none were found")
        return CompositionalMuon.from_model(
            model,
            attention=list(attention),
            lr=choice.lr,
            muon_lr=choice.lr if choice.muon_lr is None else choice.muon_lr,
            adamw_lr=choice.adamw_lr,
            weight_decay=choice.weight_decay,
            adamw_weight_decay=choice.adamw_weight_decay,
            adamw_betas=choice.adamw_betas,
            muon_momentum=choice.momentum,
            adamw_patterns=patterns,
            momentum=choice.momentum,
            **choice.options,
        )
    _, matrices, others = route_parameters(model, [], patterns)
    groups = [
        dict(params=[p for _, p in matrices], lr=choice.lr, momentum=choice.momentum, use_muon=True),
        dict(
            params=[p for _, p in others],
            lr=choice.adamw_lr,
            betas=choice.adamw_betas,
            weight_decay=choice.adamw_weight_decay,
            use_muon=False,
        ),
    ]
    groups[0]["weight_decay"] = choice.weight_decay
    return MuonWithAuxAdam([g for g in groups if g["params"]])
