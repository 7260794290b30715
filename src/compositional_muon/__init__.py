"""Composition-aware orthogonalized optimizers for PyTorch.

Functional core: :func:`cm_qk`, :func:`cm_ov` (Compositional Muon on an attention layer's QK and
OV pairs, caller-managed momentum), :func:`msign`, :func:`inverse_sqrt`.
Optimizers: :class:`CompositionalMuon` (CM + Muon + AdamW for a whole model), :class:`Muon`,
:class:`MuonWithAuxAdam`, :class:`PerHeadMuon`, and the variants :class:`NorMuon`, :class:`AdaMuon`, :class:`Mano`,
:class:`NewtonMuon`.
"""

from .attention import AttentionSpec, HeadSlice, find_attention
from .cm import CMConfig, NonFiniteError, cm_ov, cm_qk
from .compositional import CompositionalMuon
from .inverse_root import inverse_sqrt, partner_gram
from .layouts import mark_layouts
from .msign import msign
from .muon import Muon, MuonWithAuxAdam
from .per_head import PerHeadMuon
from .qk_clip import QKClip
from .variants import AdaMuon, Mano, NewtonMuon, NorMuon

__version__ = "0.1.0"

__all__ = [
    "cm_qk",
    "cm_ov",
    "CMConfig",
    "NonFiniteError",
    "msign",
    "inverse_sqrt",
    "partner_gram",
    "CompositionalMuon",
    "AttentionSpec",
    "HeadSlice",
    "find_attention",
    "Muon",
    "MuonWithAuxAdam",
    "PerHeadMuon",
    "QKClip",
    "mark_layouts",
    "NorMuon",
    "AdaMuon",
    "Mano",
    "NewtonMuon",
]
