"""torchtitan: an ``OptimizersContainer`` that runs CompositionalMuon or Muon over torchtitan's
models, named in the trainer's optimizer config.

    from compositional_muon.integrations.torchtitan import CMOptimizersContainer
    config.optimizer = CMOptimizersContainer.Config(name="CompositionalMuon", lr=0.02, adamw_lr=3e-4)

torchtitan builds it after parallelizing the model (``config.optimizer.build(model_parts=...)``),
so under FSDP2 the parameters are DTensors and the library's shard-aware CM/Muon path runs. The
attention of torchtitan's ``GQAttention`` is found by its names: ``qkv_linear.wq/wk/wv`` (separate,
GQA/MQA allowed) or ``qkv_linear.wqkv`` (fused: rows ``[q_h; k_h; v_h]`` per head when
``n_kv_heads == n_heads``) and ``wo``. A fused ``wqkv`` with GQA stacks several query heads per
key/value group, which is not one strided head layout: it is refused (build the model with
``fuse_qkv=False``). Embeddings, the output head, norms and biases take AdamW.

``state_dict`` / ``load_state_dict`` are FQN-keyed and flat (``torch.distributed.checkpoint``'s
``get_optimizer_state_dict``), so torchtitan's ``CheckpointManager`` / ``dcp.save`` store the
momenta, AdamW moments and the CM head layout, sharded as the parameters are.
:func:`register_optimizer` adds a name for another builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchtitan.components.optimizer import OptimizersContainer

from ..attention import AttentionSpec
from ._common import OptimizerChoice, build_for_model

__all__ = ["CMOptimizersContainer", "titan_attention", "register_optimizer", "BUILDERS"]

Builder = Callable[[nn.Module, "CMOptimizersContainer.Config"], torch.optim.Optimizer]


def titan_attention(model: nn.Module) -> list[AttentionSpec]:
    """One :class:`AttentionSpec` per torchtitan attention module (``qkv_linear`` + ``wo``)."""
    specs = []
    for name, m in model.named_modules():
        qkv, wo = getattr(m, "qkv_linear", None), getattr(m, "wo", None)
        if not isinstance(qkv, nn.Module) or not isinstance(wo, nn.Linear):
            continue
        H, d = int(m.n_heads), int(m.head_dim)
        hkv = int(getattr(m, "n_kv_heads", None) or H)
        if isinstance(getattr(qkv, "wqkv", None), nn.Linear):
            if hkv != H:
                raise ValueError(
                    f"{name}: a fused wqkv with GQA ({H} query / {hkv} kv heads) groups query heads per kv "
                    "head, which CM cannot address as one head layout; build the model with fuse_qkv=False"
                )
            specs.append(AttentionSpec.fused(name, qkv.wqkv, wo, head_dim=d, num_heads=H, interleaved=True))
        else:
            specs.append(
                AttentionSpec.separate(name, qkv.wq, qkv.wk, qkv.wv, wo, head_dim=d, num_heads=H, num_kv_heads=hkv)
            )
    return specs


def _embeddings(model: nn.Module) -> list[torch.Tensor]:
    found = []
    for attr in ("tok_embeddings", "lm_head", "output"):
        w = getattr(getattr(model, attr, None), "weight", None)
        if isinstance(w, torch.Tensor):
            found.append(w)
    return found


def _choice(name: str, config: CMOptimizersContainer.Config) -> OptimizerChoice:
    return OptimizerChoice(
        name=name,
        lr=config.lr,
        muon_lr=config.muon_lr,
        adamw_lr=config.adamw_lr,
        weight_decay=config.weight_decay,
        adamw_weight_decay=config.adamw_weight_decay,
        momentum=config.momentum,
        adamw_betas=(config.adamw_betas[0], config.adamw_betas[1]),
        options=dict(config.cm_options),
    )


def _build_cm(model: nn.Module, config: CMOptimizersContainer.Config) -> torch.optim.Optimizer:
    return build_for_model(
        model, _choice("cm", config), attention=titan_attention(model), adamw_params=_embeddings(model)
    )


def _build_muon(model: nn.Module, config: CMOptimizersContainer.Config) -> torch.optim.Optimizer:
    return build_for_model(model, _choice("muon", config), adamw_params=_embeddings(model))


BUILDERS: dict[str, Builder] = {"CompositionalMuon": _build_cm, "Muon": _build_muon}


def register_optimizer(name: str, builder: Builder) -> None:
    """Make ``CMOptimizersContainer.Config(name=name)`` build ``builder(model_part, config)``."""
    if not callable(builder):
        raise TypeError(f"builder for {name!r} is not callable")
    BUILDERS[name] = builder


class CMOptimizersContainer(OptimizersContainer):
    """One library optimizer per model part (pipeline stage), chosen by ``Config.name``.

    ``lr`` is CM's composed step (Muon's lr for ``name="Muon"``), ``muon_lr`` the lr of the other
    hidden matrices under CM (None: ``lr``), ``adamw_lr`` / ``adamw_betas`` / ``adamw_weight_decay``
    for embeddings, output head, norms and biases, ``cm_options`` CM group options (``lam``,
    ``method``, ``msign_dtype``...). The base class's ``param_groups`` / ``implementation`` are not
    used (a non-empty ``param_groups`` is refused)."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        name: str = "CompositionalMuon"
        lr: float = 0.02
        muon_lr: float | None = None
        adamw_lr: float = 3e-4
        weight_decay: float = 0.0
        adamw_weight_decay: float = 0.0
        momentum: float = 0.95
        adamw_betas: tuple[float, float] = (0.9, 0.95)
        cm_options: dict[str, Any] = field(default_factory=dict)

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        if config.name not in BUILDERS:
            raise ValueError(f"unknown optimizer {config.name!r}; registered: {sorted(BUILDERS)}")
        if config.param_groups:
            raise ValueError("CMOptimizersContainer routes parameters itself; leave param_groups empty")
        self.model_parts = model_parts
        self.optimizers = [BUILDERS[config.name](part, config) for part in model_parts]
        all_params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        self._validate_params(all_params)
        self._post_init(all_params)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(flatten_optimizer_state_dict=True)
        out: dict[str, Any] = {}
        for model, opt in zip(self.model_parts, self.optimizers):
            out.update(get_optimizer_state_dict(model, opt, options=options))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(flatten_optimizer_state_dict=True)
        for model, opt in zip(self.model_parts, self.optimizers):
            set_optimizer_state_dict(model, opt, optim_state_dict=state_dict, options=options)
