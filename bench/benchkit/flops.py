"""GEMM FLOP model of a step: the msign iterations (plus CM's Grams and whitenings) and the
FLOP floor, these FLOPs divided by this machine's measured rate for the same batched shapes."""

from __future__ import annotations

import time

import torch

from .machine import sync
from .optimizers import CM_VARIANTS


def msign_flops(m: int, n: int, steps: int) -> int:
    """GEMM FLOPs of one polynomial msign of an m x n matrix: per step the Gram (2 s^2 l), its
    square (2 s^3) and the update (2 s^2 l), s = min(m, n), l = max(m, n)."""
    s, l = min(m, n), max(m, n)
    return steps * (4 * s * s * l + 2 * s**3)


def muon_terms(mats, steps: int, dtype, batched: bool = True) -> list:
    """[(flops, (batch, s, l), dtype)]: one msign per matrix, same shapes batched when ``batched``."""
    shapes: dict = {}
    for p in mats:
        key = (p.shape[0], p[0].numel())
        shapes[key] = shapes.get(key, 0) + 1
    return [
        (count * msign_flops(m, n, steps), (count if batched else 1, min(m, n), max(m, n)), dtype)
        for (m, n), count in shapes.items()
    ]


def cm_terms(specs, kw: dict, dtype) -> list:
    """CM's msign FLOPs per shape class (``layers x heads`` batched) plus the Gram/whitening GEMMs."""
    hybrid, iso = kw.get("hybrid", True), kw.get("isotropic", False)
    whitening, steps = kw.get("whitening", "both"), 8
    acc: dict = {}

    def add(count, s, l, dt, each):
        e = acc.setdefault((min(s, l), max(s, l), dt), [0, 0])
        e[0], e[1] = e[0] + count * each, e[1] + count

    for sp in specs:
        H, hkv, d = sp.num_heads, sp.num_kv_heads, sp.head_dim
        D = sp.q.param.shape[1]
        G = H // hkv
        for kind in ("qk", "ov"):
            if kw.get("method") == "joint":
                add(hkv, d, (G + 1) * D, dtype, msign_flops(d, (G + 1) * D, steps))
            elif hybrid and kind == "ov":
                add(1, H * d, D, dtype, msign_flops(H * d, D, steps))
                add(hkv, d, D, dtype, msign_flops(d, D, steps))
            else:
                add(H + hkv, d, D, dtype, msign_flops(d, D, steps))
            n_gemm = 0 if iso else 1 + {"both": 2, "pre": 1, "post": 1, "none": 0}[whitening]
            if n_gemm:
                add(H + hkv, d, D, torch.float32, n_gemm * 2 * d * d * D)
    return [(f, (batch, s, l), dt) for (s, l, dt), (f, batch) in acc.items()]


def flop_terms(entry, bench, hidden, dtype) -> list:
    """The GEMM terms of a row whose implementation is known (this library's and torch's; the
    peers batch and cast in their own ways, so they get no floor)."""
    if entry.source not in ("ours", "torch"):
        return []
    if entry.algorithm == "cm":
        kw = CM_VARIANTS.get(entry.name, {})
        terms = cm_terms(bench.specs, kw, dtype)
        if bench.whole_model:
            cm_ids = {id(h.param) for s in bench.specs for h in (s.q, s.k, s.v, s.o) if h is not None}
            terms += muon_terms([p for p in hidden if id(p) not in cm_ids], 5, dtype)
        return terms
    if entry.name == "torch.optim.Muon":
        return muon_terms(hidden, 5, torch.bfloat16, batched=False)
    if entry.algorithm in ("muon", "normuon", "adamuon", "newton-muon"):
        return muon_terms(hidden, 5, dtype)
    return []


class Rates:
    """Measured FLOP/s of the msign's dominant GEMM ``y y^T`` per (batch, s, l, dtype)."""

    def __init__(self, device: str):
        self.device, self.cache = device, {}

    def rate(self, batch: int, s: int, l: int, dtype) -> float:
        key = (batch, s, l, dtype)
        if key not in self.cache:
            y = torch.randn(batch, s, l, device=self.device).to(dtype)
            torch.bmm(y, y.mT)
            sync(self.device)
            best, spent, reps = float("inf"), 0.0, 0
            while reps < 3 or (spent < 0.3 and reps < 50):
                t0 = time.perf_counter()
                torch.bmm(y, y.mT)
                sync(self.device)
                dt = time.perf_counter() - t0
                best, spent, reps = min(best, dt), spent + dt, reps + 1
            self.cache[key] = 2 * batch * s * s * l / best
        return self.cache[key]

    def floor(self, terms) -> float:
        return sum(f / self.rate(*shape, dt) for f, shape, dt in terms)
