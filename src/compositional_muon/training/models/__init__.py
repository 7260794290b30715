"""Small byte-level language models for optimizer experiments: :class:`GPT`, :class:`LoopFormer`,
:class:`MoR` (Mixture-of-Recursions) and :class:`MoEGPT` (top-k mixture of experts). All share one attention implementation with
``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears and ``head_dim``/``num_heads``/``num_kv_heads``
attributes, so :func:`compositional_muon.find_attention` discovers every attention layer.
"""

from __future__ import annotations

from .gpt import GPT, GPTConfig
from .layers import MLP, BaseConfig, Block, CausalSelfAttention, LanguageModel
from .loopformer import LoopFormer, LoopFormerConfig
from .moe import MoEGPT, MoEGPTConfig
from .mor import MoR, MoRConfig

__all__ = [
    "GPT",
    "GPTConfig",
    "LoopFormer",
    "LoopFormerConfig",
    "MoR",
    "MoRConfig",
    "MoEGPT",
    "MoEGPTConfig",
    "MODELS",
    "build_model",
    "BaseConfig",
    "Block",
    "CausalSelfAttention",
    "LanguageModel",
    "MLP",
]

# name -> (model class, config class); the configs' defaults are the small defaults
MODELS = {
    "gpt": (GPT, GPTConfig),
    "loopformer": (LoopFormer, LoopFormerConfig),
    "mor": (MoR, MoRConfig),
    "moe-gpt": (MoEGPT, MoEGPTConfig),
}


def build_model(name: str, **overrides) -> LanguageModel:
    """``build_model("gpt", n_layer=2)``: the named model with its config's defaults and ``overrides``
    (config field names). Unknown names or fields raise ValueError."""
    if not isinstance(name, str) or name.lower() not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    model_cls, cfg_cls = MODELS[name.lower()]
    valid = set(cfg_cls.__dataclass_fields__)
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"unknown {cfg_cls.__name__} field(s) {bad}; valid fields: {', '.join(sorted(valid))}")
    return model_cls(cfg_cls(**overrides))
