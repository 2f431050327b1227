"""The exceptions of the FLAME file loaders, and the one way each is raised.

Every file the loaders refuse (truncated, empty, corrupt, inconsistent, hostile, or not
the kind of file asked for) raises a `ModelFileError` whose message starts with the file
(or in-memory asset) and names the offending key, shape or global. A missing file is a
`FileNotFoundError`; a bad argument (n_tex, num_faces, lm_type, model_path's type) is a
plain ValueError / TypeError naming the argument.
"""

from __future__ import annotations

import pickle


class ModelFileError(ValueError):
    """A model file (or in-memory asset) that does not hold what it should.

    The message names the file and the offending key or shape. Array contents of the wrong
    type (a dtype, or no array at all) raise a subclass that is also a TypeError.
    """


class UnsafePickleError(ModelFileError, pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list; nothing it referenced was run."""


class _ModelFileTypeError(ModelFileError, TypeError):
    """A ModelFileError about the type of what the file holds (also a TypeError)."""


def _fail(source: str, message: str) -> ModelFileError:
    return ModelFileError(f"{source}: {message}")


def _fail_type(source: str, message: str) -> ModelFileError:
    return _ModelFileTypeError(f"{source}: {message}")
