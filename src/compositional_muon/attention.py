"""Finding the attention QK and OV factor pairs of a model.

A factor's heads are ``head_dim``-row blocks of a (possibly fused, possibly transposed) parameter:
:class:`HeadSlice` says where, so CM can work on separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``
linears (Llama, Qwen, Mistral, this library's GPT), on fused ``qkv`` linears (nanoGPT ``c_attn``,
timm ViT ``qkv``), on GPT-2's transposed ``Conv1D`` and on head-interleaved fused layouts, all
through views of the parameters (no copies of the weights are kept).

:func:`find_attention` recognizes the common module layouts; :class:`AttentionSpec` is the explicit
API for anything else.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["HeadSlice", "AttentionSpec", "find_attention", "head_view", "route_parameters", "DEFAULT_ADAMW_PATTERNS"]


def head_view(t: torch.Tensor, axis: int, offset: int, stride: int, n: int, d: int) -> torch.Tensor:
    """``(n, d, rest)`` view of ``n`` head blocks of ``d`` slices along ``axis`` of the 2-D ``t``;
    head ``h`` occupies indices ``offset + h*stride ... offset + h*stride + d - 1`` of that axis.
    In nn.Linear layout, heads along axis 0 are row blocks ``W_h`` (``d x in``); along axis 1
    they are column blocks returned transposed, ``W[:, h]^T`` (``d x out``)."""
    x = t.movedim(axis, 0) if axis else t
    s0, s1 = x.stride()
    return x.as_strided((n, d, x.size(1)), (stride * s0, s0, s1), x.storage_offset() + offset * s0)


@dataclass(frozen=True)
class HeadSlice:
    """Where a factor's heads live: blocks of ``head_dim`` indices along ``axis`` of ``param``,
    the first at ``offset``, consecutive heads ``stride`` apart (``None``: ``head_dim``, i.e. packed)."""

    param: torch.Tensor
    axis: int = 0
    offset: int = 0
    stride: int | None = None

    def resolved(self, n: int, d: int, what: str) -> tuple:
        p = self.param
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{what}: expected a parameter tensor, got {type(p).__name__}")
        if p.ndim != 2:
            raise ValueError(f"{what}: CM factors must be 2-D weights, got shape {tuple(p.shape)}")
        if self.axis not in (0, 1):
            raise ValueError(f"{what}: axis must be 0 or 1, got {self.axis}")
        stride = d if self.stride is None else self.stride
        if stride < d:
            raise ValueError(f"{what}: stride {stride} is smaller than head_dim {d}")
        end = self.offset + (n - 1) * stride + d
        if self.offset < 0 or end > p.shape[self.axis]:
            raise ValueError(
                f"{what}: {n} heads of head_dim={d} (offset {self.offset}, stride {stride}) need {end} entries "
                f"along axis {self.axis}, but the weight has shape {tuple(p.shape)}"
            )
        return self.axis, self.offset, stride


def _as_slice(x, axis: int) -> HeadSlice:
    if isinstance(x, HeadSlice):
        return x
    if isinstance(x, nn.Linear):
        return HeadSlice(x.weight, axis)
    if isinstance(x, torch.Tensor):
        return HeadSlice(x, axis)
    raise TypeError(f"expected an nn.Linear, a weight tensor or a HeadSlice, got {type(x).__name__}")


@dataclass
class AttentionSpec:
    """One attention layer's factors for CM. ``q``/``k``/``v``/``o`` are :class:`HeadSlice`s in the
    kernel's convention: ``q``, ``k``, ``v`` blocks are rows of the nn.Linear weight (``d x D``),
    ``o`` blocks are the columns of ``o_proj.weight`` (``D x d``, stored transposed). Leave ``q``/``k``
    or ``v``/``o`` as None to apply CM to one circuit only."""

    name: str
    head_dim: int
    num_heads: int
    num_kv_heads: int
    q: HeadSlice | None = None
    k: HeadSlice | None = None
    v: HeadSlice | None = None
    o: HeadSlice | None = None

    def __post_init__(self):
        for f in ("head_dim", "num_heads", "num_kv_heads"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"attention {self.name!r}: `{f}` must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"attention {self.name!r}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if (self.q is None) != (self.k is None) or (self.v is None) != (self.o is None):
            raise ValueError(f"attention {self.name!r}: give q and k together, and v and o together")
        if self.q is None and self.v is None:
            raise ValueError(f"attention {self.name!r}: no factor given")
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        widths = set()
        for f, n in (("q", H), ("k", Hkv), ("v", Hkv), ("o", H)):
            hs = getattr(self, f)
            if hs is not None:
                hs.resolved(n, d, f"attention {self.name!r} factor {f}")
                widths.add(hs.param.shape[1 - hs.axis])
        if len(widths) > 1:
            raise ValueError(f"attention {self.name!r}: factors disagree on the model width: {sorted(widths)}")

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def separate(cls, name, q_proj, k_proj, v_proj, o_proj, *, head_dim=None, num_heads=None, num_kv_heads=None):
        """From nn.Linear modules or weights in nn.Linear layout (``o_proj`` is ``D x H d``)."""
        wq, wk = _weight(q_proj), _weight(k_proj)
        wv = _weight(v_proj) if v_proj is not None else None
        wo = _weight(o_proj) if o_proj is not None else None
        d, H = _resolve_heads(name, wq.shape[0], head_dim, num_heads)
        if wk.shape[0] % d:
            raise ValueError(
                f"attention {name!r}: k weight has {wk.shape[0]} out-features, not a multiple of head_dim={d}"
            )
        hkv = wk.shape[0] // d
        if num_kv_heads is not None and num_kv_heads != hkv:
            raise ValueError(f"attention {name!r}: num_kv_heads={num_kv_heads} but the k weight has {hkv} heads of {d}")
        if wv is not None and wv.shape != wk.shape:
            raise ValueError(f"attention {name!r}: v weight {tuple(wv.shape)} and k weight {tuple(wk.shape)} differ")
        if wo is not None and wo.shape[1] != wq.shape[0]:
            raise ValueError(
                f"attention {name!r}: o weight has {wo.shape[1]} in-features but q has {wq.shape[0]} out-features"
            )
        return cls(
            name,
            d,
            H,
            hkv,
            HeadSlice(wq, 0),
            HeadSlice(wk, 0),
            HeadSlice(wv, 0) if wv is not None else None,
            HeadSlice(wo, 1) if wo is not None else None,
        )

    @classmethod
    def fused(
        cls, name, qkv, o, *, head_dim=None, num_heads=None, num_kv_heads=None, transposed=False, interleaved=False
    ):
        """From a fused qkv weight (rows ``[q; k; v]`` in nn.Linear layout, ``(H + 2 Hkv) d x D``) and
        the output weight. ``transposed=True`` for GPT-2's Conv1D (weights stored ``in x out``);
        ``interleaved=True`` for per-head ``[q_h; k_h; v_h]`` row blocks (GPT-NeoX; needs Hkv = H)."""
        wqkv, wo = _weight(qkv), _weight(o) if o is not None else None
        ax_in, ax_o = (1, 0) if transposed else (0, 1)
        rows = wqkv.shape[ax_in]
        if head_dim is None and num_heads is None:
            raise ValueError(f"attention {name!r}: a fused qkv weight needs head_dim or num_heads")
        if interleaved:
            if rows % 3:
                raise ValueError(f"attention {name!r}: interleaved qkv has {rows} rows, not a multiple of 3")
            d, H = _resolve_heads(name, rows // 3, head_dim, num_heads)
            hkv = H
            if num_kv_heads not in (None, H):
                raise ValueError(f"attention {name!r}: interleaved qkv needs num_kv_heads == num_heads")
            sl = [HeadSlice(wqkv, ax_in, i * d, 3 * d) for i in range(3)]
        else:
            if num_kv_heads is None:
                if head_dim is not None and num_heads is not None:
                    if (rows - num_heads * head_dim) % (2 * head_dim):
                        raise ValueError(
                            f"attention {name!r}: fused qkv with {rows} rows does not fit "
                            f"num_heads={num_heads} of head_dim={head_dim}"
                        )
                    num_kv_heads = (rows - num_heads * head_dim) // (2 * head_dim)
                else:
                    if rows % 3:
                        raise ValueError(f"attention {name!r}: fused qkv has {rows} rows; pass num_kv_heads for GQA")
                    d, H = _resolve_heads(name, rows // 3, head_dim, num_heads)
                    head_dim, num_heads, num_kv_heads = d, H, H
            d = head_dim if head_dim is not None else None
            if d is None:
                if rows % (num_heads + 2 * num_kv_heads):
                    raise ValueError(
                        f"attention {name!r}: fused qkv with {rows} rows does not fit {num_heads} q "
                        f"and {num_kv_heads} k/v heads"
                    )
                d = rows // (num_heads + 2 * num_kv_heads)
            H = num_heads if num_heads is not None else (rows - 2 * num_kv_heads * d) // d
            hkv = num_kv_heads
            if (H + 2 * hkv) * d != rows:
                raise ValueError(
                    f"attention {name!r}: fused qkv has {rows} rows but {H} q + 2x{hkv} k/v heads "
                    f"of head_dim={d} need {(H + 2 * hkv) * d}"
                )
            sl = [HeadSlice(wqkv, ax_in, 0), HeadSlice(wqkv, ax_in, H * d), HeadSlice(wqkv, ax_in, (H + hkv) * d)]
        return cls(name, d, H, hkv, sl[0], sl[1], sl[2], HeadSlice(wo, ax_o) if wo is not None else None)

    def pairs(self):
        """``[("qk", A, B), ("ov", A, B)]`` as (kind, A slice, B slice) for the present circuits."""
        out = []
        if self.q is not None:
            out.append(("qk", self.q, self.k))
        if self.v is not None:
            out.append(("ov", self.o, self.v))
        return out


def _weight(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    w = getattr(x, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a module with a .weight or a tensor, got {type(x).__name__}")
    return w


def _resolve_heads(name, q_rows, head_dim, num_heads):
    if head_dim is None and num_heads is None:
        raise ValueError(f"attention {name!r}: cannot tell the head size; pass head_dim= or num_heads=")
    if head_dim is None:
        if q_rows % num_heads:
            raise ValueError(f"attention {name!r}: {q_rows} query rows are not divisible by num_heads={num_heads}")
        head_dim = q_rows // num_heads
    if q_rows % head_dim:
        raise ValueError(
            f"attention {name!r}: q weight has {q_rows} out-features, not a multiple of head_dim={head_dim}"
        )
    H = q_rows // head_dim
    if num_heads is not None and num_heads != H:
        raise ValueError(
            f"attention {name!r}: num_heads={num_heads} but {q_rows} query rows / head_dim={head_dim} = {H}"
        )
    return head_dim, H


# ------------------------------------------------------------------------------------------------
# Discovery
# ------------------------------------------------------------------------------------------------

_HEAD_DIM = ("head_dim", "head_size", "attention_head_size")
_NUM_HEADS = ("num_heads", "n_head", "n_heads", "num_attention_heads")
_NUM_KV = ("num_kv_heads", "num_key_value_heads", "n_kv_head", "n_kv_heads")
_O_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "proj", "wo")
_SEPARATE = (("q_proj", "k_proj", "v_proj"), ("wq", "wk", "wv"), ("query", "key", "value"))
_FUSED = (
    ("c_attn", ("c_proj",)),
    ("qkv", ("proj", "o_proj", "out_proj")),
    ("Wqkv", ("out_proj", "Wo")),
    ("qkv_proj", ("o_proj", "out_proj")),
)


def _attr(module, names):
    for src in (module, getattr(module, "config", None)):
        if src is None:
            continue
        for n in names:
            v = getattr(src, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _is_conv1d(m) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _linear_like(m) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def find_attention(model: nn.Module, *, head_dim=None, num_heads=None, num_kv_heads=None) -> list:
    """Every attention layer of ``model`` as an :class:`AttentionSpec`.

    Recognized: a module with ``q_proj``/``k_proj``/``v_proj`` (or ``wq``/``wk``/``wv``,
    ``query``/``key``/``value``) linears and an output linear among ``o_proj``, ``out_proj``,
    ``dense``, ``c_proj``, ``proj``, ``wo`` (without one, CM covers QK only); a fused ``c_attn``
    (nn.Linear or GPT-2 Conv1D) with ``c_proj``; a fused ``qkv`` with ``proj``. Head counts come
    from the module's or its ``config``'s attributes (``head_dim``, ``num_heads``/``n_head``,
    ``num_key_value_heads``/``n_kv_head``...), or from the keyword overrides. A module whose shapes
    do not fit its head counts raises ValueError naming the module.
    """
    specs, seen = [], set()
    given = dict(head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads)
    for name, m in model.named_modules():
        d = head_dim or _attr(m, _HEAD_DIM)
        H = num_heads or _attr(m, _NUM_HEADS)
        hkv = num_kv_heads or _attr(m, _NUM_KV)
        spec = None
        for qn, kn, vn in _SEPARATE:
            q, k, v = (getattr(m, n, None) for n in (qn, kn, vn))
            if all(isinstance(x, nn.Linear) for x in (q, k, v)):
                o = next((getattr(m, n) for n in _O_NAMES if isinstance(getattr(m, n, None), nn.Linear)), None)
                _check_attributes(name, m, given, d is None and H is None, f"{qn}/{kn}/{vn}")
                spec = AttentionSpec.separate(
                    name,
                    q,
                    k,
                    v if o is not None else None,
                    o,
                    head_dim=d,
                    num_heads=num_heads or (None if d else H),  # an explicit count is checked against d
                    num_kv_heads=hkv,
                )
                break
        if spec is None:
            for fn, onames in _FUSED:
                f = getattr(m, fn, None)
                if not _linear_like(f):
                    continue
                o = next((getattr(m, n) for n in onames if _linear_like(getattr(m, n, None))), None)
                _check_attributes(name, m, given, d is None and H is None, f"fused {fn}")
                spec = AttentionSpec.fused(
                    name, f, o, head_dim=d, num_heads=H, num_kv_heads=hkv, transposed=_is_conv1d(f)
                )
                break
        if spec is None:
            continue
        _check_spec(name, spec, given)
        key = tuple(id(s.param) for _, a, b in spec.pairs() for s in (a, b))
        if key in seen:  # a shared block reached twice (looped models)
            continue
        seen.add(key)
        specs.append(spec)
    return specs


_COUNT_ATTRS = (("head_dim", _HEAD_DIM), ("num_heads", _NUM_HEADS), ("num_kv_heads", _NUM_KV))


def _check_attributes(name: str, module: nn.Module, given: dict, no_size: bool, found: str) -> None:
    """The head size must be known, and head counts passed to :func:`find_attention` must agree
    with the module's own attributes."""
    if no_size:
        raise ValueError(
            f"attention {name!r}: found {found} but no head_dim or num_heads attribute; "
            "pass head_dim= or num_heads= (or use AttentionSpec)"
        )
    for key, names in _COUNT_ATTRS:
        own = _attr(module, names)
        if given[key] is not None and own is not None and own != given[key]:
            raise ValueError(f"attention {name!r}: {key}={given[key]} was passed but the module has {key}={own}")


def _check_spec(name: str, spec: AttentionSpec, given: dict) -> None:
    """... and with the spec its weights gave (never silently replaced)."""
    for key, _ in _COUNT_ATTRS:
        if given[key] is not None and getattr(spec, key) != given[key]:
            raise ValueError(
                f"attention {name!r}: {key}={given[key]} was passed but its weights give {key}={getattr(spec, key)} "
                f"(head_dim={spec.head_dim}, num_heads={spec.num_heads}, num_kv_heads={spec.num_kv_heads})"
            )


# ------------------------------------------------------------------------------------------------
# Routing every parameter to CM, Muon or AdamW
# ------------------------------------------------------------------------------------------------

DEFAULT_ADAMW_PATTERNS = (
    "*embed*",
    "*lm_head*",
    "head.*",
    "*.head.*",
    "*classifier*",
    "*score.*",
    "*wte*",
    "*wpe*",
    "*pos_emb*",
    "*cls_token*",
    "*patch_embed*",
    "*output_layer*",
    "*router*",
)


def route_parameters(model: nn.Module, specs, adamw_patterns=DEFAULT_ADAMW_PATTERNS, muon_patterns=()):
    """Split the trainable parameters of ``model`` into ``(cm, muon, adamw)`` lists of ``(name, param)``.

    CM: every parameter a spec references (they must be covered exactly once by the specs' head
    slices). AdamW: parameters with fewer than 2 dims, ``nn.Embedding`` weights (and weights tied to
    them) and names matching ``adamw_patterns`` (fnmatch); ``muon_patterns`` force a match to Muon.
    Muon: the remaining matrices.
    """
    owners: dict = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append((f"{mname}.{pname}" if mname else pname, mod))
    cm_ids = _check_coverage(specs)
    cm, muon, adamw, done = [], [], [], set()
    for name, p in model.named_parameters():
        if id(p) in done or not p.requires_grad:
            continue
        done.add(id(p))
        names = [n for n, _ in owners.get(id(p), [(name, None)])]
        if id(p) in cm_ids:
            cm.append((name, p))
        elif any(fnmatch.fnmatchcase(n, pat) for n in names for pat in muon_patterns) and p.ndim >= 2:
            muon.append((name, p))
        elif (
            p.ndim < 2
            or any(isinstance(mod, nn.Embedding) for _, mod in owners.get(id(p), []))
            or any(fnmatch.fnmatchcase(n, pat) for n in names for pat in adamw_patterns)
        ):
            adamw.append((name, p))
        else:
            muon.append((name, p))
    return cm, muon, adamw


def _check_coverage(specs) -> set:
    """Each CM parameter must be covered exactly once by its specs' head slices."""
    counts: dict = {}
    for spec in specs:
        for f, n in (("q", spec.num_heads), ("k", spec.num_kv_heads), ("v", spec.num_kv_heads), ("o", spec.num_heads)):
            hs = getattr(spec, f)
            if hs is None:
                continue
            p = hs.param
            if id(p) not in counts:
                counts[id(p)] = (p, torch.zeros(p.shape, dtype=torch.int32), [])
            axis, offset, stride = hs.resolved(n, spec.head_dim, f"attention {spec.name!r} factor {f}")
            head_view(counts[id(p)][1], axis, offset, stride, n, spec.head_dim).add_(1)
            counts[id(p)][2].append(f"{spec.name}.{f}")
    for p, c, users in counts.values():
        if (c == 0).any():
            raise ValueError(
                f"parameter of shape {tuple(p.shape)} used by {users} is only partly covered by the "
                "attention heads; CM would leave the rest untouched. Check the head counts"
            )
        if (c > 1).any():
            raise ValueError(f"parameter of shape {tuple(p.shape)} is covered twice by {users}")
    return set(counts)
