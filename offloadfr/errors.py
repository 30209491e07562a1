"""The exception types offloadfr raises for bad input.

Every user-facing error is a subclass of :class:`OffloadFRError` and of the matching builtin (``ValueError``,
``FileNotFoundError``), so callers can catch either. The CLI turns any ``OffloadFRError`` into one line on stderr
and exit code 2.
"""

from __future__ import annotations

import errno

__all__ = [
    "OffloadFRError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "CheckpointError",
    "BankError",
    "NonFiniteError",
    "DiskFullError",
]


class OffloadFRError(Exception):
    """Base class of every error caused by bad input rather than by a bug."""


class ConfigError(OffloadFRError, ValueError):
    """A config key is unknown, has the wrong type or an out-of-range value.

    The message names the dotted key, the bad value and what is allowed.
    """


class DataError(OffloadFRError, ValueError):
    """A dataset is malformed or empty."""


class DataNotFoundError(OffloadFRError, FileNotFoundError):
    """A dataset directory, shard or verification pack does not exist."""


class CheckpointError(OffloadFRError, ValueError):
    """A checkpoint is missing, incomplete, or does not match the run it is loaded into."""


class BankError(OffloadFRError, ValueError):
    """A class-center bank does not match the head that opens it (dim, kind, size, step)."""


class NonFiniteError(OffloadFRError, FloatingPointError):
    """The loss or the gradient norm became NaN or Inf; the step was stopped before any update."""


class DiskFullError(OffloadFRError, OSError):
    """The disk filled up while writing the bank, a checkpoint or the metrics; what was written before is intact.

    The message names the path and how to continue (free space, then ``--resume auto``).
    """

    ERRNOS = (errno.ENOSPC, errno.EDQUOT)
    """The ``OSError.errno`` values that mean a full disk (or a full quota)."""
