"""Statistics of the optimizer study: paired same-seed differences with Student-t intervals, and
steps / wall-clock time to reach a target loss.

Paired difference of optimizers ``A`` and ``B`` over seeds ``s = 1..n`` (the same initial weights
and training batches at a seed): ``d_s = L_A(s) - L_B(s)``, ``dbar = mean(d)``,
``sd = sqrt(sum (d_s - dbar)^2 / (n - 1))``, ``se = sd / sqrt(n)`` and the 95% interval
``dbar +- t_{0.975, n-1} * se``. Negative ``d`` means ``A`` reached the lower loss.

Steps to target: the first evaluation at which a run's validation loss is at or below the target,
linearly interpolated between that evaluation and the one before it (the first evaluation itself
when it is already below); ``None`` when the run never gets there. Time to target is the same with
the cumulative training time (evaluation excluded) at each evaluation in place of the step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

__all__ = ["PairedDiff", "t_cdf", "t_quantile", "paired_difference", "first_crossing", "mean_ci"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` for ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df!r}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf` to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class PairedDiff:
    """Mean of ``values`` (paired differences) with its 95% Student-t interval."""

    mean: float
    sd: float
    se: float
    n: int
    lo: float
    hi: float
    values: tuple[float, ...]

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.hi < 0.0 or self.lo > 0.0)

    def text(self, fmt: str = "{:+.4f}") -> str:
        """``"-0.0123 [-0.0200, -0.0046]"`` (the mean alone when ``n < 2``)."""
        if self.n < 2:
            return fmt.format(self.mean) + " (1 seed)"
        return f"{fmt.format(self.mean)} [{fmt.format(self.lo)}, {fmt.format(self.hi)}]"


def mean_ci(values: Sequence[float], level: float = 0.95) -> PairedDiff:
    """Mean, sample sd, se and the two-sided ``level`` Student-t interval of ``values``."""
    xs = tuple(float(v) for v in values)
    if not xs:
        raise ValueError("no values")
    if not all(math.isfinite(v) for v in xs):
        raise ValueError(f"non-finite value in {xs}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return PairedDiff(mean, float("nan"), float("nan"), 1, float("nan"), float("nan"), xs)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    return PairedDiff(mean, sd, se, n, mean - half, mean + half, xs)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> PairedDiff:
    """``a - b`` over the seeds both have (``a``, ``b``: seed -> value); ValueError when none."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common")
    return mean_ci([a[s] - b[s] for s in seeds], level)


def first_crossing(xs: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The ``x`` (step or time) at which ``losses`` first reach ``target`` (see the module doc)."""
    if len(xs) != len(losses):
        raise ValueError(f"{len(xs)} x values for {len(losses)} losses")
    for k, (x, v) in enumerate(zip(xs, losses)):
        if v <= target:
            if k == 0:
                return float(x)
            x0, v0 = xs[k - 1], losses[k - 1]
            return float(x0 + (x - x0) * (v0 - target) / (v0 - v))
    return None
