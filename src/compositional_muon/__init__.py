"""Composition-aware orthogonalized optimizers for PyTorch.

Functional core: :func:`cm_qk`, :func:`cm_ov` (Compositional Muon on an attention layer's QK and
OV pairs, caller-managed momentum), :func:`msign`. Optimizers: :class:`Muon`,
:class:`MuonWithAuxAdam`.
"""
from .cm import CMConfig, NonFiniteError, cm_ov, cm_qk
from .inverse_root import inverse_sqrt, partner_gram
from .msign import msign
from .muon import Muon, MuonWithAuxAdam

__version__ = "0.1.0"

__all__ = [
    "cm_qk",
    "cm_ov",
    "CMConfig",
    "NonFiniteError",
    "msign",
    "inverse_sqrt",
    "partner_gram",
    "Muon",
    "MuonWithAuxAdam",
]
