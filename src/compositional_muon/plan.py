"""Typed plans: the layout of a CM factor pair (:class:`PairLayout`) and a batch of same-shape
pairs ready to be written (:class:`PairBatch`). Shared by the optimizer, every parallel strategy
and the baselines; param groups keep the plain-dict form (:meth:`PairLayout.to_dict`) so
``state_dict`` stays loadable with ``torch.load(weights_only=True)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import head_view

__all__ = ["HeadRef", "PairLayout", "PairEntry", "PairBatch", "KINDS", "check_checkpoint_layout"]

Tensor = torch.Tensor
KINDS = ("qk", "ov")


@dataclass(frozen=True)
class HeadRef:
    """Where one factor's heads sit in a parameter: head ``h`` is rows (``axis=0``) or columns
    (``axis=1``) ``offset + h*stride : offset + h*stride + head_dim`` of parameter ``index`` of the
    param group (``index=-1`` when the parameter is held directly, as in the baselines)."""

    index: int
    axis: int
    offset: int
    stride: int

    def view(self, t: Tensor, n: int, d: int) -> Tensor:
        """Kernel-layout view ``(n, d, width)`` of the heads in ``t`` (a tensor shaped like the parameter)."""
        return head_view(t, self.axis, self.offset, self.stride, n, d)

    @property
    def slot(self) -> tuple[int, int, int]:
        return (self.axis, self.offset, self.stride)


@dataclass(frozen=True)
class PairLayout:
    """One CM factor pair: ``a`` holds ``num_heads`` heads (QK: ``W_q``; OV: ``W_o^T``), ``b`` holds
    ``num_kv_heads`` (QK: ``W_k``; OV: ``W_v``), each ``head_dim`` wide."""

    name: str
    kind: str
    head_dim: int
    num_heads: int
    num_kv_heads: int
    a: HeadRef
    b: HeadRef

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown CM pair kind {self.kind!r}; expected one of {KINDS}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"CM pair {self.name!r}: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def views(self, ta: Tensor, tb: Tensor) -> tuple[Tensor, Tensor]:
        """Kernel-layout head views of ``(ta, tb)``: tensors shaped like the ``a`` and ``b`` parameters."""
        return self.a.view(ta, self.num_heads, self.head_dim), self.b.view(tb, self.num_kv_heads, self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        """The serialized form stored in a param group (``cm_pairs``) and in checkpoints."""
        return dict(
            name=self.name,
            kind=self.kind,
            head_dim=self.head_dim,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            a=[self.a.index, *self.a.slot],
            b=[self.b.index, *self.b.slot],
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairLayout:
        return cls(
            name=d["name"],
            kind=d["kind"],
            head_dim=int(d["head_dim"]),
            num_heads=int(d["num_heads"]),
            num_kv_heads=int(d["num_kv_heads"]),
            a=HeadRef(*(int(x) for x in d["a"])),
            b=HeadRef(*(int(x) for x in d["b"])),
        )


@dataclass
class PairEntry:
    """One pair's head views into its weights ``w``, gradients ``g``, momenta ``m`` and (normuon)
    head moments ``v``, each an ``(a, b)`` tuple; the batch writes through them."""

    name: str
    w: tuple[Tensor, Tensor]
    g: tuple[Tensor, Tensor]
    m: tuple[Tensor, Tensor]
    v: tuple[Tensor, Tensor] | None = None


@dataclass
class PairBatch:
    """Same-shape pairs stacked along a layer dim ``L``: weights ``A``/``B``, new momenta and the
    updates ``dA``/``dB`` (``(L, H, d, D)`` / ``(L, Hkv, d, D)``, this process's part). ``apply``
    replaces the default write-back (the gather fallback writes only this rank's rows);
    ``finite`` is set when the verdict must be agreed across ranks; ``stats``: record diagnostics."""

    entries: list[PairEntry]
    kind: str
    A: Tensor
    B: Tensor
    new_ma: Tensor
    new_mb: Tensor
    dA: Tensor | None = None
    dB: Tensor | None = None
    names: list[str] = field(default_factory=list)
    new_va: Tensor | None = None
    new_vb: Tensor | None = None
    path: str = "local"
    stats: bool = True
    finite: bool | None = None
    apply: Callable[[float], None] | None = None

    def __post_init__(self) -> None:
        if not self.names:
            self.names = [e.name for e in self.entries]


def check_checkpoint_layout(state_dict: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
    """Raise ValueError (one line) when an optimizer checkpoint does not fit ``param_groups``:
    different group count or kinds, a different CM attention layout, or a state tensor whose shape
    differs from its parameter's."""
    saved = state_dict.get("param_groups", [])
    if len(saved) != len(param_groups):
        raise ValueError(
            f"optimizer/model mismatch: the checkpoint has {len(saved)} param groups, "
            f"this optimizer has {len(param_groups)}"
        )
    for i, (s, g) in enumerate(zip(saved, param_groups)):
        if s.get("kind") != g["kind"]:
            raise ValueError(
                f"optimizer/model mismatch: param group {i} is {s.get('kind')!r} in the checkpoint but {g['kind']!r} here"
            )
        if g["kind"] == "cm" and s.get("cm_pairs") != g["cm_pairs"]:
            raise ValueError(
                f"optimizer/model mismatch: the attention layout of param group {i} differs from "
                "the checkpoint's (different model or head counts)"
            )
    by_index = dict(enumerate(p for g in param_groups for p in g["params"]))
    for k, st in state_dict.get("state", {}).items():
        p = by_index.get(k)
        for name, v in st.items():
            if p is not None and isinstance(v, torch.Tensor) and v.ndim and v.shape != p.shape:
                raise ValueError(
                    f"optimizer/model mismatch: state {name!r} of parameter {k} has shape "
                    f"{tuple(v.shape)}, the parameter has {tuple(p.shape)}"
                )
