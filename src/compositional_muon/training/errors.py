"""The training CLI's two kinds of expected failure. ``main`` prints either as one line (no
traceback); anything else is a bug and keeps its traceback."""

from __future__ import annotations

__all__ = ["UsageError", "RunFailed", "USAGE_STATUS", "FAILED_STATUS"]

USAGE_STATUS = 2  # a bad argument or a run folder that cannot be used: nothing was changed
FAILED_STATUS = 1  # the run started and could not go on (disk full, diverged): the last checkpoint is kept


class UsageError(ValueError):
    """A user mistake found before anything was written (bad value, unusable ``--out``, ...)."""


class RunFailed(RuntimeError):
    """The run cannot continue (disk full, non-finite loss); the last good checkpoint is intact."""
