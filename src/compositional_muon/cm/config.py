"""The one set of CM options and their defaults (:class:`CMConfig`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..connection import CONNECTIONS
from ..inverse_root import NEWTON_ITERS, ROOT_METHODS
from ..msign import BACKENDS

__all__ = ["CMConfig", "METHODS", "WHITENINGS", "NONFINITE", "CONFIG_FIELDS", "choice"]

METHODS = ("half_split", "joint")
WHITENINGS = ("both", "pre", "post", "none")
NONFINITE = ("raise", "skip")


def choice(name: str, value: Any, options: Sequence[Any]) -> None:
    """Raise ValueError unless ``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(options)}")


@dataclass(frozen=True)
class CMConfig:
    """The variant switches of one CM update: the single source of CM's defaults (the reference's).

    ``cm_qk``, ``cm_ov`` and ``CompositionalMuon`` groups all start from these values.

    ``method``: "half_split" (each factor gets ``eta/2``) or "joint" (one msign over the whitened
    factors of a group stacked along the head axis, ``[X_A1; ...; X_AG; X_B]``, ``(G+1) d x D``;
    step ``eta/2`` per factor; gauge invariant, see ``docs/math.md``).
    ``isotropic``: replace each partner root by the scalar ``sqrt(||W_partner||_F^2 / d + lam)``.
    ``hybrid``: msign the ``A`` factor of an OV pair (``W_o``) as one whole matrix instead of per
    head (QK pairs are always per head: the kernel's caller passes ``for_kind("qk")``).
    ``whitening``: apply ``C^{-1}`` "both" before and after msign, only "pre", only "post", "none".
    ``connection``: remove the gauge component of the update (see ``connection.py``).
    ``per_mat_renorm``: rescale each factor's update to the Frobenius norm it had before
    post-whitening. ``lam``: ridge added to every partner Gram (absolute, in the Gram's units).
    ``msign_backend`` / ``msign_steps`` / ``msign_dtype``: see ``msign.py``.
    ``root_method``: "auto", "eigh" or "newton" (see ``inverse_root.py``); ``root_iters`` Newton's steps.
    """

    method: str = "half_split"
    isotropic: bool = False
    hybrid: bool = True
    whitening: str = "both"
    connection: str = "none"
    per_mat_renorm: bool = False
    lam: float = 1e-2
    msign_backend: str = "polar_express"
    msign_steps: int | None = None
    msign_dtype: torch.dtype | None = None
    root_method: str = "auto"
    root_iters: int = NEWTON_ITERS

    def __post_init__(self) -> None:
        choice("method", self.method, METHODS)
        choice("whitening", self.whitening, WHITENINGS)
        choice("connection", self.connection, CONNECTIONS)
        choice("msign_backend", self.msign_backend, BACKENDS)
        choice("root_method", self.root_method, ROOT_METHODS)
        for name in ("isotropic", "hybrid", "per_mat_renorm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be a bool, got {getattr(self, name)!r}")
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0 and self.lam == self.lam):
            raise ValueError(f"`lam` must be a finite number >= 0, got {self.lam!r}")

    def for_kind(self, kind: str) -> CMConfig:
        """The config a pair of ``kind`` ("qk" or "ov") runs with: ``hybrid`` is an OV option, so a
        QK pair's ``A`` factor (``W_q``) is always orthogonalized per head."""
        if kind == "ov" or not self.hybrid:
            return self
        return dataclasses.replace(self, hybrid=False)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> CMConfig:
        """The config named by the CM keys of ``options`` (e.g. a param group); others are ignored."""
        return cls(**{k: options[k] for k in CONFIG_FIELDS if k in options})


CONFIG_FIELDS = tuple(f for f in CMConfig.__dataclass_fields__)
