"""The exceptions of the FLAME file loaders, and the one way they are raised."""

from __future__ import annotations

import pickle


class _FormatError(ValueError):
    """A file (or in-memory asset) that does not hold what it should; names the source."""


def _fail(source: str, message: str) -> ValueError:
    return _FormatError(f"{source}: {message}")


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list; nothing it referenced was run."""
