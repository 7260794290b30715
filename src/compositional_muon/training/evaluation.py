"""A fixed validation set: the same evenly spaced, disjoint windows of the validation split at
every evaluation, with per-sequence losses so that a standard error can be reported.

The validation split has ``N`` tokens; a window is ``block_size + 1`` tokens (inputs and the
next-token targets). ``n`` windows start at ``s_i = floor(i * (N - block_size - 1) / (n - 1))``
for ``i = 0..n-1`` (one window at 0 when ``n == 1``); they are disjoint when the stride is at least
``block_size + 1``, and ``n`` is capped at ``N // (block_size + 1)`` so that they always are. No
random generator is drawn, so evaluating never moves the data sampler and every evaluation of
every run (any optimizer, any seed) scores exactly the same tokens.

A sequence's loss is the mean next-token cross-entropy over its ``block_size`` positions (nats per
token); the set's loss is the mean over the ``n`` sequences (equal weights: every window has the
same length), its standard error ``sd / sqrt(n)`` with the sample standard deviation (n - 1).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

__all__ = ["EvalResult", "fixed_window_starts", "evaluate_fixed"]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Mean per-sequence loss, its standard error, and the per-sequence losses (window order)."""

    mean: float
    se: float
    losses: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.losses)

    def record(self, *, with_losses: bool) -> dict:
        """The fields a metrics line gets: ``val_loss``, ``val_se``, ``val_n`` (and the per-sequence
        ``val_losses`` when ``with_losses``)."""
        rec: dict = dict(val_loss=self.mean, val_se=self.se, val_n=self.n)
        if with_losses:
            rec["val_losses"] = [round(v, 6) for v in self.losses]
        return rec

    @classmethod
    def from_losses(cls, losses) -> EvalResult:
        xs = [float(v) for v in losses]
        if not xs:
            raise ValueError("no sequence losses")
        mean = math.fsum(xs) / len(xs)
        if len(xs) < 2:
            return cls(mean, float("nan"), tuple(xs))
        var = math.fsum((v - mean) ** 2 for v in xs) / (len(xs) - 1)
        return cls(mean, math.sqrt(var / len(xs)), tuple(xs))


def fixed_window_starts(n_tokens: int, block_size: int, n_windows: int) -> list[int]:
    """Start offsets of ``min(n_windows, n_tokens // (block_size + 1))`` evenly spaced, disjoint
    windows of ``block_size + 1`` tokens in a split of ``n_tokens`` tokens (see the module doc)."""
    if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"n_windows must be an int >= 1, got {n_windows!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    w = block_size + 1
    n = min(n_windows, n_tokens // w)
    if n < 1:
        raise ValueError(f"the split has {n_tokens} tokens, fewer than one window of block_size + 1 = {w}")
    if n == 1:
        return [0]
    last = n_tokens - w
    return [(i * last) // (n - 1) for i in range(n)]


@torch.no_grad()
def evaluate_fixed(model, tokens: torch.Tensor, *, block_size: int, n_windows: int, batch_size: int, device=None):
    """:class:`EvalResult` of ``model`` on the fixed windows of ``tokens`` (the validation split).

    ``model(x, y)`` must return ``(logits (B, T, V), loss)``; the per-sequence losses are computed
    here from the logits in float32, so auxiliary training terms never enter. The model is put in
    eval mode for the pass and restored afterwards."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    starts = torch.tensor(fixed_window_starts(tokens.numel(), block_size, n_windows))
    offsets = torch.arange(block_size + 1)
    was = model.training
    model.eval()
    losses: list[float] = []
    try:
        for i in range(0, starts.numel(), batch_size):
            win = tokens[starts[i : i + batch_size, None] + offsets].long()
            x, y = win[:, :-1], win[:, 1:]
            if device is not None:
                x, y = x.to(device), y.to(device)
            logits = model(x, y)[0]
            ce = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
            losses.extend(ce.mean(dim=1).tolist())
    finally:
        model.train(was)
    return EvalResult.from_losses(losses)
