"""Per-head QK-clip (Kimi K2's MuonClip): keep every head's largest attention logit at most ``tau``.

After the optimizer step, for each attention layer and query head ``h`` whose largest logit in the
last forward, ``S_h = max_{b, t, s<=t} scale * q_{h,t} . k_{g(h),s}`` (after RoPE, biases included,
``scale`` the softmax scale), exceeds ``tau``, the head's slices are shrunk with ``gamma_h = tau / S_h``.
The logit is bilinear in ``(W_q,h, b_q,h)`` and ``(W_k,g, b_k,g)`` (RoPE is linear), so scaling
the two by ``a`` and ``c`` scales every logit of the head by ``a c``:

* MHA (one query head per key head, both policies): ``a = c = sqrt(gamma_h)``, the paper's split;
  the recomputed max is exactly ``tau``.
* GQA/MQA, ``gqa="query"`` (default): the shared key head is left alone and ``a = gamma_h``, so a
  head over ``tau`` never changes the logits of its group's other heads.
* GQA/MQA, ``gqa="group"``: the key head takes ``c = sqrt(gamma_g)``, ``gamma_g = min_{h in g}
  gamma_h``, and every query head of the group ``a_h = min(1, gamma_h / sqrt(gamma_g))``: the worst
  head lands on ``tau`` with the paper's split, the others at most ``tau``; heads never grow.

Heads with ``S_h <= tau`` (and whole groups under "group") are not touched, bit for bit. The max
logits come from the model: this library's attention modules record them when
``record_max_logits`` is set (:meth:`QKClip.from_model` sets it); for transformers models use
:func:`hf_recording_attention` (an eager attention function that records them) or pass them to
:meth:`QKClip.clip`. QK-norm models are out of scope (scaling the weights does not move a
normalized logit), as are DTensor (FSDP2) weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import AttentionSpec, find_attention, head_view
from .parallel.layout import is_dtensor

__all__ = ["QKClip", "QKHeads", "GQA_POLICIES", "max_logits", "hf_recording_attention", "install_hf_logit_recorder"]

GQA_POLICIES = ("query", "group")


@dataclass
class QKHeads:
    """One layer: its :class:`AttentionSpec`, the modules owning the q / k weights (for their
    biases) and the module whose ``max_logits`` attribute holds the last per-head maxima."""

    spec: AttentionSpec
    q_owner: nn.Module | None
    k_owner: nn.Module | None
    module: nn.Module | None

    @property
    def name(self) -> str:
        return self.spec.name

    def views(self) -> tuple:
        """``(q (H, d, D), k (Hkv, d, D), q bias (H, d) or None, k bias or None)``, views of the
        current parameters (taken at each clip, so ``model.to(...)`` is followed)."""
        sp = self.spec
        assert sp.q is not None and sp.k is not None  # from_model keeps layers with a QK pair only
        H, hkv, d = sp.num_heads, sp.num_kv_heads, sp.head_dim
        qa, qo, qs = sp.q.resolved(H, d, sp.name)
        ka, ko, ks = sp.k.resolved(hkv, d, sp.name)
        q = head_view(sp.q.param.data, qa, qo, qs, H, d)
        k = head_view(sp.k.param.data, ka, ko, ks, hkv, d)
        return q, k, _bias_view(self.q_owner, sp.q, H, d), _bias_view(self.k_owner, sp.k, hkv, d)


def max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head largest logit ``scale * q . k`` over batch and (query, key) positions allowed by
    ``mask`` (bool, True = may attend, broadcastable to ``(B, H, T, S)``; None: causal). ``q``:
    ``(B, H, T, d)``, ``k``: ``(B, H, S, d)`` (key heads already repeated). Returns ``(H,)`` in
    float32 at least."""
    with torch.no_grad():
        work = torch.promote_types(q.dtype, torch.float32)
        s = (q.to(work) @ k.to(work).mT) * scale
        if mask is None:
            T, S = s.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=s.device).tril(S - T)
        elif mask.dtype != torch.bool:
            mask = mask > -math.inf  # an additive mask: -inf marks the blocked positions
        s = s.masked_fill(~mask, -math.inf)
        return s.amax(dim=(0, 2, 3))


def _bias_view(module: nn.Module | None, hs, n: int, d: int) -> torch.Tensor | None:
    b = getattr(module, "bias", None) if module is not None else None
    if not isinstance(b, torch.Tensor):
        return None
    b = b.data
    _, offset, stride = hs.resolved(n, d, "qk-clip")
    return b.as_strided((n, d), (stride * b.stride(0), b.stride(0)), b.storage_offset() + offset * b.stride(0))


class QKClip:
    """Rescale the query/key heads whose last max logit exceeded ``tau`` (see the module doc).

    ``clip(max_logits=None)`` after ``optimizer.step()``; ``max_logits`` maps a layer name to its
    ``(H,)`` maxima (default: the ``max_logits`` attribute of each layer's module). Returns the
    number of heads scaled. ``last_max``: the largest logit seen at the last :meth:`clip`.
    """

    def __init__(self, layers: list, tau: float, gqa: str = "query"):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf:
            raise ValueError(f"QK-clip tau must be a finite number > 0, got {tau!r}")
        if gqa not in GQA_POLICIES:
            raise ValueError(f"unknown gqa policy {gqa!r}; expected one of {GQA_POLICIES}")
        self.layers, self.tau, self.gqa = list(layers), float(tau), gqa
        self.last_max = float("nan")

    @classmethod
    def from_model(cls, model: nn.Module, tau: float, gqa: str = "query", attention=None, **heads) -> QKClip:
        """Every attention layer's q/k heads (:func:`find_attention` with ``heads`` overrides, or the
        given :class:`AttentionSpec` list); switches on ``record_max_logits`` where a module has it."""
        specs = list(attention) if attention is not None else find_attention(model, **heads)
        owners: dict[int, nn.Module] = {}
        for _, m in model.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor):
                owners.setdefault(id(w), m)
        layers = []
        for spec in specs:
            if not isinstance(spec, AttentionSpec) or spec.q is None or spec.k is None:
                continue
            if any(is_dtensor(s.param) for s in (spec.q, spec.k)):
                raise ValueError("QK-clip does not support DTensor (FSDP2) weights")
            module = _get(model, spec.name)
            if module is not None and hasattr(module, "record_max_logits"):
                recorder: Any = module
                recorder.record_max_logits = True
            layers.append(QKHeads(spec, owners.get(id(spec.q.param)), owners.get(id(spec.k.param)), module))
        if not layers:
            raise ValueError("no attention layer with query/key weights found for QK-clip")
        return cls(layers, tau, gqa)

    @torch.no_grad()
    def clip(self, max_logits: dict | None = None) -> int:
        scaled, seen = 0, -math.inf
        for layer in self.layers:
            s = (max_logits or {}).get(layer.name)
            if s is None:
                s = getattr(layer.module, "max_logits", None)
            if s is None:
                raise ValueError(
                    f"no max logits for layer {layer.name!r}: enable recording (record_max_logits / "
                    "hf_recording_attention) and run a forward first, or pass max_logits={name: (H,) tensor}"
                )
            s = torch.as_tensor(s, dtype=torch.float64).detach().cpu().reshape(-1)
            q, k, qb, kb = layer.views()
            if s.numel() != q.size(0):
                raise ValueError(f"layer {layer.name!r}: {s.numel()} max logits for {q.size(0)} heads")
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"layer {layer.name!r}: the max logits hold NaN/inf; nothing was scaled")
            seen = max(seen, float(s.max()))
            a, c = self._factors(s, k.size(0))
            scaled += int((a < 1).sum())
            for x, xb, f in ((q, qb, a), (k, kb, c)):
                for h in (f < 1).nonzero().flatten().tolist():
                    x[h].mul_(f[h].item())
                    if xb is not None:
                        xb[h].mul_(f[h].item())
        self.last_max = seen
        return scaled

    def _factors(self, s: torch.Tensor, hkv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Query factors ``a`` (H,) and key factors ``c`` (Hkv,), all <= 1 (1: untouched)."""
        gamma = torch.where(s > self.tau, self.tau / s, torch.ones_like(s))
        G = s.numel() // hkv
        if G == 1 or self.gqa == "group":
            gg = gamma.view(hkv, G).amin(1)
            c = gg.sqrt()
            a = torch.minimum(torch.ones_like(gamma), gamma / c.repeat_interleave(G))
            return torch.where(gamma < 1, a, torch.ones_like(a)), c
        return gamma, torch.ones(hkv, dtype=gamma.dtype)


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def hf_recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers-style eager attention that also stores ``module.max_logits`` (``(H,)``).

    Same signature and result as transformers' ``eager_attention_forward``: ``query`` ``(B, H, T, d)``,
    ``key``/``value`` ``(B, Hkv, S, d)``, an additive ``attention_mask`` (or None: causal)."""
    H, hkv = query.size(1), key.size(1)
    if hkv != H:
        key, value = key.repeat_interleave(H // hkv, 1), value.repeat_interleave(H // hkv, 1)
    scale = query.size(-1) ** -0.5 if scaling is None else scaling
    mask = None if attention_mask is None else attention_mask[..., : key.size(-2)]
    module.max_logits = max_logits(query, key, scale, mask)
    w = (query @ key.mT) * scale
    if mask is not None:
        w = w + mask
    else:
        w = w.masked_fill(~torch.ones(w.shape[-2:], dtype=torch.bool, device=w.device).tril(), -math.inf)
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = nn.functional.dropout(w, p=dropout, training=module.training)
    return (w @ value).transpose(1, 2).contiguous(), w


def install_hf_logit_recorder(model: nn.Module, name: str = "cm_record_logits") -> None:
    """Register :func:`hf_recording_attention` with transformers' ``AttentionInterface`` and switch
    ``model`` to it (needs transformers >= 4.48 and an eager-capable model)."""
    from transformers import AttentionInterface  # lazy: the library does not depend on transformers

    AttentionInterface.register(name, hf_recording_attention)
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
    else:
        config: Any = getattr(model, "config", None)
        config._attn_implementation = name
