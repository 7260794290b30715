"""Compositional Muon: partner-whitened steepest descent for attention's QK and OV products.

``config`` holds the options (:class:`CMConfig`, one set of defaults), ``kernel`` the update of a
layer-batched factor pair written once (:func:`pair_update`, with the :class:`PairReducer` hook for
sharded layouts), ``transform`` NorMuon's head-row normalization, ``functional`` the in-place
``cm_qk`` / ``cm_ov`` steps. See ``docs/math.md`` and ``docs/architecture.md``.
"""

from ..connection import CONNECTIONS
from ..finite import NonFiniteError, all_finite, finite_flags
from .config import METHODS, NONFINITE, WHITENINGS, CMConfig
from .functional import apply_update, cm_momentum, cm_ov, cm_qk, decoupled_add
from .kernel import LOCAL, PairReducer, compiled_pair_update, pair_update
from .transform import normalize_head_rows

__all__ = [
    "cm_qk",
    "cm_ov",
    "CMConfig",
    "pair_update",
    "PairReducer",
    "LOCAL",
    "normalize_head_rows",
    "compiled_pair_update",
    "NonFiniteError",
    "cm_momentum",
    "apply_update",
    "decoupled_add",
    "finite_flags",
    "all_finite",
    "METHODS",
    "WHITENINGS",
    "NONFINITE",
    "CONNECTIONS",
]
