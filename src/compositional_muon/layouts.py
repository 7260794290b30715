"""How a matrix optimizer reads a parameter with more than two dimensions.

A 2-D weight is one matrix (nn.Linear layout, ``out x in``). A tensor with more dims is ambiguous:

* ``"conv"``: a convolution kernel ``(out, in, k...)``, one matrix ``out x (in * prod(k))``.
* ``"experts"``: a stack of ``E`` expert matrices ``(E, out, in)`` (Mixtral/Qwen-MoE in
  transformers, torchtitan, this library's :class:`~compositional_muon.training.models.MoEGPT`):
  each expert is orthogonalized on its own, all ``E`` in one batched msign.
* ``"experts_transposed"``: a stack stored ``(E, in, out)`` (transformers' GPT-OSS,
  ``is_transposed=True`` expert modules); each expert is ``W_e^T``.

A param group chooses with ``tensor_layout`` (default ``"auto"``). ``"auto"`` takes a parameter's
tag set by :func:`mark_layouts` (or :func:`tag`), else treats 4-D and larger tensors as conv
kernels, and refuses an untagged 3-D tensor (a Conv1d kernel and an expert stack look alike)
with a message naming the option. No guess is silent.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "TENSOR_LAYOUTS",
    "resolve_layout",
    "to_matrices",
    "from_matrices",
    "mark_layouts",
    "tag",
    "layout_of",
    "check_group",
]

TENSOR_LAYOUTS = ("auto", "conv", "experts", "experts_transposed")
_TAG = "_cm_tensor_layout"


def tag(p: torch.Tensor, layout: str) -> None:
    """Record ``layout`` ("conv", "experts", "experts_transposed") on the parameter ``p``."""
    if layout not in TENSOR_LAYOUTS[1:]:
        raise ValueError(f"unknown tensor_layout {layout!r}; expected one of {TENSOR_LAYOUTS[1:]}")
    setattr(p, _TAG, layout)


def layout_of(p: torch.Tensor) -> str | None:
    """The tag :func:`tag` / :func:`mark_layouts` put on ``p`` (None if untagged)."""
    return getattr(p, _TAG, None)


def _module_layouts(m: nn.Module) -> dict:
    """``{param name: layout}`` for the 3-D+ parameters a module declares or is known to hold."""
    declared = getattr(m, "tensor_layouts", None)
    if isinstance(declared, dict):
        return dict(declared)
    if isinstance(m, nn.modules.conv._ConvNd):
        return {"weight": "conv"}
    name = type(m).__name__
    if name.endswith("Experts") or hasattr(m, "is_transposed"):
        transposed = bool(getattr(m, "is_transposed", False))
        kind = "experts_transposed" if transposed else "experts"
        return {n: kind for n, p in m.named_parameters(recurse=False) if p.ndim == 3}
    return {}


def mark_layouts(model: nn.Module) -> dict:
    """Tag every 3-D+ parameter of a known kind in ``model`` and return ``{name: layout}``.

    Known: ``nn.Conv1d/2d/3d`` weights ("conv"); modules with a ``tensor_layouts`` dict attribute
    (``{param name: layout}``, e.g. :class:`~compositional_muon.training.models.moe.Experts`);
    transformers' MoE expert modules (a class name ending in ``Experts``: 3-D parameters are
    ``(E, out, in)``, or ``(E, in, out)`` when the module's ``is_transposed`` is true). Call it
    before building the optimizer (under FSDP2, after ``fully_shard``)."""
    out = {}
    for mname, m in model.named_modules():
        for pname, kind in _module_layouts(m).items():
            p = getattr(m, pname, None)
            if isinstance(p, torch.Tensor) and p.ndim >= 3:
                tag(p, kind)
                out[f"{mname}.{pname}" if mname else pname] = kind
    return out


def resolve_layout(p: torch.Tensor, option: str, where: str = "a parameter") -> str:
    """The layout of ``p`` in a group whose ``tensor_layout`` is ``option`` ("matrix" for 2-D)."""
    if option not in TENSOR_LAYOUTS:
        raise ValueError(f"unknown tensor_layout {option!r}; expected one of {TENSOR_LAYOUTS}")
    if p.ndim <= 2:
        return "matrix"
    kind = option if option != "auto" else layout_of(p)
    if kind is None:
        if p.ndim >= 4:
            return "conv"
        raise ValueError(
            f"{where} has shape {tuple(p.shape)}: a 3-D tensor may be a Conv1d kernel or a stack of expert "
            "matrices; set the param group's tensor_layout='conv', 'experts' or 'experts_transposed' "
            "(or call compositional_muon.mark_layouts(model) first)"
        )
    if kind.startswith("experts") and p.ndim != 3:
        raise ValueError(f"{where}: tensor_layout={kind!r} needs a 3-D (E, out, in) tensor, got {tuple(p.shape)}")
    return kind


def to_matrices(u: torch.Tensor, layout: str) -> torch.Tensor:
    """The matrices to orthogonalize: ``(m, n)`` for "matrix"/"conv", ``(E, out, in)`` for experts."""
    if layout == "conv":
        return u.flatten(1)  # unlike reshape(out, -1), also right for empty weights
    if layout == "experts_transposed":
        return u.mT
    return u


def from_matrices(z: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`to_matrices`: ``z`` back in the shape of ``like``."""
    if layout == "experts_transposed":
        return z.mT
    return z.reshape(like.shape)


def check_group(group: dict, supports_experts: bool, owner: str) -> None:
    """Resolve every parameter's layout of a matrix group at construction (errors name the option);
    an optimizer without a per-expert rule refuses expert stacks."""
    option = group.get("tensor_layout", "auto")
    for i, p in enumerate(group["params"]):
        kind = resolve_layout(p, option, f"parameter {i} of a matrix param group")
        if kind.startswith("experts") and not supports_experts:
            raise ValueError(
                f"{owner} has no per-expert rule for the expert stack of shape {tuple(p.shape)}; "
                "use Muon, PerHeadMuon or CompositionalMuon for expert weights"
            )
