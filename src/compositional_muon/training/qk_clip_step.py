"""The CLI's QK-clip (``--qk-clip-tau``): built with the optimizer, applied right after every
``opt.step()`` inside the atomic training step (see :func:`.loop.train_step`)."""

from __future__ import annotations

from ..qk_clip import QKClip
from .errors import UsageError

__all__ = ["qk_clipper", "clip_step"]


def qk_clipper(args, runner, model) -> QKClip | None:
    """The QK-clip of ``--qk-clip-tau`` (None when off); refused under FSDP2 (sharded q/k weights)."""
    if not args.qk_clip_tau:
        return None
    if runner.mode == "fsdp2":
        raise UsageError("--qk-clip-tau is not supported with --dist fsdp2 (sharded q/k weights); use --dist ddp")
    try:
        return QKClip.from_model(runner.core(model), args.qk_clip_tau, gqa=args.qk_clip_gqa)
    except ValueError as e:
        raise UsageError(f"--qk-clip-tau: {e}") from None


def clip_step(clipper: QKClip | None, runner) -> float | None:
    """Clip with the max logits of this step's forward (under DDP the max over the ranks, so every
    rank scales the same heads); returns the largest logit seen (None when the clip is off)."""
    if clipper is None:
        return None
    logits = {layer.name: layer.module.max_logits for layer in clipper.layers}
    if runner.mode == "ddp":
        import torch.distributed as tdist

        for v in logits.values():
            tdist.all_reduce(v, op=tdist.ReduceOp.MAX)
    clipper.clip(logits)
    return clipper.last_max
