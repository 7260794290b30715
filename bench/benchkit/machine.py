"""What machine a benchmark ran on: CPU model and flags, GPU, torch build, GEMM rates."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

# flags that decide which GEMM kernels the CPU can use (x86 names as in /proc/cpuinfo)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of :data:`CPU_FLAGS` the first CPU in /proc/cpuinfo lists."""
    flags: set[str] = set()
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
            break
    return {f: f in flags for f in CPU_FLAGS}


def msign_dtype_name(device: str) -> str:
    """The library's default msign precision on ``device`` (``"?"`` for a tree without the rule)."""
    try:
        from compositional_muon.msign import default_msign_dtype
    except ImportError:
        return "?"
    return str(default_msign_dtype(device)).replace("torch.", "")


@dataclass
class Machine:
    cpu: str
    cpu_flags: dict
    logical_cpus: int | None
    threads: int
    torch: str
    cpu_capability: str
    python: str
    platform: str
    device: str
    gpu: str | None
    msign_dtype: str
    load_average: tuple | None
    gemm_gflops: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        on = [f for f, v in self.cpu_flags.items() if v]
        rates = ", ".join(f"{k} {v:.0f}" for k, v in self.gemm_gflops.items())
        gpu = f"; GPU {self.gpu}" if self.gpu else ""
        return (
            f"{self.cpu} ({self.logical_cpus} logical CPUs, {self.threads} threads; flags: {' '.join(on) or 'none'})"
            f"{gpu}; torch {self.torch}; device {self.device}; msign dtype {self.msign_dtype}; "
            f"GEMM GFLOP/s: {rates or 'not measured'}"
        )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_gflops(n: int, dtype: torch.dtype, device: str, seconds: float = 0.5) -> float:
    """Best-of-several GFLOP/s of an ``n x n`` by ``n x n`` matmul (best, so load lowers it less)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    best, spent, reps = float("inf"), 0.0, 0
    while reps < 3 or (spent < seconds and reps < 200):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2 * n**3 / best / 1e9


def describe(device: str = "cpu", gemm_n: int = 1024, measure_gemm: bool = True) -> Machine:
    """The machine record every benchmark output carries (GEMM rates of ``gemm_n``-sized matmuls)."""
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    rates = {}
    if measure_gemm:
        for dt in (torch.float32, torch.bfloat16):
            rates[str(dt).replace("torch.", "")] = gemm_gflops(gemm_n, dt, device)
    return Machine(
        cpu=cpu_model(),
        cpu_flags=cpu_flags(),
        logical_cpus=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        python=platform.python_version(),
        platform=platform.platform(),
        device=device,
        gpu=gpu,
        msign_dtype=msign_dtype_name(device),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        gemm_gflops=rates,
    )
