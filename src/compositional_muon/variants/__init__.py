"""Muon variants from the literature, on the library's shared routing / msign pieces.

Each optimizer takes ``use_muon=True`` groups (its matrix rule) and ``use_muon=False`` groups
(AdamW), like :class:`compositional_muon.Muon`, and exposes its core as a pure function so it can
be composed with Compositional Muon:

* :class:`NorMuon` (arXiv:2510.05491) / :func:`normuon_normalize`
* :class:`AdaMuon` (arXiv:2507.11005) / :func:`adamuon_normalize`
* :class:`Mano` (arXiv:2601.23000) / :func:`mano_direction`
* :class:`NewtonMuon` (arXiv:2604.01472) / :func:`newton_precondition`, :func:`newton_refresh`,
  :func:`input_second_moment`

See ``docs/variants.md``.
"""

from .adamuon import AdaMuon, adamuon_normalize, heavy_ball_momentum
from .mano import Mano, mano_direction
from .newton_muon import NewtonMuon, NewtonMuonHooks, input_second_moment, newton_precondition, newton_refresh
from .normuon import NORMUON_SCALES, NorMuon, normuon_normalize

__all__ = [
    "NorMuon",
    "normuon_normalize",
    "NORMUON_SCALES",
    "AdaMuon",
    "adamuon_normalize",
    "heavy_ball_momentum",
    "Mano",
    "mano_direction",
    "NewtonMuon",
    "NewtonMuonHooks",
    "newton_precondition",
    "newton_refresh",
    "input_second_moment",
]
