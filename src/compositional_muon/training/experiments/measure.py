"""Measurements of one grid run, recomputed from its ``metrics.jsonl`` (memory sampled live).

What is measured (all from the run's own ``metrics.jsonl``, except memory):

* final train loss: the mean of the training cross-entropy (``parts["ce"]`` when the model logs
  it, else the objective) over the last 20 steps; ``final_train_objective`` is the same for the
  full training objective (LoopFormer and MoR add auxiliary terms to it);
* final val loss: the last evaluation (the fixed validation set: ``--eval-iters * --batch-size`` evenly spaced windows, the same at every evaluation; see ``training/evaluation.py``);
* time/step: the median of train's ``step_time`` over the steps after the first 5 (batch
  fetch, forward, backward, optimizer step; evaluation excluded); tokens/s =
  ``batch_size * block_size / median step time``;
* peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the resident set size of this
  process, read with psutil every 5 ms by a background thread during the run:
  ``peak_rss_mb`` (highest RSS seen) and ``peak_rss_delta_mb`` (that minus the RSS just before
  the run, measured after ``gc.collect()`` and glibc's ``malloc_trim(0)``), i.e. what the run's
  model, optimizer state, activations and data add on top of the interpreter and torch. When
  psutil is missing it falls back to the growth of ``ru_maxrss``, which only counts a run that
  raises the process's high-water mark.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
import threading

import torch

from .. import memory, train

__all__ = ["MemorySampler", "measure", "read_metrics", "machine_info", "cpu_name", "TAIL", "SKIP_TIMING"]

TAIL = 20  # steps averaged for the final train loss (as train's own summary does)
SKIP_TIMING = 5  # first steps left out of the median step time (as train's own summary does)


class _Capture:
    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass

    def text(self):
        return "".join(self.parts)


class MemorySampler:
    """Peak resident memory of this process during a ``with`` block (see the module docstring)."""

    def __init__(self, device: str = "cpu", interval: float = 0.005):
        self.device, self.interval = device, interval
        self.peak_mb = self.base_mb = None
        self.method = None
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def _rss_mb():
        return memory.rss_mb()

    @staticmethod
    def _maxrss_mb():
        return memory.peak_rss_mb()

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base_mb, self.method = torch.cuda.memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
        elif self._rss_mb() is not None:
            self.base_mb = self.peak_mb = self._rss_mb()
            self.method = "rss (psutil, sampled every 5 ms)"
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        else:
            self.base_mb, self.method = self._maxrss_mb(), "ru_maxrss growth"
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            v = self._rss_mb()
            if v is not None and v > self.peak_mb:
                self.peak_mb = v

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            v = self._rss_mb()
            if v is not None:
                self.peak_mb = max(self.peak_mb, v)
        else:
            self.peak_mb = self._maxrss_mb()
        return False

    @property
    def delta_mb(self):
        if self.peak_mb is None or self.base_mb is None:
            return None
        return max(0.0, self.peak_mb - self.base_mb)


def _malloc_trim():
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def read_metrics(path: str) -> list:
    return train.read_metrics(path) if os.path.exists(path) else []


def measure(metrics: list, batch_size: int, block_size: int) -> dict:
    """The numbers of one run, recomputed from its metrics lines (see the module docstring)."""
    if not metrics:
        return {}
    tail = metrics[-TAIL:]
    ce = [r.get("parts", {}).get("ce", r["train_loss"]) for r in tail]
    vals = [r for r in metrics if "val_loss" in r]
    times = sorted(r["step_time"] for r in (metrics[SKIP_TIMING:] or metrics))
    med = times[len(times) // 2]
    return dict(
        steps_done=metrics[-1]["step"],
        final_train_loss=sum(ce) / len(ce),
        final_train_objective=sum(r["train_loss"] for r in tail) / len(tail),
        final_val_loss=vals[-1]["val_loss"] if vals else float("nan"),
        initial_train_loss=metrics[0]["train_loss"],
        median_step_time=med,
        tokens_per_s=batch_size * block_size / med,
        total_time=metrics[-1]["elapsed"],
    )


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    cpu = cpu_name()
    info = dict(
        cpu=cpu,
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        threads=threads or torch.get_num_threads(),
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
