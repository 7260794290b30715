"""CompositionalMuon in torchtitan's optimizer slot, on torchtitan's debug Llama 3 (CPU).

    pip install "compositional-muon[torchtitan]"
    python examples/torchtitan_debug.py --steps 10                  # one process
    .venv/bin/torchrun --nproc_per_node 2 examples/torchtitan_debug.py --steps 10   # FSDP2, gloo

In a torchtitan config (config_registry), the same component is one line:

    config.optimizer = CMOptimizersContainer.Config(name="CompositionalMuon", lr=0.02, adamw_lr=3e-4)

Here the debug model is cut to 2 blocks with SDPA attention (FlexAttention's backward needs a GPU),
the optimizer container is built by its Config as torchtitan's Trainer does, and the run ends with a
DCP checkpoint through torchtitan's ModelWrapper."""

import argparse
import dataclasses
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchtitan.components.checkpointer.base import ModelWrapper
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import model_registry

from compositional_muon.integrations.torchtitan import CMOptimizersContainer


def build_model(layers: int) -> nn.Module:
    mc = model_registry("debugmodel", attn_backend="flex").model
    sdpa = ScaledDotProductAttention.Config()
    blocks = [
        dataclasses.replace(lc, attention=dataclasses.replace(lc.attention, inner_attention=sdpa))
        for lc in mc.layers[:layers]
    ]
    torch.manual_seed(0)
    model = dataclasses.replace(mc, layers=blocks).build()
    model.init_weights()
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default="runs/torchtitan_dcp")
    a = p.parse_args()
    model = build_model(a.layers)
    world, rank = 1, 0
    if "RANK" in os.environ:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizers = CMOptimizersContainer.Config(name="CompositionalMuon", lr=0.02, adamw_lr=3e-3).build(
        model_parts=[model]
    )
    g = torch.Generator().manual_seed(0)
    for step in range(1, a.steps + 1):
        x = torch.randint(0, 2048, (4 * world, 65), generator=g)[rank * 4 : (rank + 1) * 4]
        loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizers.step()
        optimizers.zero_grad()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    dcp.save({"model": ModelWrapper(model), "optimizer": optimizers}, checkpoint_id=a.out)
    if rank == 0:
        print(f"DCP checkpoint (model + CompositionalMuon state) in {a.out}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
