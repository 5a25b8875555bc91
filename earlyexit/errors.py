"""The library's exceptions and warnings.

Every failure that is about the model or the data (not a plain bad argument value, which raises
`ValueError` or `TypeError`) raises a subclass of `EarlyExitError`.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "EarlyExitError",
    "EarlyExitWarning",
    "PlacementError",
    "TraceError",
]


class EarlyExitError(Exception):
    """Root of the library's own exceptions."""


class TraceError(EarlyExitError):
    """A model could not be traced, split or profiled."""


class PlacementError(EarlyExitError):
    """Exits could not be placed as asked (for example, too few cut points)."""


class CheckpointError(EarlyExitError):
    """A saved file could not be read back into a model."""


class EarlyExitWarning(UserWarning):
    """Warnings issued by earlyexit."""
