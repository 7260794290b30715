"""Checks on ``state_dict`` / ``load_state_dict`` shared by every optimizer of this library.

:func:`install` registers torch.optim's state-dict hooks on an optimizer:

* ``state_dict()`` records the optimizer's class name under ``"optimizer_class"``;
* ``load_state_dict()`` first checks, before anything changes: the class (when recorded), the
  number of param groups and of parameters per group, the structural keys (``use_muon``, ``kind``,
  ``cm_pairs``), that the saved groups have this optimizer's hyperparameter keys (a key of another
  optimizer, or a missing one, raises), the saved hyperparameters' ranges
  (:mod:`~compositional_muon.validation`) and the shape of every saved state buffer. A mismatch
  raises one ``ValueError`` and leaves the optimizer unchanged. State dicts without the class record
  (written before it existed, or assembled by torch.distributed.checkpoint) are checked on the rest.
* after loading, state this library keeps at a higher precision than the parameter (AdamW moments
  of float16 parameters, CM's ``head_moment``) is restored at that precision: torch would cast it to
  the parameter's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import chain

import torch

from . import validation
from .adamw import adamw_state_dtype

__all__ = ["CLASS_KEY", "install", "check_state_dict"]

CLASS_KEY = "optimizer_class"
_STRUCTURAL = ("use_muon", "kind", "cm_pairs")
_SHARED = ("lr", "weight_decay", "momentum", "betas", "eps", "nesterov")


def _hi(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# state kept above the parameter's precision: key -> the dtype it is kept at, from the param's dtype
_HIGH_PRECISION = {"exp_avg": adamw_state_dtype, "exp_avg_sq": adamw_state_dtype, "head_moment": _hi}


def install(opt: torch.optim.Optimizer) -> None:
    """Register the hooks on ``opt`` (called once by every optimizer's constructor)."""
    opt.register_state_dict_post_hook(_record_class)
    opt.register_load_state_dict_pre_hook(_before_load)
    opt.register_load_state_dict_post_hook(_after_load)


def _record_class(opt, state_dict: dict) -> dict:
    state_dict[CLASS_KEY] = type(opt).__name__
    return state_dict


def _as_matrix_shape(p: torch.Tensor) -> tuple:
    return (p.shape[0], math.prod(p.shape[1:])) if p.ndim > 2 else tuple(p.shape)


def _allowed_shapes(opt, key: str, p: torch.Tensor):
    """The shapes state ``key`` of parameter ``p`` may have (None: not checked)."""
    if key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "head_moment"):
        return [tuple(p.shape)]
    rows, cols = _as_matrix_shape(p) if p.ndim >= 2 else (None, None)
    if key == "second_moment" and rows is not None:
        names = {c.__name__ for c in type(opt).__mro__}
        if "NorMuon" in names:
            return [(rows, 1)]
        if "AdaMuon" in names:
            return [(rows, cols)]
    if key in ("precond_K", "precond_inv") and cols:
        return [(cols, cols)] + [(nb, cols // nb, cols // nb) for nb in range(2, cols + 1) if cols % nb == 0]
    return None


def check_state_dict(opt, state_dict) -> None:
    """Raise ``ValueError`` if ``state_dict`` cannot be loaded into ``opt``; changes nothing."""
    name = type(opt).__name__
    where = f"{name}.load_state_dict: state dict mismatch: "
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{where}expected a dict with 'state' and 'param_groups' (from optimizer.state_dict())")
    saved_class = state_dict.get(CLASS_KEY)
    if saved_class is not None and saved_class != name:
        raise ValueError(
            f"{where}the state dict was saved by {saved_class}, not {name}; build a {saved_class} to load it"
        )
    saved, groups = state_dict["param_groups"], opt.param_groups
    if len(saved) != len(groups):
        raise ValueError(f"{where}the state dict has {len(saved)} param groups, this optimizer has {len(groups)}")
    for i, (s, g) in enumerate(zip(saved, groups)):
        _check_group_keys(s, g, f"{where}param group {i}: ", same_class=saved_class == name)
    validation.check_groups(opt, saved, prefix=f"{where}saved param group")
    _check_state_shapes(opt, state_dict["state"], saved, where)


def _check_group_keys(s: Mapping, g: Mapping, where: str, same_class: bool) -> None:
    if len(s["params"]) != len(g["params"]):
        raise ValueError(f"{where}{len(s['params'])} parameters in the state dict, {len(g['params'])} here")
    for key in _STRUCTURAL:
        if (key in s or key in g) and s.get(key) != g.get(key):
            if key == "cm_pairs":
                raise ValueError(f"{where}the attention layout (cm_pairs) differs (different model or head counts)")
            raise ValueError(f"{where}the state dict has {key}={s.get(key)!r}, this optimizer {key}={g.get(key)!r}")
    # A saved key this group lacks: another optimizer's, unless the class is recorded and the same
    # (then a user or scheduler added it, e.g. OneCycleLR's "momentum" on AdamW groups). Keys every
    # optimizer may carry are not evidence either way. A missing key would fail at step time.
    known = validation.RANGES
    extra = [] if same_class else sorted(k for k in s if k in known and k not in g and k not in _SHARED)
    missing = sorted(k for k in g if k in known and k not in s)
    if extra or missing:
        raise ValueError(
            f"{where}the saved group's hyperparameters differ from this optimizer's "
            f"(not used here: {extra}, missing: {missing}); it was saved by another optimizer"
        )


def _check_state_shapes(opt, state: Mapping, saved_groups, where: str) -> None:
    params = dict(
        zip(
            chain.from_iterable(s["params"] for s in saved_groups),
            chain.from_iterable(g["params"] for g in opt.param_groups),
        )
    )
    for pid, st in state.items():
        p = params.get(pid)
        if p is None:
            raise ValueError(f"{where}state for parameter id {pid!r}, which no saved param group lists")
        if not isinstance(st, Mapping):
            raise ValueError(f"{where}the state of parameter {pid} is a {type(st).__name__}, expected a dict")
        for key, v in st.items():
            if not isinstance(v, torch.Tensor):
                continue
            allowed = _allowed_shapes(opt, key, p)
            if allowed is not None and tuple(v.shape) not in allowed:
                raise ValueError(
                    f"{where}state {key!r} of parameter {pid} has shape {tuple(v.shape)}, expected "
                    f"{' or '.join(str(a) for a in allowed[:3])} for a parameter of shape {tuple(p.shape)}"
                )


def _before_load(opt, state_dict: dict):
    check_state_dict(opt, state_dict)
    ids = chain.from_iterable(s["params"] for s in state_dict["param_groups"])
    by_id = dict(zip(ids, chain.from_iterable(g["params"] for g in opt.param_groups)))
    keep = []
    for pid, st in state_dict["state"].items():
        p = by_id[pid]
        for key, v in st.items():
            if key in _HIGH_PRECISION and isinstance(v, torch.Tensor) and p.is_floating_point():
                want = _HIGH_PRECISION[key](p.dtype)
                if want != p.dtype:
                    keep.append((p, key, v, want))
    opt._state_check_keep = keep
    return None


def _after_load(opt) -> None:
    for p, key, v, want in getattr(opt, "_state_check_keep", ()):
        opt.state[p][key] = v.to(device=p.device, dtype=want, copy=True)
    opt._state_check_keep = []
