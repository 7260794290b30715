"""Newton-Muon: Muon on the gradient right-preconditioned by the layer inputs' second moment.

Du, Su, "The Newton-Muon Optimizer", arXiv:2604.01472. The one-step minimizer of the paper's
quadratic surrogate is ``W <- W - lr msign(G (Z Z^T)^-1)`` (``Z``: the layer inputs, one column per
token). The practical rule (Algorithm 1), per weight ``W`` of shape ``m x n`` (``nn.Linear`` layout,
out x in, so ``K`` is ``n x n``, on the input side), at the parameter's ``t``-th update::

    K_0 = init I (1e-3),  K^-1 = I until the first refresh
    if (t + 1) % k == 0:                                      refresh (k = refresh_interval, 32)
        K     <- beta_K K + (1 - beta_K) Z Z^T / N           Z: inputs seen this step (mean over calls)
        lam   =  gamma tr(K) / n + eps                       gamma = 0.2; eps = 1e-8 (authors' code)
        K^-1  <- (K + lam I)^-1                              Cholesky; identity if it fails
    G' = G K^-1                                              raw gradient, before momentum
    then Muon on G': momentum, msign, W <- (1 - lr wd) W - lr s(W) msign(.)

The inputs are captured by forward pre-hooks on ``nn.Linear`` modules (:meth:`NewtonMuon.register`
or :meth:`NewtonMuon.from_model`), only on refresh steps, only in training mode with grad enabled;
each call is reduced at once to the ``n x n`` Gram ``Z Z^T / N``, so no activation is kept.
Tensor parallel: a column-parallel layer's input is a replicated DTensor (its local tensor is the
whole input); a row-parallel layer's input is split along its features and is all-gathered on
refresh steps (the Gram needs the cross terms ``Z_r Z_s^T``), and ``G K^-1`` of its
column-sharded gradient is computed on the gathered gradient (exact; see docs/distributed.md).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from itertools import chain
from typing import Any

import torch
from torch import nn

from .. import parallel as _par
from ..buckets import DEFAULT_BUCKET_BYTES
from ..muon import MsignOptimizer, Muon, as_matrix, muon_momentum
from ..parallel.comm import nbytes, record
from ..parallel.layout import Replicate

__all__ = ["NewtonMuon", "NewtonMuonHooks", "newton_precondition", "newton_refresh", "input_second_moment"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def input_second_moment(x: torch.Tensor, nblocks: int = 1, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Z Z^T / N`` for inputs ``x`` of shape ``(..., n)`` (``N`` = number of rows of ``x``).

    ``nblocks > 1`` returns the ``(nblocks, n/nblocks, n/nblocks)`` diagonal blocks only.
    """
    n = x.shape[-1]
    z = x.detach().reshape(-1, n).to(dtype or _acc_dtype(x.dtype))
    N = max(z.shape[0], 1)
    if nblocks == 1:
        return z.mT @ z / N
    zb = z.view(z.shape[0], nblocks, n // nblocks).transpose(0, 1)
    return zb.mT @ zb / N


def newton_refresh(
    K: torch.Tensor, gram: torch.Tensor | None, beta: float, gamma: float, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One refresh of Algorithm 1 (arXiv:2604.01472): returns ``(K_new, K_inv, ok)``.

    ``K`` is ``(n, n)`` or ``(b, n, n)`` (block-diagonal); ``gram`` the new ``Z Z^T / N`` (``None``:
    no inputs were seen, ``K`` is kept). ``K_inv = (K_new + (gamma tr(K_new)/n + eps) I)^-1`` per
    block through Cholesky; a block whose factorization fails gets the identity (``ok`` False). Pure.
    """
    K_new = K if gram is None else beta * K + (1 - beta) * gram.to(K.dtype)
    n = K.shape[-1]
    eye = torch.eye(n, dtype=K.dtype, device=K.device)
    lam = gamma * K_new.diagonal(dim1=-2, dim2=-1).sum(-1) / n + eps
    L, info = torch.linalg.cholesky_ex(K_new + lam[..., None, None] * eye)
    inv = torch.cholesky_inverse(L)
    ok = (info == 0) & torch.isfinite(inv).flatten(-2).all(-1)
    return K_new, torch.where(ok[..., None, None], inv, eye), ok


def _precondition(x: torch.Tensor, K_inv: torch.Tensor) -> torch.Tensor:
    """:func:`newton_precondition` of a (conv) weight-shaped tensor, in its shape."""
    return newton_precondition(as_matrix(x), K_inv).reshape(x.shape)


def newton_precondition(G: torch.Tensor, K_inv: torch.Tensor) -> torch.Tensor:
    """``G K^-1`` for ``G`` of shape ``(..., m, n)``; ``K_inv`` ``(n, n)`` or block-diagonal ``(b, n/b, n/b)``.

    Computed in ``K_inv``'s dtype.
    """
    G = G.to(K_inv.dtype)
    if K_inv.ndim == 2:
        return G @ K_inv
    nb, b = K_inv.shape[0], K_inv.shape[-1]
    Gb = G.unflatten(-1, (nb, b)).movedim(-2, -3)  # (..., nb, m, b)
    return (Gb @ K_inv).movedim(-3, -2).flatten(-2)


class NewtonMuonHooks:
    """What :meth:`NewtonMuon.register` returns: ``remove()`` detaches the hooks it attached."""

    def __init__(self, opt: NewtonMuon, entries: list):
        self._opt = weakref.ref(opt)
        self._entries = entries

    def remove(self) -> None:
        opt = self._opt()
        for entry in self._entries:
            entry[1].remove()
            if opt is not None:
                opt._drop_hook(entry)
        self._entries = []

    def __len__(self) -> int:
        return len(self._entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _full_input(w, x: Any) -> torch.Tensor:
    """The layer input as a plain tensor with all ``n`` features: a DTensor input (tensor
    parallel: replicated for a column-parallel layer, feature-sharded ``Shard(-1)`` for a
    row-parallel one) is gathered (``newton.input``, refresh steps only); a plain input must
    already hold every feature."""
    if _par.is_dtensor(x):
        if any(not isinstance(pl, Replicate) for pl in x.placements):
            record("full_tensor", "newton.input", nbytes(x.to_local()))
        return x.full_tensor()
    if x.shape[-1] != as_matrix(w).size(1):
        raise _par.UnsupportedLayout(
            f"NewtonMuon: a layer input with {x.shape[-1]} features for a weight with "
            f"{as_matrix(w).size(1)} inputs (a tensor-parallel shard as a plain tensor?); "
            "use parallelize_module's DTensor inputs"
        )
    return x


def _make_hook(opt: NewtonMuon, weight):
    ref = weakref.ref(opt)  # the module must not keep the optimizer alive

    def hook(module, args):
        o = ref()
        if o is not None and module.training and torch.is_grad_enabled() and args:
            # the weight registered with the optimizer: under FSDP2 `module.weight` is the
            # unsharded tensor during forward, not the sharded parameter the optimizer holds
            o._capture(weight, args[0])

    return hook


class NewtonMuon(MsignOptimizer):
    """Newton-Muon (arXiv:2604.01472, Algorithm 1) with AdamW for ``use_muon=False`` groups.

    Muon's args (``lr`` 0.02, ``momentum`` 0.95, ``nesterov`` True, ``ns_steps`` 5,
    ``weight_decay`` 0, ``adjust_lr_fn``, ``backend``, ``msign_dtype``) plus the preconditioner's:
    ``refresh_interval`` (k = 32: ``K`` and ``K^-1`` are refreshed on the parameter's updates
    ``t`` with ``(t + 1) % k == 0``, i.e. the k-th, 2k-th, ... and inputs are captured only during
    the forward passes that precede those updates), ``precond_beta`` (beta_K = 0.95),
    ``ridge`` (gamma = 0.2, relative to ``tr(K)/n``), ``precond_init`` (1e-3, ``K_0 = 1e-3 I``),
    ``precond_eps`` (1e-8, absolute ridge floor). Defaults: the authors' first GPT-2 script.

    The optimizer must see the inputs of each weight: call :meth:`register` (or build it with
    :meth:`from_model`). Only ``nn.Linear`` modules are hooked. A weight of a ``use_muon=True``
    group that no hooked module feeds (conv, a raw ``F.linear``, ``register`` not called) is
    updated by plain Muon, and a ``UserWarning`` names it at the next step. A packed weight
    (fused QKV: output rows stacked) has one input and so one ``K``, shared by its blocks
    automatically; a weight shared by several modules, or a module called several times in one
    step (looped/recurrent models, gradient accumulation), averages the Grams of all calls.
    ``blocks={"mlp.down": 4}`` keeps only 4 diagonal blocks of that module's ``K`` (as the
    authors do for the MLP down-projection).

    Per-parameter state: ``momentum_buffer``, ``step`` (int), and for hooked weights
    ``precond_K`` and ``precond_inv`` (float32 at least; kept at that precision across
    :meth:`load_state_dict`). Remove the hooks (:meth:`remove_hooks`) before pickling the model
    object itself; ``state_dict`` checkpoints are unaffected.
    """

    supports_experts = False  # expert stacks (3-D) are refused: no per-expert rule here

    matrix_defaults = dict(
        Muon.matrix_defaults, refresh_interval=32, precond_beta=0.95, ridge=0.2, precond_init=1e-3, precond_eps=1e-8
    )

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        adjust_lr_fn: str = "original",
        backend: str = "newton_schulz",
        msign_dtype: torch.dtype | None = None,
        refresh_interval: int = 32,
        precond_beta: float = 0.95,
        ridge: float = 0.2,
        precond_init: float = 1e-3,
        precond_eps: float = 1e-8,
        *,
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
                refresh_interval=refresh_interval,
                precond_beta=precond_beta,
                ridge=ridge,
                precond_init=precond_init,
                precond_eps=precond_eps,
            ),
            nonfinite=nonfinite,
            distributed=distributed,
            bucket_bytes=bucket_bytes,
        )
        self._hooks: list = []  # [module, handle, weight, nblocks]
        self._sources: dict = {}  # weight -> number of diagonal blocks of its K
        self._groups: dict = {}  # weight -> its param group
        self._grams: dict = {}  # weight -> [sum of Z Z^T / N, calls]; refresh steps only, cleared by step()
        self._warned: set = set()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, params=None, *, blocks: dict | None = None, **kwargs) -> NewtonMuon:
        """Build the optimizer and :meth:`register` ``model``.

        ``params=None`` puts the weight of every ``nn.Linear`` in one ``use_muon=True`` group and
        all other trainable parameters in a ``use_muon=False`` (AdamW) group; pass your own groups
        to keep e.g. the LM head or tied embeddings out of the matrix group.
        """
        if params is None:
            lin, seen = [], set()
            for mod in model.modules():
                if isinstance(mod, nn.Linear) and mod.weight.requires_grad and id(mod.weight) not in seen:
                    seen.add(id(mod.weight))
                    lin.append(mod.weight)
            rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
            params = [dict(params=lin, use_muon=True)] + ([dict(params=rest, use_muon=False)] if rest else [])
        opt = cls(params, **kwargs)
        opt.register(model, blocks=blocks)
        return opt

    def register(self, model: nn.Module, *, blocks: dict | None = None, warn: bool = True) -> NewtonMuonHooks:
        """Attach input-capturing forward pre-hooks to the ``nn.Linear`` modules of ``model`` whose
        weight is in a ``use_muon=True`` group; returns a handle whose ``remove()`` detaches them.

        ``blocks`` maps module names (as in ``model.named_modules()``) to a number of diagonal
        blocks for that weight's ``K`` (must divide ``in_features``). With ``warn`` (default) a
        ``UserWarning`` lists the matrix weights left without a hooked module (plain Muon).
        """
        blocks = dict(blocks or {})
        matrix = {id(p): g for g in self.param_groups if g["use_muon"] for p in g["params"]}
        names = dict(model.named_modules())
        unknown = [n for n in blocks if n not in names]
        if unknown:
            raise ValueError(f"blocks names modules that `model` does not have: {unknown}")
        hooked = {id(e[0]) for e in self._hooks}
        plan, planned = [], dict(self._sources)  # validate everything before attaching anything
        for name, mod in names.items():
            if not isinstance(mod, nn.Linear) or id(mod.weight) not in matrix:
                if name in blocks:
                    raise ValueError(f"blocks[{name!r}]: not an nn.Linear whose weight is in a use_muon=True group")
                continue
            if id(mod) in hooked:
                continue
            nb = int(blocks.get(name, 1))
            if nb < 1 or mod.in_features % nb:
                raise ValueError(f"blocks[{name!r}] = {nb} must be >= 1 and divide in_features = {mod.in_features}")
            w = mod.weight
            if _par.is_dtensor(w):
                _par.shard_layout(w, name)  # an unsupported layout is refused here, before any step
            if planned.get(w, nb) != nb:
                raise ValueError(
                    f"{name}: its weight is shared with a module registered with {planned[w]} block(s), not {nb}"
                )
            st = self.state.get(w)
            if st and "precond_K" in st and st["precond_K"].ndim != (2 if nb == 1 else 3):
                raise ValueError(f"{name}: blocks={nb} does not match the loaded preconditioner state")
            planned[w] = nb
            plan.append((mod, w, nb))
        entries = []
        for mod, w, nb in plan:
            self._sources[w] = nb
            self._groups[w] = matrix[id(w)]
            entry = [mod, mod.register_forward_pre_hook(_make_hook(self, w)), w, nb]
            self._hooks.append(entry)
            entries.append(entry)
        if warn:
            self._warn_unhooked()
        return NewtonMuonHooks(self, entries)

    def remove_hooks(self) -> None:
        """Detach every hook this optimizer attached; its weights then get plain Muon (with a warning)."""
        for entry in list(self._hooks):
            entry[1].remove()
            self._drop_hook(entry)
        self._grams.clear()

    def _drop_hook(self, entry) -> None:
        self._hooks = [e for e in self._hooks if e is not entry]
        w = entry[2]
        if not any(e[2] is w for e in self._hooks):
            self._sources.pop(w, None)
            self._groups.pop(w, None)
            self._grams.pop(w, None)
            self._warned.discard(id(w))

    def _warn_unhooked(self) -> None:
        missing = [
            p
            for g in self.param_groups
            if g["use_muon"]
            for p in g["params"]
            if p not in self._sources and id(p) not in self._warned
        ]
        if missing:
            self._warned.update(id(p) for p in missing)
            shapes = ", ".join(str(tuple(p.shape)) for p in missing[:8]) + (" ..." if len(missing) > 8 else "")
            warnings.warn(
                f"NewtonMuon: {len(missing)} matrix parameter(s) [{shapes}] have no hooked nn.Linear "
                "input; they get plain Muon (no K^-1 preconditioner). Call register(model) or "
                "NewtonMuon.from_model(model).",
                UserWarning,
                stacklevel=3,
            )

    # -- hooks ----------------------------------------------------------------------------------
    def _capture(self, w, x) -> None:
        nb, group = self._sources.get(w), self._groups.get(w)
        if nb is None or group is None:
            return
        st = self.state.get(w)
        t = st.get("step", 0) if st else 0
        if (t + 1) % int(group["refresh_interval"]):
            return
        with torch.no_grad():
            gram = input_second_moment(_full_input(w, x), nb, dtype=_acc_dtype(w.dtype))
        acc = self._grams.get(w)
        if acc is None:
            self._grams[w] = [gram, 1]
        else:
            acc[0].add_(gram)
            acc[1] += 1

    # -- step -----------------------------------------------------------------------------------
    def _before_step(self) -> None:
        self._warn_unhooked()
        if self.parallel.active(list(self._sources)):
            # data parallel: each rank saw its own inputs; K must be the full-batch second moment
            due: list[tuple[torch.Tensor, tuple[int, ...]]] = []
            for g in self.param_groups:
                if not g["use_muon"]:
                    continue
                for p in g["params"]:
                    nb = self._sources.get(p)
                    if nb is None or p.grad is None:
                        continue
                    st = self.state.get(p)
                    if ((st.get("step", 0) if st else 0) + 1) % int(g["refresh_interval"]) == 0:
                        n = as_matrix(p).size(1)
                        due.append((p, (n, n) if nb == 1 else (nb, n // nb, n // nb)))
            self.parallel.average_grams(self._grams, due)

    @torch.no_grad()
    def step(self, closure=None):
        try:
            return super().step(closure)
        finally:
            self._grams.clear()  # captured Grams live for one step at most

    def _directions(self, group: dict, params: list) -> list:
        out = []
        for p in params:
            self._state_buffer(p, "momentum_buffer")
            st = self.state[p]
            st.setdefault("step", 0)
            g = p.grad
            nb = self._sources.get(p)
            if nb is not None:
                if "precond_K" not in st:
                    n, acc = as_matrix(p).size(1), _acc_dtype(p.dtype)
                    eye = torch.eye(n // nb, dtype=acc, device=p.device)
                    if nb > 1:
                        eye = eye.expand(nb, -1, -1).clone()
                    st["precond_K"] = eye * group["precond_init"]
                    st["precond_inv"] = eye.clone()
                if (st["step"] + 1) % group["refresh_interval"] == 0:
                    self._refresh(p, st, group)
                # K acts on the input dim: row shards (FSDP2, column-parallel) are preconditioned
                # locally; a split input dim (row-parallel, FSDP x TP boxes) is gathered by map_local
                K_inv = st["precond_inv"]
                g = _par.map_local(g, functools.partial(_precondition, K_inv=K_inv))
            st["step"] += 1
            out.append(as_matrix(muon_momentum(st["momentum_buffer"], g, group["momentum"], group["nesterov"])))
        return out

    def _refresh(self, p, st: dict, group: dict) -> None:
        acc = self._grams.pop(p, None)
        gram = None
        if acc is not None:
            gram = acc[0] / acc[1]
            if not bool(torch.isfinite(gram).all()):
                warnings.warn(
                    "NewtonMuon: non-finite layer inputs; K not updated on this refresh", UserWarning, stacklevel=2
                )
                gram = None
        K, inv, ok = newton_refresh(st["precond_K"], gram, group["precond_beta"], group["ridge"], group["precond_eps"])
        if not bool(ok.all()):
            warnings.warn(
                f"NewtonMuon: Cholesky of K failed for a weight of shape {tuple(p.shape)}; "
                "using K^-1 = I until the next refresh",
                UserWarning,
                stacklevel=2,
            )
        st["precond_K"].copy_(K)
        st["precond_inv"].copy_(inv)

    # -- checkpoints ----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to the parameter's dtype; keep K and K^-1 in float32 for
        # low-precision parameters so a resumed run matches.
        keep = {
            (pid, key): v
            for pid, st in state_dict["state"].items()
            for key, v in st.items()
            if key in ("precond_K", "precond_inv")
        }
        super().load_state_dict(state_dict)
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(ids, params))
        for (pid, key), v in keep.items():
            p = by_id[pid]
            self.state[p][key] = v.to(device=p.device, dtype=_acc_dtype(p.dtype)).clone()
        # torch rebuilt the group dicts: point the hooked weights at the new ones
        for g in self.param_groups:
            for p in g["params"]:
                if p in self._groups:
                    self._groups[p] = g
