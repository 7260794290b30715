"""The training CLI's progress display: a tqdm bar on a terminal, a plain line every
``interval_s`` seconds (and at the first and last step) when stderr is a log file, nothing when
quiet. Part of the ``train`` extra; without tqdm installed the plain lines are used everywhere."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """``update(step, loss, tokens_per_s, extra)`` after every step; ``newline()`` before printing
    other lines; ``close()`` at the end."""

    def __init__(self, total: int, quiet: bool, stream: TextIO | None = None, interval_s: float = 10.0) -> None:
        self.total, self.quiet, self.interval_s = total, quiet, interval_s
        self.stream: TextIO = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last_print = 0.0
        self.bar: Any = None
        if self.tty and not quiet:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.tty = False
            else:
                self.bar = tqdm(total=total, file=self.stream, dynamic_ncols=True, leave=True, unit="step")

    def update(self, step: int, loss: float, tok_s: float, extra: str = "") -> None:
        if self.quiet:
            return
        text = f"loss {loss:.4f} {tok_s / 1000:.1f}k tok/s {extra}".rstrip()
        if self.bar is not None:
            self.bar.n = step  # absolute: a resumed run starts part-way
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()
            return
        now = time.time()
        if now - self.last_print < self.interval_s and step not in (1, self.total):
            return
        self.last_print = now
        self.stream.write(f"step {step}/{self.total} {text}\n")
        self.stream.flush()

    def newline(self) -> None:
        """Let another line be printed without breaking the bar."""
        if self.bar is not None:
            self.bar.clear()

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
