"""Memory of this process, from psutil (resident set size) with ``resource`` (peak RSS) as the
fallback; part of the training tools, never the optimizer library."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

__all__ = ["MemoryReading", "rss_mb", "peak_rss_mb", "reading", "PeakSampler"]


@dataclass(frozen=True)
class MemoryReading:
    """``rss_mb``: resident set size now (None without psutil); ``peak_mb``: the process's peak
    resident set size so far (``resource.getrusage``; None where unavailable, e.g. Windows)."""

    rss_mb: float | None
    peak_mb: float | None


def rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10  # bytes on macOS, KiB on Linux


def reading() -> MemoryReading:
    return MemoryReading(rss_mb(), peak_rss_mb())


class PeakSampler:
    """Highest RSS seen while the ``with`` block runs, sampled every ``interval_s`` by a thread
    (psutil); without psutil, the growth of ``resource``'s peak RSS. ``peak_mb``/``base_mb`` after
    the block, ``method`` says which was used."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.base_mb: float | None = None
        self.peak_mb: float | None = None
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakSampler:
        now = rss_mb()
        if now is not None:
            self.base_mb = self.peak_mb = now
            self.method = f"rss (psutil, sampled every {self.interval_s * 1000:g} ms)"
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        else:
            self.base_mb, self.method = peak_rss_mb(), "ru_maxrss growth (resource)"
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            v = rss_mb()
            if v is not None and self.peak_mb is not None and v > self.peak_mb:
                self.peak_mb = v

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            v = rss_mb()
            if v is not None and self.peak_mb is not None:
                self.peak_mb = max(self.peak_mb, v)
        else:
            self.peak_mb = peak_rss_mb()
