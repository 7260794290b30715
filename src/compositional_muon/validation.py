"""One table of the hyperparameter ranges every optimizer of this library accepts.

Every optimizer checks its param groups against :data:`RANGES` when a group is added (construction,
``add_param_group``) and again at the start of every ``step`` (users and schedulers edit
``param_groups`` between steps), before anything is written; ``load_state_dict`` checks the saved
groups the same way. A value out of range raises one ``ValueError`` naming the optimizer, the group
index and the key, e.g. ``Muon: param group 0: `lr` must be a finite number >= 0, got nan``.

Keys a group holds that are not in the table (``params``, ``initial_lr`` added by schedulers, user
tags) are left alone. Besides single values, :data:`RULES` holds the few constraints that tie two
keys together (decoupled decay ``1 - lr * weight_decay`` must stay >= 0, ...).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["Range", "RANGES", "RULES", "check_value", "check_group", "check_groups", "check_functional"]


def _options(module: str, name: str) -> Callable[[], tuple]:
    """The allowed values of a choice, read lazily from the module that defines them (one source)."""

    def get() -> tuple:
        import importlib

        return tuple(getattr(importlib.import_module(f"compositional_muon.{module}"), name))

    return get


@dataclass(frozen=True)
class Range:
    """What one hyperparameter may be.

    ``kind``: ``"real"`` (finite, in ``[lo, hi]`` with open ends per ``lo_open``/``hi_open``),
    ``"int"`` (an integral number >= ``lo``), ``"bool"``, ``"choice"`` (one of ``options()``),
    ``"betas"`` (two reals in ``[0, 1)``) or ``"dtype"`` (a floating torch.dtype). ``none_ok``: None
    is accepted (it also is where the optimizer class's own default is None). ``label`` names the
    key in "unknown ..." messages; ``refusals`` maps a choice value to the reason it is refused.
    """

    kind: str
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    options: Callable[[], tuple] | None = None
    none_ok: bool = False
    label: str = ""
    refusals: Mapping[str, Callable[[], str]] = field(default_factory=dict)

    def describe(self) -> str:
        if self.kind == "real":
            if self.hi == math.inf:
                return f"a finite number {'>' if self.lo_open else '>='} {self.lo:g}"
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"a finite number in {left}{self.lo:g}, {self.hi:g}{right}"
        if self.kind == "int":
            return f"an integer >= {self.lo:g}"
        if self.kind == "bool":
            return "a bool (True or False)"
        if self.kind == "betas":
            return "a pair of finite numbers in [0, 1)"
        if self.kind == "dtype":
            return "a floating-point torch.dtype"
        return f"one of {self.choices()}"

    def choices(self) -> tuple:
        return self.options() if self.options is not None else ()


_NONNEG = Range("real", lo=0.0)
_POSITIVE = Range("real", lo=0.0, lo_open=True)
_UNIT = Range("real", lo=0.0, hi=1.0, hi_open=True)  # a moving-average coefficient
_BOOL = Range("bool")


def _group_kinds() -> tuple:
    """Group kinds: CompositionalMuon's and PerHeadMuon's (one source each)."""
    from .compositional import KINDS
    from .per_head import PER_HEAD_KINDS

    return tuple(dict.fromkeys(KINDS + PER_HEAD_KINDS))


def _newton_refusal() -> str:
    from .compositional import _NEWTON_REFUSAL

    return _NEWTON_REFUSAL


#: Every hyperparameter key used by the optimizers of this library (and the AdamW groups).
RANGES: dict[str, Range] = {
    # shared
    "lr": _NONNEG,
    "weight_decay": _NONNEG,
    "momentum": _UNIT,
    "nesterov": _BOOL,
    "eps": _POSITIVE,  # eps = 0 divides 0 by 0 for an all-zero gradient row / second moment
    "use_muon": _BOOL,
    # AdamW groups
    "betas": Range("betas"),
    # Muon and its variants
    "ns_steps": Range("int", lo=1),
    "backend": Range("choice", options=_options("msign", "BACKENDS"), label="msign backend"),
    "msign_dtype": Range("dtype", none_ok=True),
    "tensor_layout": Range("choice", options=_options("layouts", "TENSOR_LAYOUTS"), label="tensor_layout"),
    # Muon's shape factors; CM's (rms_match.CM_ADJUST_LR_FNS) are the same names
    "adjust_lr_fn": Range("choice", options=_options("muon", "ADJUST_LR_FNS"), none_ok=True),
    "beta2": _UNIT,  # None only where the class default is None (AdaMuon)
    "scale": Range("choice", options=_options("variants.normuon", "NORMUON_SCALES"), label="NorMuon scale"),
    "sign_stabilize": _BOOL,
    "version": Range("choice", options=lambda: (1, 2), label="Mano version"),
    "refresh_interval": Range("int", lo=1),
    "precond_beta": _UNIT,
    "ridge": _NONNEG,
    "precond_init": _POSITIVE,
    "precond_eps": _NONNEG,
    # CompositionalMuon / PerHeadMuon groups
    "kind": Range("choice", options=_group_kinds, label="param group kind"),
    "lam": _NONNEG,
    "method": Range("choice", options=_options("cm", "METHODS")),
    "isotropic": _BOOL,
    "hybrid": _BOOL,
    "whitening": Range("choice", options=_options("cm", "WHITENINGS")),
    "connection": Range("choice", options=_options("connection", "CONNECTIONS")),
    "momentum_reproject": _BOOL,
    "per_mat_renorm": _BOOL,
    "msign_backend": Range("choice", options=_options("msign", "BACKENDS"), label="msign backend"),
    "msign_steps": Range("int", lo=1, none_ok=True),
    "root_method": Range("choice", options=_options("inverse_root", "ROOT_METHODS")),
    "transform": Range(
        "choice",
        options=_options("compositional", "TRANSFORMS"),
        label="CM transform",
        refusals={"newton": _newton_refusal},
    ),
    "transform_beta2": _UNIT,
    "transform_eps": _POSITIVE,
}

#: Names the functional API uses for table keys.
ALIASES = {"eta": "lr", "beta": "momentum"}


def _real(value) -> float | None:
    """``value`` as a float if it is a real number (bools excluded) or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value.detach().reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _in_range(spec: Range, x: float) -> bool:
    if not math.isfinite(x):
        return False
    above = x > spec.lo if spec.lo_open else x >= spec.lo
    below = x < spec.hi if spec.hi_open else x <= spec.hi
    return above and below


def _value_ok(spec: Range, value) -> bool:
    if spec.kind == "real":
        x = _real(value)
        return x is not None and _in_range(spec, x)
    if spec.kind == "int":
        x = _real(value)
        return x is not None and math.isfinite(x) and x == int(x) and x >= spec.lo
    if spec.kind == "bool":
        return isinstance(value, bool)
    if spec.kind == "betas":
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            return False
        return all((x := _real(b)) is not None and _in_range(_UNIT, x) for b in value)
    if spec.kind == "dtype":
        return isinstance(value, torch.dtype) and value.is_floating_point
    return value in spec.choices()


def check_value(key: str, value, where: str, *, none_ok: bool = False) -> None:
    """Raise ``ValueError`` (prefixed by ``where``) unless ``value`` is allowed for ``key``."""
    spec = RANGES[ALIASES.get(key, key)]
    if value is None and (spec.none_ok or none_ok):
        return
    if spec.kind == "choice" and isinstance(value, str) and value in spec.refusals:
        raise ValueError(f"{where}`{key}` = {value!r}: {spec.refusals[value]()}")
    if _value_ok(spec, value):
        return
    if spec.kind == "choice":
        raise ValueError(f"{where}`{key}` = {value!r}: unknown {spec.label or key}; expected one of {spec.choices()}")
    raise ValueError(f"{where}`{key}` must be {spec.describe()}, got {value!r}")


# -- rules that tie keys together: (keys, predicate that is True when the group is wrong, message) --
RULES: tuple = (
    (
        ("lr", "weight_decay"),
        lambda g: (_real(g["lr"]) or 0.0) * (_real(g["weight_decay"]) or 0.0) > 1,
        "`lr` * `weight_decay` must be <= 1 (the decoupled decay multiplies the weights by 1 - lr * weight_decay)",
    ),
    (
        ("msign_backend", "msign_steps"),
        lambda g: g["msign_backend"] == "svd" and g["msign_steps"] is not None,
        "msign_backend='svd' is exact and takes no `msign_steps` (set it to None)",
    ),
    (
        ("momentum_reproject", "connection"),
        lambda g: g["momentum_reproject"] and g["connection"] == "none",
        "momentum_reproject=True needs a connection other than 'none'",
    ),
    (
        ("transform", "method"),
        lambda g: g["transform"] == "normuon" and g["method"] != "half_split",
        "transform='normuon' needs method='half_split'",
    ),
)


def check_group(group: Mapping, where: str, nullable: frozenset = frozenset()) -> None:
    """Check every key of ``group`` that the table knows, then :data:`RULES`. ``where`` prefixes
    the message (e.g. ``"Muon: param group 0: "``); ``nullable``: keys whose class default is None."""
    for key, value in group.items():
        if key in RANGES:
            check_value(key, value, where, none_ok=key in nullable)
    for keys, wrong, message in RULES:
        if all(k in group for k in keys) and wrong(group):
            got = ", ".join(f"{k}={group[k]!r}" for k in keys)
            raise ValueError(f"{where}{message}; got {got}")


def _nullable(opt) -> frozenset:
    defaults = {**getattr(type(opt), "matrix_defaults", {}), **getattr(type(opt), "adamw_defaults", {})}
    return frozenset(k for k, v in defaults.items() if v is None)


def check_groups(opt, groups=None, *, prefix: str | None = None) -> None:
    """Check every param group of ``opt`` (or ``groups``; messages start ``f"{prefix} {i}: "``) and
    the optimizer-level hyperparameters named in its class's ``checked_attributes``."""
    name = type(opt).__name__
    prefix = f"{name}: param group" if prefix is None else prefix
    nullable = _nullable(opt)
    for i, group in enumerate(opt.param_groups if groups is None else groups):
        check_group(group, f"{prefix} {i}: ", nullable)
    for attr in getattr(type(opt), "checked_attributes", ()):
        check_value(attr, getattr(opt, attr), f"{name}: ")


def check_new_group(opt, group: Mapping) -> None:
    """The check ``add_param_group`` runs on a group about to become ``param_groups[len]``."""
    where = f"{type(opt).__name__}: param group {len(opt.param_groups)}: "
    check_group(group, where, _nullable(opt))
    check_cm_pairs_trainable(group, where)


def check_step(opt) -> None:
    """The check at the start of ``step`` (after the closure, before anything is written)."""
    check_groups(opt)
    for i, group in enumerate(opt.param_groups):
        check_cm_pair_grads(group, f"{type(opt).__name__}: param group {i}: ")


_FACTOR_NAMES = {"qk": ("W_q", "W_k"), "ov": ("W_o", "W_v")}  # (A, B) of each pair kind


def _pair_params(group: Mapping):
    params = group["params"]
    for pair in group.get("cm_pairs", ()):
        yield pair, params[pair["a"][0]], params[pair["b"][0]], _FACTOR_NAMES.get(pair.get("kind"), ("A", "B"))


def check_cm_pairs_trainable(group: Mapping, where: str) -> None:
    """A CM pair must be trained whole: both weights trainable, or both frozen."""
    for pair, pa, pb, (na, nb) in _pair_params(group):
        if pa.requires_grad != pb.requires_grad:
            frozen = na if not pa.requires_grad else nb
            raise ValueError(
                f"{where}CM pair {pair['name']!r}: {frozen} is frozen (requires_grad=False) but its "
                "partner is trained; CM updates a pair together. Freeze both, or leave this layer out of "
                "`attention=` so its weights go to Muon"
            )


def check_cm_pair_grads(group: Mapping, where: str) -> None:
    """A CM pair with one gradient raises (a pair with neither is skipped by the step)."""
    for pair, pa, pb, (na, nb) in _pair_params(group):
        if (pa.grad is None) != (pb.grad is None):
            missing, present = (na, nb) if pa.grad is None else (nb, na)
            raise ValueError(
                f"{where}CM pair {pair['name']!r}: {missing} has no gradient but {present} has one; "
                "CM updates both factors of a pair from both weights, so nothing was written. Give both a "
                "gradient (e.g. zero_grad(set_to_none=False)) or neither"
            )


def check_functional(where: str, **values) -> None:
    """Checks for the functional API (``cm_qk`` / ``cm_ov``): table keys or their :data:`ALIASES`."""
    prefix = f"{where}: "
    for key, value in values.items():
        check_value(key, value, prefix)
    eta, wd = _real(values.get("eta", 0.0)), _real(values.get("weight_decay", 0.0))
    if eta is not None and wd is not None and eta * wd > 1:
        raise ValueError(f"{prefix}`eta` * `weight_decay` must be <= 1; got eta={eta!r}, weight_decay={wd!r}")


# -- non-finite weights: named as such on the paths where a step cannot proceed -------------------
def nonfinite_weights(param_groups) -> str | None:
    """A one-line description of the parameters whose *values* hold NaN/inf (None if all finite)."""
    from .finite import finite_flags

    where = [(gi, pi, p) for gi, g in enumerate(param_groups) for pi, p in enumerate(g["params"])]
    local = [p.to_local() if hasattr(p, "to_local") else p for _, _, p in where]
    flags = finite_flags([p.detach() for p in local]).tolist() if local else []
    bad = [
        f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
        for (gi, pi, p), ok in zip(where, flags)
        if not ok
    ]
    if not bad:
        return None
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return (
        f"the weights themselves hold NaN/inf ({', '.join(bad[:3])}{more}), not only the gradients: the model "
        "diverged or was loaded corrupted before this step; nothing was written (restore a checkpoint)"
    )


def nonfinite_cm_update_message(names, weights, lam) -> str:
    """Why a CM update is not finite although the gradients are: NaN/inf weights, or a singular Gram."""
    from .finite import all_finite

    weights = [w for w in weights if isinstance(w, torch.Tensor)]
    if weights and not all_finite(*weights):
        return (
            f"the weights of {names} hold NaN/inf (the weights, not the gradients): the model diverged "
            "or was loaded corrupted before this step; nothing was written (restore a checkpoint)"
        )
    return f"the CM update of {names} is not finite (singular partner Gram with lam={lam}?); nothing was written"
