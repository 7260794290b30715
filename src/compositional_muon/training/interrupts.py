"""Ctrl-C (SIGINT) and SIGTERM during training only *request* a stop: the handler sets a flag and
the loop stops between two steps, so a checkpoint never holds a half-applied update and the data
sampler never has drawn a batch for a step that did not run. A second Ctrl-C quits at once without
saving (the last checkpoint on disk is kept)."""

from __future__ import annotations

import signal
import threading

__all__ = ["StopRequest"]


class StopRequest:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing).
    ``signum`` is the first signal received, ``None`` until then."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: quit now
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
