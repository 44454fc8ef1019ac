"""Error types for bad input. The CLI prints these as one line and exits 2 (no traceback)."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset problem, naming the file and row (e.g. a missing field)."""


class GenerationServerError(RuntimeError):
    """A generation server is unreachable, failing, or serves another model."""


class TrainingAborted(RuntimeError):
    """The run stopped on purpose (e.g. repeated NaN loss) after saving a checkpoint."""


def user_error_types() -> tuple[type[BaseException], ...]:
    return (DataError, GenerationServerError, TrainingAborted)
