"""Measurements of optimizer steps: interleaved timing, transient memory, torch.profiler summary.

Transient memory of a step = the most tensor memory allocated at once during the step beyond what
was allocated when it began (state already created by a warm-up step): on CUDA
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU the running sum of
the profiler's allocation events (``profile_memory=True``), plus the process's peak-RSS growth
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``; allocator caching makes it a
lower bound, so the tensor figure is the one to read).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .machine import sync

# time inside these ops counts as GEMM / factorization work; the rest of the step is overhead
GEMM_OPS = frozenset(
    "aten::" + n
    for n in (
        "mm",
        "bmm",
        "baddbmm",
        "addmm",
        "addbmm",
        "linalg_cholesky_ex",
        "linalg_solve_triangular",
        "triangular_solve",
        "cholesky_solve",
        "_linalg_eigh",
        "linalg_eigh",
        "_linalg_svd",
        "linalg_svd",
        "linalg_inv_ex",
        "_linalg_solve_ex",
    )
)
STEP_MARK = "bench::optimizer_step"
COPY_OPS = ("aten::copy_", "aten::cat")  # leaf ops that move memory (to/clone/stack/contiguous end in these)
_ELEM = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long": 8, "int": 4, "bool": 1}


class Workload:
    """The bench's parameters with fixed gradients; ``restore`` puts back the initial weights and the
    gradients (some peers set ``p.grad`` to None or modify it) before every step."""

    def __init__(self, params: list, seed: int = 1):
        self.params = params
        g = torch.Generator(device=params[0].device).manual_seed(seed)
        self.grads = [1e-2 * torch.randn(p.shape, generator=g, device=p.device) for p in params]
        self.init = [p.detach().clone() for p in params]
        self.work = [g.clone() for g in self.grads]

    @torch.no_grad()
    def restore(self) -> None:
        for p, w, g, buf in zip(self.params, self.init, self.grads, self.work):
            p.copy_(w)
            buf.copy_(g)
            p.grad = buf

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)


def timed(step: Callable[[], object], work: Workload, device: str) -> float:
    work.restore()
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def interleave(steps: dict, work: Workload, device: str, need: dict) -> tuple[dict, dict]:
    """Round-robin timed steps (the order rotates each round) until every name has ``need[name]``
    samples; returns samples and the round index of each sample (for paired ratios)."""
    samples = {n: [] for n in steps}
    rounds = {n: [] for n in steps}
    rnd = 0
    while any(len(samples[n]) < need[n] for n in steps):
        order = [n for n in steps if len(samples[n]) < need[n]]
        k = rnd % len(order)
        for n in order[k:] + order[:k]:
            samples[n].append(timed(steps[n], work, device))
            rounds[n].append(rnd)
        rnd += 1
    return samples, rounds


def paired_ratio(rounds: dict, samples: dict, name: str, ref: str) -> float | None:
    """Median over shared rounds of the per-round time ratio (robust to load drifting)."""
    if ref not in samples or name not in samples:
        return None
    by = dict(zip(rounds[ref], samples[ref]))
    rs = [x / by[k] for k, x in zip(rounds[name], samples[name]) if k in by]
    return statistics.median(rs) if len(rs) >= 3 else None


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _events(prof):
    return sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())


def _peak_alloc(events, device_type) -> int:
    run = peak = 0
    for e in events:
        if e.name() == "[memory]" and e.device_type() == device_type:
            run += e.nbytes()
            peak = max(peak, run)
    return peak


def transient_memory(step: Callable[[], object], work: Workload, device: str) -> dict:
    """Peak transient memory of one step (bytes, and as a multiple of the weights' bytes)."""
    work.restore()
    out: dict = {"weight_bytes": work.weight_bytes}
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        out["peak_tensor_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        out["peak_tensor_bytes"] = _peak_alloc(_events(prof), torch.autograd.DeviceType.CPU)
        work.restore()
        rss0 = _status_kib("VmRSS")
        if _reset_hwm() and rss0 is not None:
            step()
            hwm = _status_kib("VmHWM")
            out["rss_hwm_delta_bytes"] = max(0, (hwm or rss0) - rss0) * 1024
    out["peak_tensor_x_weights"] = out["peak_tensor_bytes"] / max(1, out["weight_bytes"])
    return out


def _copied_bytes(events, device_type) -> int:
    """Bytes written by copy_ (dst numel x dst element size) and cat (its output allocation)."""
    total = 0
    mem = [e for e in events if e.name() == "[memory]" and e.device_type() == device_type and e.nbytes() > 0]
    for e in events:
        if e.name() == "aten::copy_" and e.shapes() and e.shapes()[0]:
            n = 1
            for s in e.shapes()[0]:
                n *= s
            total += n * _ELEM.get(e.dtypes()[0], 4)
        elif e.name() == "aten::cat":
            s, t = e.start_ns(), e.start_ns() + e.duration_ns()
            total += sum(m.nbytes() for m in mem if s <= m.start_ns() <= t)
    return total


def _in(windows, t0, t1) -> bool:
    return any(a <= t0 and t1 <= b for a, b in windows)


def profile_steps(step: Callable[[], object], work: Workload, device: str, steps: int = 2, top: int = 12) -> dict:
    """torch.profiler over ``steps`` steps (the untimed restores between them excluded): top ops by
    self time, the share of the step outside GEMM/factorization ops, and the bytes written by
    copies/concatenations per step."""
    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    walls = []
    with profile(activities=acts, record_shapes=True, profile_memory=True) as prof:
        for _ in range(steps):
            work.restore()
            sync(device)
            t0 = time.perf_counter()
            with record_function(STEP_MARK):
                step()
                sync(device)
            walls.append(time.perf_counter() - t0)
    wall = sum(walls)
    fevents = prof.events()
    windows = [(e.time_range.start, e.time_range.end) for e in fevents if e.name == STEP_MARK]
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    by_op: dict = {}
    for e in fevents:
        if e.name != STEP_MARK and _in(windows, e.time_range.start, e.time_range.end):
            t, n = by_op.get(e.name, (0.0, 0))
            by_op[e.name] = (t + getattr(e, attr), n + 1)
    ranked = sorted(((k, t, n) for k, (t, n) in by_op.items() if t > 0), key=lambda x: -x[1])
    gemm_s = sum(t for k, t, _ in ranked if k in GEMM_OPS) / 1e6
    dev = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kevents = _events(prof)
    ns = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in kevents if e.name() == STEP_MARK]
    events = [e for e in kevents if _in(ns, e.start_ns(), e.start_ns() + max(0, e.duration_ns()))]
    return dict(
        steps=steps,
        step_s=wall / steps,
        gemm_s=gemm_s / steps,
        non_gemm_share=max(0.0, 1 - gemm_s / wall),
        copied_bytes=_copied_bytes(events, dev) // steps,
        copy_calls=sum(1 for e in events if e.name() in COPY_OPS) // steps,
        top_ops=[
            dict(op=k, calls=n // steps, self_ms=t / 1e3 / steps, share=t / 1e6 / wall) for k, t, n in ranked[:top]
        ],
    )
