"""The param-group routing every optimizer of this library shares.

A param group flagged ``use_muon=True`` is updated by the optimizer's *matrix rule* (Muon, NorMuon,
...); one flagged ``use_muon=False`` by AdamW, as in Keller Jordan's ``MuonWithAuxAdam``. The base
class also owns the checks every step needs: sparse or complex gradients raise ``TypeError``, and a
NaN/inf gradient either raises :class:`NonFiniteError` or skips the whole step (``nonfinite="skip"``,
counted in each group's ``"skipped_steps"``), before anything is written.
"""

from __future__ import annotations

import warnings

import torch

from . import state_check, validation
from .adamw import ADAMW_DEFAULTS, adamw_step
from .buckets import DEFAULT_BUCKET_BYTES, check_bucket_bytes
from .buckets import plan as plan_buckets
from .finite import NonFiniteError, finite_flags
from .layouts import check_group as _check_layouts
from .msign import default_msign_dtype
from .parallel import Parallel, is_dtensor
from .parallel.mesh import check_supported

__all__ = ["RoutedOptimizer", "check_grads", "NonFiniteError"]

_NONFINITE = ("raise", "skip")


def check_grads(param_groups, parallel: Parallel | None = None) -> bool:
    """Raise ``TypeError`` for sparse/complex grads; return whether every grad is finite.

    With DTensor (FSDP2) gradients each rank checks its shards and the verdict is agreed across
    ranks (one tiny all-reduce), so all ranks raise or skip together."""
    grads = []
    sharded = []
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            where = f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
            if g.is_sparse or g.layout != torch.strided:
                raise TypeError(f"{where} has a sparse gradient; this optimizer needs dense gradients")
            if g.is_complex() or p.is_complex():
                raise TypeError(f"{where} is complex; this optimizer supports real parameters only")
            if is_dtensor(g):
                sharded.append(g)
                g = g.to_local()
            grads.append(g)
    if sharded:
        parallel = parallel if parallel is not None else Parallel()
        return parallel.agree_finite(list(finite_flags(grads).unbind(0)), sharded, sharded[0].device)
    return not grads or bool(finite_flags(grads).all())


class RoutedOptimizer(torch.optim.Optimizer):
    """Base class: groups with ``use_muon=True`` go to :meth:`_matrix_step`, others to AdamW.

    Subclasses set ``matrix_defaults`` (the matrix rule's hyperparameters) and implement
    ``_matrix_step(group, params)`` for the params of a group that have a gradient.
    ``distributed`` ("auto", True, False): see :mod:`compositional_muon.distributed`.
    """

    matrix_defaults: dict = {}
    adamw_defaults: dict = ADAMW_DEFAULTS
    default_use_muon: bool = True  # what a group without the flag gets
    require_use_muon: bool = False  # MuonWithAuxAdam insists on the flag
    min_matrix_ndim: int = 2
    supports_experts: bool = False  # True where the matrix rule orthogonalizes each expert of a stack

    # the matrix step treats each matrix on its own, so it may run over byte-capped buckets
    # (see buckets.py); an optimizer whose update couples matrices sets this False
    bucketed: bool = True

    def __init__(
        self,
        params,
        defaults: dict | None = None,
        *,
        nonfinite: str = "raise",
        distributed="auto",
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
    ):
        if nonfinite not in _NONFINITE:
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}; expected one of {_NONFINITE}")
        self.nonfinite = nonfinite
        self.bucket_bytes = check_bucket_bytes(bucket_bytes)
        # How work is spread over processes (see compositional_muon.parallel): "auto" spreads the
        # msign work of replicated (DDP) parameters when torch.distributed is initialized; False
        # never; DTensor (FSDP2) parameters always take the shard-aware strategies.
        self.parallel = Parallel(distributed, type(self).__name__)
        self.distributed = distributed
        self._matrix_defaults = {**self.matrix_defaults, **(defaults or {})}
        # torch.optim.Optimizer needs a defaults dict; schedulers such as OneCycleLR look for
        # "momentum" or "betas" in it, so expose the matrix rule's defaults.
        super().__init__(params, dict(self._matrix_defaults))
        state_check.install(self)  # class/keys/shapes checked by load_state_dict (state_check.py)

    # -- groups ---------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        group["params"] = list(params)
        if "use_muon" not in group:
            if self.require_use_muon:
                raise ValueError(f"{type(self).__name__} needs every param group to set use_muon=True or False")
            group["use_muon"] = self.default_use_muon
        if not isinstance(group["use_muon"], bool):
            raise TypeError(f"`use_muon` must be a bool, got {group['use_muon']!r}")
        for k, v in (self._matrix_defaults if group["use_muon"] else self.adamw_defaults).items():
            group.setdefault(k, v)
        group.setdefault("skipped_steps", 0)
        if group["use_muon"]:
            for i, p in enumerate(group["params"]):
                if p.ndim < self.min_matrix_ndim:
                    raise ValueError(
                        f"{type(self).__name__} updates matrices; parameter {i} of a use_muon=True group has shape "
                        f"{tuple(p.shape)}. Put 0-D/1-D parameters (gains, biases) in a use_muon=False (AdamW) group"
                    )
        validation.check_new_group(self, group)  # the ranges table (validation.py)
        if group["use_muon"]:  # after the table: an unknown tensor_layout is named there
            _check_layouts(group, self.supports_experts, type(self).__name__)
            # a DTensor layout no strategy can update exactly: refuse before any step
            check_supported(group["params"], type(self).__name__)
        self._register_group(group)

    def _register_group(self, group: dict) -> None:
        """Hand a complete, validated group to ``torch.optim.Optimizer``."""
        torch.optim.Optimizer.add_param_group(self, group)

    # -- step -----------------------------------------------------------------------------------
    def _begin_step(self, closure):
        """Shared start of every ``step``: evaluate ``closure`` (with grad enabled), check the
        gradients (sparse/complex raise), and on a NaN/inf gradient raise or count a skipped step.
        Returns ``(loss, proceed)``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        validation.check_step(self)  # hyperparameters edited since the last step, CM pairs' gradients
        if not check_grads(self.param_groups, self.parallel):
            if (weights := validation.nonfinite_weights(self.param_groups)) is not None:
                raise NonFiniteError(weights)  # even with nonfinite="skip": skipping cannot recover
            if self.nonfinite == "raise":
                raise NonFiniteError("a gradient holds NaN/inf; the step was not applied (nonfinite='raise')")
            for group in self.param_groups:
                group["skipped_steps"] += 1
            return loss, False
        return loss, True

    @torch.no_grad()
    def step(self, closure=None):
        loss, proceed = self._begin_step(closure)
        if not proceed:
            return loss
        self._before_step()
        self._step_groups(self.param_groups)
        return loss

    def _step_groups(self, groups: list[dict]) -> None:
        """Matrix groups through :meth:`_matrix_step`, the others through AdamW."""
        for group in groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["use_muon"]:
                self._bucketed_matrix_step(group, params)
            else:
                adamw_step(
                    params,
                    [p.grad for p in params],
                    [self.state[p] for p in params],
                    lr=float(group["lr"]),
                    betas=group["betas"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )

    # -- shared helpers ---------------------------------------------------------------------------
    def _state_buffer(self, p: torch.Tensor, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``self.state[p][key]``, created as zeros shaped like ``p`` (its layout, ``dtype`` or
        ``p``'s) on first use: the one lazy state creation every optimizer uses."""
        st = self.state[p]
        if key not in st:
            st[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return st[key]

    def _warn_once(self, key: str, message: str) -> None:
        """A UserWarning, once per ``key`` for this optimizer."""
        seen = self.__dict__.setdefault("_dist_warned", set())
        if key not in seen:
            seen.add(key)
            warnings.warn(message, UserWarning, stacklevel=6)

    def _before_step(self) -> None:
        """Hook for optimizers that need work before the groups are stepped."""

    def _bucketed_matrix_step(self, group: dict, params: list) -> None:
        """:meth:`_matrix_step` over byte-capped buckets of ``params`` (:func:`buckets.plan`), so
        the step's transient memory stays bounded; one call when the class is not ``bucketed``."""
        if not self.bucketed:
            self._matrix_step(group, params)
            return
        work = group.get("msign_dtype") or default_msign_dtype(params[0].device)
        for chunk in plan_buckets(params, self.bucket_bytes, work):
            self._matrix_step(group, chunk)

    def _matrix_step(self, group: dict, params: list) -> None:
        raise NotImplementedError
