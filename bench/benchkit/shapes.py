"""The benchmarked parameter sets: attention stacks (q/k/v/o of ``L`` layers) and one whole model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compositional_muon import AttentionSpec
from compositional_muon.attention import find_attention


@dataclass(frozen=True)
class AttentionShape:
    layers: int
    width: int
    heads: int

    def describe(self) -> str:
        d = self.width // self.heads
        return f"q/k/v/o of {self.layers} layers, D={self.width}, H={self.heads}, d={d}"


SHAPES: dict[str, AttentionShape | dict] = {
    "tiny": AttentionShape(2, 64, 4),
    "small": AttentionShape(4, 256, 4),
    "gpt2": AttentionShape(12, 768, 12),
    "1b": AttentionShape(24, 2048, 16),
    # the looped model of the seed-003 experiments, as a whole model (AdamW on the rest)
    "seed003": dict(vocab_size=50257, n_embd=128, n_head=4, n_layer=1, n_loops=2, tie_embeddings=True, block_size=256),
}


class AttnLayer(nn.Module):
    def __init__(self, width: int, device: str):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(width, width, bias=False, device=device) for _ in range(4)
        )


class AttentionStack(nn.Module):
    """The q/k/v/o weights of ``layers`` layers (no forward: only the optimizer step is timed)."""

    def __init__(self, shape: AttentionShape, device: str = "cpu"):
        super().__init__()
        self.layers = nn.ModuleList(AttnLayer(shape.width, device) for _ in range(shape.layers))
        self.head_dim = shape.width // shape.heads

    def specs(self) -> list:
        return [
            AttentionSpec.separate(f"layers.{i}", m.q_proj, m.k_proj, m.v_proj, m.o_proj, head_dim=self.head_dim)
            for i, m in enumerate(self.layers)
        ]


@dataclass
class Bench:
    """A parameter set to step: the module, its attention specs, whether it is a whole model."""

    name: str
    model: nn.Module
    specs: list
    whole_model: bool
    description: str


def build(shape: str, device: str = "cpu", seed: int = 0) -> Bench:
    """The module of a shape with weights ~ N(0, 0.02) on ``device``."""
    cfg = SHAPES[shape]
    torch.manual_seed(seed)
    if isinstance(cfg, AttentionShape):
        m = AttentionStack(cfg, device)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(std=0.02)
        return Bench(shape, m, m.specs(), False, cfg.describe())
    from compositional_muon.training.models import build_model

    m = build_model("loopformer", **cfg).to(device)
    n = sum(p.numel() for p in m.parameters())
    desc = (
        f"LoopFormer {cfg['n_layer']} layer x {cfg['n_loops']} loops, D={cfg['n_embd']}, H={cfg['n_head']}, "
        f"vocab {cfg['vocab_size']}, tied embeddings, {n / 1e6:.2f}M params"
    )
    return Bench(shape, m, find_attention(m), True, desc)
