"""Muon: momentum, then the polar factor of the momentum, per weight matrix.

For a weight ``W`` (out x in; conv weights are flattened to ``out x (in*kh*kw)``; a stack of
expert matrices ``(E, out, in)`` is orthogonalized per expert, see :mod:`.layouts`)::

    B <- beta B + (1 - beta) G                       (momentum buffer)
    U  = (1 - beta) G + beta B   if nesterov else B
    W <- (1 - lr*wd) W - lr * s(W) * msign(U)

with the shape factor ``s`` chosen by ``adjust_lr_fn``: ``"original"`` (Keller Jordan's,
``sqrt(max(1, rows / cols))``) or ``"match_rms_adamw"`` (Moonlight's, ``0.2 * sqrt(max(rows, cols))``,
which gives the update the RMS of a typical AdamW update so AdamW learning rates carry over).
Rows/cols are those of the 2-D (flattened) matrix, or of one expert.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .buckets import DEFAULT_BUCKET_BYTES
from .layouts import from_matrices, resolve_layout, to_matrices
from .msign import default_msign_dtype, msign
from .ops import decoupled_add
from .parallel import is_dtensor
from .routing import RoutedOptimizer

__all__ = ["Muon", "MuonWithAuxAdam", "MsignOptimizer", "muon_momentum", "shape_scale", "ADJUST_LR_FNS"]

ADJUST_LR_FNS = ("original", "match_rms_adamw")


def shape_scale(rows: int, cols: int, adjust_lr_fn: str | None = "original") -> float:
    """Per-matrix step multiplier for a ``rows x cols`` weight."""
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols)) if cols else 1.0  # an empty (rows x 0) weight has no step
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}; expected one of {ADJUST_LR_FNS}")


def muon_momentum(buf: torch.Tensor, grad: torch.Tensor, beta: float, nesterov: bool) -> torch.Tensor:
    """Update ``buf`` in place (``lerp`` toward ``grad``) and return the direction to orthogonalize.

    The returned tensor never aliases ``buf``; callers may modify it freely.
    """
    buf.lerp_(grad.to(buf.dtype), 1 - beta)
    return grad.to(buf.dtype).lerp(buf, beta) if nesterov else buf.clone()


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """2-D view of a weight: conv ``(out, in, kh, kw)`` -> ``(out, in*kh*kw)``."""
    return t.flatten(1) if t.ndim > 2 else t  # unlike reshape(out, -1), also right for empty weights


class MsignOptimizer(RoutedOptimizer):
    """Base of every msign-based matrix rule (Muon and its variants): momentum directions,
    orthogonalization through ``self.parallel`` (every strategy applies), the shared checks.

    Subclasses set ``matrix_defaults``, pass their hyperparameters to ``super().__init__(params,
    defaults)`` and override :meth:`_directions` / :meth:`_matrix_step` as needed.
    """

    def _directions(self, group: dict, params: list) -> list:
        """Momentum step for each param; returns the directions to orthogonalize (2-D, or
        ``(E, out, in)`` for an expert stack, see :mod:`.layouts`). Directions of same-shape,
        same-dtype params are written straight into one stacked buffer (returned as its slices), so
        the batched msign needs no stacking copy."""
        beta, nesterov = group["momentum"], group["nesterov"]
        option = group.get("tensor_layout", "auto")
        kinds = [resolve_layout(p, option) for p in params]
        if any(is_dtensor(p) for p in params):  # sharded (FSDP2): one direction per param
            out = []
            for p, kind in zip(params, kinds):
                buf = self._state_buffer(p, "momentum_buffer")
                out.append(to_matrices(muon_momentum(buf, p.grad, beta, nesterov), kind))
            return out
        bufs = []
        for p, kind in zip(params, kinds):
            buf = self._state_buffer(p, "momentum_buffer")
            buf.lerp_(p.grad.to(buf.dtype), 1 - beta)
            bufs.append(to_matrices(buf, kind))

        def fill(i: int, out: torch.Tensor) -> None:
            if nesterov:
                torch.lerp(to_matrices(params[i].grad, kinds[i]).to(out.dtype), bufs[i], beta, out=out)
            else:
                out.copy_(bufs[i])

        return stacked_directions(bufs, fill)

    def _orthogonalize(self, group: dict, dirs: list, out_dtype: torch.dtype | None = None) -> list:
        """msign of every direction, through the strategy ``self.parallel`` picks for each (spread
        over DDP ranks, owner ranks for FSDP2 shards, or this process). ``out_dtype`` (results'
        dtype; None: the directions') applies in this process only."""
        if not self.parallel.active(dirs):
            return self._orthogonalize_local(group, dirs, out_dtype)
        return self.parallel.matrices(dirs, lambda mats: self._orthogonalize_local(group, mats))

    def _orthogonalize_local(self, group: dict, dirs: list, out_dtype: torch.dtype | None = None) -> list:
        """msign of every direction; same-shape, same-dtype matrices share one batched call (the
        directions' own stacked buffer when they are its slices in order, see :meth:`_directions`)."""
        steps = None if group["backend"] == "svd" else int(group["ns_steps"])
        out = [None] * len(dirs)
        buckets: dict = {}
        for i, u in enumerate(dirs):
            buckets.setdefault((tuple(u.shape), u.dtype), []).append(i)
        for idx in buckets.values():
            batch = _stacked(dirs, idx)
            # an empty matrix (a zero-width layer) is its own polar factor; the SVD backend rejects it
            z = (
                msign(batch, group["backend"], steps, dtype=group["msign_dtype"], out_dtype=out_dtype)
                if batch.numel()
                else batch
            )
            for j, i in enumerate(idx):
                out[i] = z[j]
        return out

    def _matrix_step(self, group: dict, params: list) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        # the msign results stay in the working precision; decoupled_add reads them as they are
        # (exact upcast, same result as casting first)
        work = None if group["backend"] == "svd" else group["msign_dtype"] or default_msign_dtype(params[0].device)
        zs = self._orthogonalize(group, self._directions(group, params), out_dtype=work)
        option = group.get("tensor_layout", "auto")
        for p, z in zip(params, zs):
            scale = shape_scale(z.size(-2), z.size(-1), group["adjust_lr_fn"])
            decoupled_add(p, from_matrices(z, p, resolve_layout(p, option)), lr * wd, alpha=-lr * scale)


def stacked_directions(bufs: list, fill: Callable[[int, torch.Tensor], None]) -> list:
    """Directions written straight into one stacked buffer per (shape, dtype, device) class of
    ``bufs`` (the momentum buffers as matrices): ``fill(i, out)`` writes direction ``i`` into its
    slot, and the slots are returned in order, so the batched msign reads the stack without a copy
    (:func:`_stacked`)."""
    classes: dict = {}
    for i, b in enumerate(bufs):
        classes.setdefault((tuple(b.shape), b.dtype, b.device), []).append(i)
    dirs: list = [None] * len(bufs)
    for (shape, dtype, device), idx in classes.items():
        stack = torch.empty((len(idx), *shape), dtype=dtype, device=device)
        for j, i in enumerate(idx):
            fill(i, stack[j])
            dirs[i] = stack[j]
    return dirs


def _stacked(dirs: list, idx: list) -> torch.Tensor:
    """``torch.stack`` of ``dirs[i] for i in idx``, or their common base when they already are
    its consecutive slices (no copy)."""
    first = dirs[idx[0]]
    base = first._base
    if (
        base is not None
        and base.is_contiguous()
        and base.size(0) == len(idx)
        and base.shape[1:] == first.shape
        and all(dirs[i]._base is base and dirs[i].data_ptr() == base[j].data_ptr() for j, i in enumerate(idx))
    ):
        return base
    return torch.stack([dirs[i] for i in idx]) if len(idx) > 1 else first.unsqueeze(0)


class Muon(MsignOptimizer):
    """Muon for 2-D (and conv) hidden weights; also accepts ``use_muon=False`` AdamW groups.

    Args, in the positional order of Keller Jordan's ``Muon`` and ``torch.optim.Muon``: ``lr`` (0.02),
    ``weight_decay`` (0, decoupled: ``W <- (1 - lr*wd) W``), ``momentum`` (0.95), ``nesterov`` (True),
    ``ns_steps`` (5), ``adjust_lr_fn`` ("original" or
    "match_rms_adamw"), ``backend`` (msign backend, "newton_schulz" by default),
    ``msign_dtype`` (working precision of the iteration; None: :func:`~compositional_muon.msign.default_msign_dtype`),
    ``tensor_layout`` ("auto", "conv", "experts", "experts_transposed": how a tensor with more than
    two dims is read, see :mod:`compositional_muon.layouts`),
    ``nonfinite`` ("raise" or "skip" a step whose gradients hold NaN/inf), ``distributed``
    ("auto": under DDP each rank orthogonalizes a share of the matrices and the results are
    all-gathered; False: every rank does all of them; see ``docs/distributed.md``).
    Same-shape matrices of a group are orthogonalized in one batched call. DTensor (FSDP2)
    parameters are supported: each matrix is gathered to one owner rank for its msign.
    """

    supports_experts = True

    matrix_defaults = dict(
        lr=0.02,
        momentum=0.95,
        nesterov=True,
        ns_steps=5,
        weight_decay=0.0,
        adjust_lr_fn="original",
        backend="newton_schulz",
        msign_dtype=None,
        tensor_layout="auto",
    )

    def __init__(
        self,
        params,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "original",
        backend: str = "newton_schulz",
        msign_dtype: torch.dtype | None = None,
        *,
        tensor_layout: str = "auto",
        nonfinite: str = "raise",
        distributed="auto",
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                weight_decay=weight_decay,
                adjust_lr_fn=adjust_lr_fn,
                backend=backend,
                msign_dtype=msign_dtype,
                tensor_layout=tensor_layout,
            ),
            nonfinite=nonfinite,
            distributed=distributed,
            bucket_bytes=bucket_bytes,
        )


class MuonWithAuxAdam(Muon):
    """Drop-in for ``muon.MuonWithAuxAdam``: every param group sets ``use_muon``.

    ``use_muon=True`` groups take ``lr`` (0.02), ``momentum`` (0.95), ``weight_decay`` (0) and the
    other Muon keys; ``use_muon=False`` groups take AdamW's ``lr`` (3e-4), ``betas`` ((0.9, 0.95)),
    ``eps`` (1e-10), ``weight_decay`` (0)::

        muon_group = dict(params=hidden_weights, lr=0.02, weight_decay=0.01, use_muon=True)
        adam_group = dict(params=others, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01, use_muon=False)
        optimizer = MuonWithAuxAdam([muon_group, adam_group])
    """

    require_use_muon = True

    def __init__(
        self,
        param_groups,
        *,
        nonfinite: str = "raise",
        distributed="auto",
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
    ):
        super().__init__(param_groups, nonfinite=nonfinite, distributed=distributed, bucket_bytes=bucket_bytes)
