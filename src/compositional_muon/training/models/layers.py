"""Pieces shared by the GPT, LoopFormer and MoR models: the config base, RMSNorm, RoPE,
causal self-attention with GQA, the MLP, a pre-norm block and the language-model base class.

Conventions: weights are ``nn.Linear`` (``out x in``) without biases; RMSNorm is parameter-free
(``F.rms_norm`` without a weight), so every trainable parameter of a block is a matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ...qk_clip import max_logits

__all__ = ["BaseConfig", "rms_norm", "apply_rope", "CausalSelfAttention", "MLP", "Block", "LanguageModel"]

MLP_ACTIVATIONS = ("relu2", "gelu")


def _check_int(cfg, name, minimum=1):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{type(cfg).__name__}.{name} must be an int >= {minimum}, got {v!r}")


def _check_bool(cfg, name):
    v = getattr(cfg, name)
    if not isinstance(v, bool):
        raise ValueError(f"{type(cfg).__name__}.{name} must be a bool, got {v!r}")


def _check_float(cfg, name, lo=0.0, lo_open=True):
    v = getattr(cfg, name)
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or v < lo
        or (lo_open and v == lo)
    ):
        rel = ">" if lo_open else ">="
        raise ValueError(f"{type(cfg).__name__}.{name} must be a finite number {rel} {lo}, got {v!r}")


@dataclass
class BaseConfig:
    """Fields every model shares. ``n_kv_head=None`` means ``n_head`` (plain multi-head attention);
    ``block_size`` is the longest context (size of the learned position table when ``rope=False``)."""

    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int | None = None
    mlp_ratio: float = 4.0
    mlp_act: str = "relu2"
    rope: bool = True
    rope_base: float = 10000.0
    zero_init_o: bool = False
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for f in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "n_kv_head"):
            _check_int(self, f)
        for f in ("rope", "zero_init_o", "tie_embeddings"):
            _check_bool(self, f)
        _check_float(self, "mlp_ratio")
        _check_float(self, "rope_base")
        name = type(self).__name__
        if self.n_embd % self.n_head:
            raise ValueError(f"{name}.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"{name}.n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"{name}.n_embd / n_head = head_dim {self.head_dim} must be even for rope=True")
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise ValueError(f"{name}.mlp_act must be one of {MLP_ACTIVATIONS}, got {self.mlp_act!r}")
        if self.hidden_dim < 1:
            raise ValueError(f"{name}.mlp_ratio={self.mlp_ratio} gives an empty MLP")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        return int(self.mlp_ratio * self.n_embd)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate ``x`` (``B, H, T, d``) by the angles of positions ``pos`` (``T`` or ``B, T``): the
    half-split RoPE convention (pairs ``(i, i + d/2)``), frequencies ``base^(-2i/d)``."""
    d = x.size(-1)
    inv_freq = base ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float32) / (d // 2))
    ang = pos.to(torch.float32)[..., None] * inv_freq  # (T, d/2) or (B, T, d/2)
    if ang.ndim == 3:
        ang = ang[:, None]  # broadcast over heads
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with grouped K/V heads (GQA/MQA when ``n_kv_head < n_head``).

    ``q_proj``: ``n_head*head_dim x n_embd``; ``k_proj``, ``v_proj``: ``n_kv_head*head_dim x n_embd``;
    ``o_proj``: ``n_embd x n_head*head_dim``. Query head ``h`` reads K/V head ``h // (n_head/n_kv_head)``.
    With ``record_max_logits`` set (QK-clip), each forward stores the per-head largest attention
    logit in ``max_logits`` (``(n_head,)``, see :func:`compositional_muon.qk_clip.max_logits`).
    """

    record_max_logits: bool = False
    max_logits: torch.Tensor | None = None

    def __init__(self, cfg: BaseConfig):
        super().__init__()
        self.head_dim, self.num_heads, self.num_kv_heads = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        self.rope, self.rope_base = cfg.rope, cfg.rope_base
        D, d = cfg.n_embd, cfg.head_dim
        self.q_proj = nn.Linear(D, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, D, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None):
        """``pos``: token positions for RoPE (default ``0..T-1``). ``attn_mask``: optional boolean
        ``(B, 1, T, T)`` mask (True = may attend) used instead of the plain causal mask."""
        B, T, _ = x.shape
        # -1: this rank's heads under tensor parallelism (all of them otherwise)
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.rope:
            if pos is None:
                pos = torch.arange(T, device=x.device)
            q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.record_max_logits:
            self.max_logits = max_logits(q, k, self.head_dim**-0.5, attn_mask)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """``down_proj(act(up_proj(x)))`` with hidden size ``mlp_ratio * n_embd``; ``act`` is ReLU^2
    (``"relu2"``, as in modded-nanogpt) or exact GELU (``"gelu"``)."""

    def __init__(self, cfg: BaseConfig):
        super().__init__()
        self.act = cfg.mlp_act
        self.up_proj = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.n_embd, bias=False)

    def forward(self, x):
        h = self.up_proj(x)
        h = F.relu(h).square() if self.act == "relu2" else F.gelu(h)
        return self.down_proj(h)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: BaseConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, pos=None, attn_mask=None):
        x = x + self.attn(rms_norm(x), pos, attn_mask)
        return x + self.mlp(rms_norm(x))


class LanguageModel(nn.Module):
    """Base class: token embedding ``embed``, optional learned positions ``pos_embed`` (``rope=False``),
    output head ``lm_head``; weight init, loss, ``generate`` and ``num_params``. Subclasses build
    their blocks, call :meth:`_init_weights` and implement ``forward(idx, targets=None)``."""

    def __init__(self, cfg: BaseConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_embed = None if cfg.rope else nn.Embedding(cfg.block_size, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.last_losses: dict = {}

    # -- init -------------------------------------------------------------------------------------
    def _init_weights(self, depth: int):
        """Normal(0, 0.02) for every Linear and Embedding; residual output projections (``o_proj``,
        ``down_proj``) get 0.02/sqrt(2*depth), or zeros with ``zero_init_o``. ``depth`` is the number
        of block applications on the longest path. Ties ``lm_head`` to ``embed`` when asked."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, CausalSelfAttention):
                outs = [m.o_proj]
            elif isinstance(m, MLP):
                outs = [m.down_proj]
            else:
                continue
            for lin in outs:
                if self.config.zero_init_o:
                    nn.init.zeros_(lin.weight)
                else:
                    nn.init.normal_(lin.weight, mean=0.0, std=0.02 / math.sqrt(2 * depth))
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # -- helpers ----------------------------------------------------------------------------------
    def _embed(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Validate the inputs; return ``(x, pos)``."""
        if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"idx must be a (batch, time) int64/int32 tensor, got "
                f"{type(idx).__name__ if not isinstance(idx, torch.Tensor) else (idx.dtype, tuple(idx.shape))}"
            )
        T = idx.size(1)
        if T < 1 or T > self.config.block_size:
            raise ValueError(f"sequence length {T} must be in [1, block_size={self.config.block_size}]")
        if targets is not None and (not isinstance(targets, torch.Tensor) or targets.shape != idx.shape):
            raise ValueError(f"targets must be a tensor of the same shape as idx {tuple(idx.shape)}")
        pos = torch.arange(T, device=idx.device)
        x = self.embed(idx)
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos)
        return x, pos

    def _logits_loss(self, h: torch.Tensor, targets: torch.Tensor | None):
        logits = self.lm_head(h)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long())

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied head counts once); optionally without the token and
        position embeddings."""
        skip = set()
        if exclude_embeddings:
            skip = {id(self.embed.weight)} | ({id(self.pos_embed.weight)} if self.pos_embed is not None else set())
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (``B, T``), feeding at most the last
        ``block_size`` tokens back each step (no KV cache). ``temperature=0`` is greedy. Runs in eval
        mode and restores the previous mode."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.size(1) < 1:
            raise ValueError("idx must be a non-empty (batch, time) tensor of token ids")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -self.config.block_size :])
                logits = logits[:, -1, :].float()
                if temperature == 0:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
                idx = torch.cat((idx, nxt.to(idx.dtype)), dim=1)
        finally:
            self.train(was_training)
        return idx
