"""The training CLI's process layout: one process, or DDP / FSDP2 (optionally with tensor
parallelism, ``--tp``, or HSDP, ``--hsdp``) under torchrun (see docs/distributed.md). Everything
rank-dependent in the CLI goes through :class:`Runner`."""

from __future__ import annotations

import os

import torch

from .errors import UsageError

__all__ = ["Runner"]


class Runner:
    """Single process (``mode="none"``), or DDP / FSDP2 with one process per rank; ``tp`` ranks
    of a tensor-parallel group read the same rows of a batch (``hsdp``: ranks per shard group)."""

    def __init__(self, mode: str, device: torch.device, batch_size: int, tp: int = 1, hsdp: int = 0):
        self.mode, self.rank, self.world, self.device = mode, 0, 1, device
        self.tp, self.hsdp = tp, hsdp
        if mode == "none":
            if tp != 1 or hsdp:
                raise UsageError("--tp and --hsdp need --dist fsdp2 under torchrun")
            return
        if mode != "fsdp2" and (tp != 1 or hsdp):
            raise UsageError("--tp and --hsdp need --dist fsdp2")
        from . import dist as D

        self.D = D
        info = D.setup_distributed("gloo" if device.type == "cpu" else None)
        self.rank, self.world, self.device = info.rank, info.world_size, info.device
        # torchrun with one process and --dist ddp: a DDP run continued (or started) on one rank,
        # with no process group and its DCP checkpoints, so it resumes at any number of processes
        one_rank_ddp = mode == "ddp" and os.environ.get("WORLD_SIZE") == "1"
        if self.world < 2 and not one_rank_ddp:
            self.cleanup()
            raise UsageError(
                f"--dist {mode} needs at least 2 processes (torchrun --nproc_per_node=N, N >= 2; a --dist ddp "
                "run also resumes under torchrun --nproc_per_node=1); for a single process leave out --dist"
            )
        self.spec = D.MeshSpec(self.world, tp, hsdp)
        try:
            self.spec.check()
        except ValueError as e:
            self.cleanup()
            raise UsageError(str(e)) from None
        if batch_size % self.spec.dp_world:
            self.cleanup()
            raise UsageError(
                f"--batch-size {batch_size} (global) is not divisible by the data-parallel size {self.spec.dp_world}"
            )

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint_name(self) -> str:
        """single process: one atomic .pt file; distributed: a torch.distributed.checkpoint folder"""
        return "last.pt" if self.mode == "none" else "last_dcp"

    def wrap(self, model):
        if self.mode == "none" or self.world == 1:
            return model
        return self.D.wrap_model(model, self.mode, tp=self.tp, hsdp=self.hsdp)

    def core(self, model):
        return model if self.mode == "none" else self.D.unwrap_model(model)

    def shard(self, x):
        """This rank's rows of a global batch (the ranks of a tensor-parallel group read the same rows)."""
        if self.world == 1:
            return x
        b, r = x.size(0) // self.spec.dp_world, self.spec.dp_rank(self.rank)
        return x[r * b : (r + 1) * b]

    def mean(self, v: float) -> float:
        return v if self.mode == "none" else float(self.D.all_reduce_mean(v))

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a stop request must stop all ranks at one step)."""
        return flag if self.mode == "none" else self.D.any_rank(flag)

    def n_params(self, model) -> int:
        core = self.core(model)
        if self.world == 1:
            return sum(p.numel() for p in core.parameters())
        return sum(getattr(p, "full_tensor", lambda p=p: p)().numel() for p in core.parameters())

    def cleanup(self) -> None:
        if self.mode != "none":
            self.D.cleanup_distributed()
