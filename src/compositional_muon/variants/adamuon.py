"""AdaMuon: an element-wise second moment on Muon's orthogonalized (sign-stabilized) update.

Si, Zhang, Shen, "AdaMuon: Adaptive Muon Optimizer", arXiv:2507.11005 (Algorithm 1). For a weight
``W`` of shape ``m x n`` (``nn.Linear`` layout; conv weights flattened to ``out x (in*kh*kw)``)::

    M_t  = beta M_{t-1} + G_t                     heavy-ball momentum (sum form)
    O_t  = msign(Sign(M_t))                       sign-stabilized orthogonal direction
    V_t  = beta V_{t-1} + (1 - beta) O_t * O_t    element-wise, same beta, no bias correction
    O^_t = O_t / (sqrt(V_t) + eps)
    g_t  = 0.2 sqrt(m n) / ||O^_t||_F             RMS-aligned rescaling (update RMS 0.2, as AdamW)
    W_t  = W_{t-1} - lr (g_t O^_t + wd W_{t-1})

The defaults follow the paper and the authors' current release: the sign step, one shared
``beta`` for ``M`` and ``V``, no bias correction, Nesterov momentum (``nesterov=True``, as in their
GPT-2 code). The superseded first release orthogonalized the momentum without the sign and kept a
separate ``beta2 = 0.999`` with bias correction: ``sign_stabilize=False, beta2=0.999`` reproduces
it (the bias correction is a scalar that the RMS rescale cancels up to ``eps``).
"""

from __future__ import annotations

import math

import torch

from ..buckets import DEFAULT_BUCKET_BYTES
from ..muon import MsignOptimizer, as_matrix, stacked_directions
from ..ops import decoupled_add
from ..parallel import is_dtensor

__all__ = ["AdaMuon", "adamuon_normalize", "heavy_ball_momentum"]


def heavy_ball_momentum(buf: torch.Tensor, grad: torch.Tensor, beta: float, nesterov: bool) -> torch.Tensor:
    """``buf <- beta buf + grad`` in place; return ``grad + beta buf`` (Nesterov) or a copy of ``buf``."""
    g = grad.to(buf.dtype)
    buf.mul_(beta).add_(g)
    return g.add(buf, alpha=beta) if nesterov else buf.clone()


def adamuon_normalize(
    O: torch.Tensor, V: torch.Tensor, beta: float, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise adaptive rescaling of an orthogonalized update (arXiv:2507.11005, Algorithm 1).

    ``O``, ``V``: ``(..., m, n)``. Returns ``(U, new_V)`` with ``new_V = beta V + (1 - beta) O*O``,
    ``U = 0.2 sqrt(m n) O^ / ||O^||_F`` and ``O^ = O / (sqrt(new_V) + eps)``; the caller applies
    ``W <- W - lr (U + wd W)``. Pure; an all-zero ``O`` gives ``U = 0``. Works in float32 at least.
    """
    wd = torch.promote_types(O.dtype, torch.float32)
    O = O.to(wd)
    m, n = O.shape[-2], O.shape[-1]
    new_V = beta * V.to(wd) + (1 - beta) * O * O
    O_hat = O / (new_V.sqrt() + eps)
    norm = torch.linalg.matrix_norm(O_hat, keepdim=True)
    gamma = torch.where(norm > 0, 0.2 * math.sqrt(m * n) / norm, torch.zeros_like(norm))
    return O_hat * gamma, new_V


class AdaMuon(MsignOptimizer):
    """AdaMuon (arXiv:2507.11005, Algorithm 1) with AdamW for ``use_muon=False`` groups.

    Args: ``lr`` (0.02), ``momentum`` (beta, 0.95), ``beta2`` (None: the single shared beta of the
    paper and the current release; 0.999: the first release), ``eps`` (1e-8), ``weight_decay``
    (0.01, decoupled), ``nesterov`` (True, as in the authors' code), ``sign_stabilize`` (True:
    ``msign(Sign(M))``, the paper and the current release; False: ``msign(M)``, the first release),
    ``ns_steps`` (5), ``backend`` ("newton_schulz"), ``msign_dtype`` (None: the device default),
    ``nonfinite`` ("raise"/"skip").

    The update RMS is ``0.2 * lr`` whatever the shape (AdamW-matched): the authors' GPT-2 runs pass
    AdamW's learning rate (6e-4); 0.02 is their class default. Per-parameter state:
    ``momentum_buffer`` and ``second_moment`` (both like ``p``).
    """

    supports_experts = False  # expert stacks (3-D) are refused: no per-expert rule here

    matrix_defaults = dict(
        lr=0.02,
        momentum=0.95,
        beta2=None,
        eps=1e-8,
        nesterov=True,
        sign_stabilize=True,
        weight_decay=0.01,
        ns_steps=5,
        backend="newton_schulz",
        msign_dtype=None,
    )

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        beta2: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        nesterov: bool = True,
        sign_stabilize: bool = True,
        ns_steps: int = 5,
        backend: str = "newton_schulz",
        msign_dtype: torch.dtype | None = None,
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
                beta2=beta2,
                eps=eps,
                nesterov=nesterov,
                sign_stabilize=sign_stabilize,
                weight_decay=weight_decay,
                ns_steps=ns_steps,
                backend=backend,
                msign_dtype=msign_dtype,
            ),
            nonfinite=nonfinite,
            distributed=distributed,
            bucket_bytes=bucket_bytes,
        )

    def _directions(self, group: dict, params: list) -> list:
        """Heavy-ball momentum, then ``Sign`` of the direction; same-shape directions are written
        straight into one stacked buffer (:func:`~compositional_muon.muon.stacked_directions`), so
        the batched msign needs no stacking copy."""
        beta, nesterov, sign = group["momentum"], group["nesterov"], group["sign_stabilize"]
        if any(is_dtensor(p) for p in params):  # sharded (FSDP2): one direction per param
            out = []
            for p in params:
                u = as_matrix(heavy_ball_momentum(self._state_buffer(p, "momentum_buffer"), p.grad, beta, nesterov))
                out.append(u.sign() if sign else u)
            return out
        bufs = []
        for p in params:
            buf = self._state_buffer(p, "momentum_buffer")
            buf.mul_(beta).add_(p.grad.to(buf.dtype))
            bufs.append(as_matrix(buf))

        def fill(i: int, out: torch.Tensor) -> None:
            if nesterov:  # g + beta m_new
                torch.add(as_matrix(params[i].grad).to(out.dtype), bufs[i], alpha=beta, out=out)
            else:
                out.copy_(bufs[i])
            if sign:
                out.sign_()

        return stacked_directions(bufs, fill)

    def _matrix_step(self, group: dict, params: list) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        beta2 = group["momentum"] if group["beta2"] is None else group["beta2"]
        zs = self._orthogonalize(group, self._directions(group, params))
        ps, Os, Vs = [], [], []  # float32/64 weights: the normalization in place, over the group at once
        for p, z in zip(params, zs):
            st = self.state[p]
            if "second_moment" not in st:
                st["second_moment"] = torch.zeros_like(z, dtype=p.dtype)
            V = st["second_moment"]
            if is_dtensor(p) or V.dtype not in (torch.float32, torch.float64) or z.dtype != V.dtype:
                u, new_V = adamuon_normalize(z, V, beta2, group["eps"])
                V.copy_(new_V)
                decoupled_add(p, u.reshape(p.shape), lr * wd, alpha=-lr)
            else:
                ps.append(p)
                Os.append(z)
                Vs.append(V)
        if ps:
            _normalize_and_apply(ps, Os, Vs, beta2, group["eps"], lr, wd)


def _normalize_and_apply(
    ps: list[torch.Tensor],
    Os: list[torch.Tensor],
    Vs: list[torch.Tensor],
    beta: float,
    eps: float,
    lr: float,
    wd: float,
) -> None:
    """:func:`adamuon_normalize` and the weight update for a list of float32/64 weights, in place
    with foreach ops (the same math; ``Os``, this step's msign outputs, are overwritten):
    ``V <- beta V + (1 - beta) O*O``, ``O <- O / (sqrt(V) + eps)``, ``p <- (1 - lr wd) p - lr gamma O``
    with ``gamma = 0.2 sqrt(m n) / ||O||_F`` (0 for a zero ``O``)."""
    torch._foreach_mul_(Vs, beta)
    torch._foreach_addcmul_(Vs, Os, Os, value=1 - beta)
    den = torch._foreach_sqrt(Vs)
    torch._foreach_add_(den, eps)
    torch._foreach_div_(Os, den)
    del den
    norms = torch.stack(torch._foreach_norm(Os)).to(Os[0].dtype)
    scale = torch.tensor(
        [0.2 * math.sqrt(o.shape[-2] * o.shape[-1]) for o in Os], dtype=norms.dtype, device=norms.device
    )
    gamma = torch.where(norms > 0, scale / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))
    torch._foreach_mul_(Os, list((gamma * -lr).unbind(0)))
    if wd:
        torch._foreach_mul_(ps, 1 - lr * wd)
    torch._foreach_add_(ps, [o.reshape(p.shape) for p, o in zip(ps, Os)])
