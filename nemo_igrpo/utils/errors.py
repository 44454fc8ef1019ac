"""The project's exception types, in one place.

`UserError` is the base of every "you can fix this" error (bad config, data, model, host
setting); the CLI prints those as one line and exits 2, with no traceback. Most are also
`ValueError`s, which library callers catching ValueError rely on. `GenerationServerError` and
`TrainingAborted` are not the user's input but are reported the same way: the run stopped for a
reason its message explains, after saving what it could. Everything else is a bug and keeps its
traceback. This module imports nothing heavy, so any module (and the CLI) can use it.
"""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """An error the user can fix (bad input, a bad setting); printed without a traceback."""


class DataError(UserError, ValueError):
    """A dataset problem, naming the file and row (e.g. a missing field)."""


class ConfigError(UserError, ValueError):
    """A configuration problem, with the file and the key path that caused it."""


class RewardConfigError(ConfigError):
    """A reward config that cannot work; the message names the key (reward.terms[i]...)."""


class RewardResolutionError(UserError, ValueError):
    """A reward term name that names no registered function and no importable callable."""


class PluginResolutionError(UserError, ValueError):
    """A registry value (algorithm.policy_loss, ...) that names no registered function and no
    importable, fitting callable."""


class UnsupportedModelError(UserError, ValueError):
    """The checkpoint's architecture cannot be trained by this actor (yet)."""


class SandboxUnavailableError(UserError):
    """The OS sandbox of the code reward cannot start on this host; the message names the
    setting to change."""


class PromptDoesNotFit(UserError, ValueError):
    """A prompt (plain, or with its draft) does not fit the configured token limits.

    `where` names the problem for the user ("train.jsonl: line 12", see `Problem.location`);
    without it the message falls back to the problem's 0-based position."""

    def __init__(
        self,
        message: str,
        *,
        problem_index: Optional[int],
        needed: int,
        limit: int,
        key: str,
        where: Optional[str] = None,
    ):
        if where is None and problem_index is not None:
            where = f"problem {problem_index}"
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{message} (needs {needed} tokens, limit {limit}; see {key})")
        self.problem_index = problem_index
        self.where = where
        self.needed = needed
        self.limit = limit
        self.key = key


class GenerationServerError(RuntimeError):
    """A generation server is unreachable, failing, or serves another model."""


class GenerationRequestFailed(RuntimeError):
    """A data-parallel generation group's engine raised; every rank raises this with the first
    group's message (generation/data_parallel.py)."""


class TrainingAborted(RuntimeError):
    """The run stopped on purpose (e.g. repeated NaN loss) after saving a checkpoint."""


class RewardTermFailing(TrainingAborted):
    """A reward term failed on every sample for `reward.max_failing_steps` consecutive steps.

    Raised on the process that scores rewards (global rank 0). Training on a reward that is
    nothing but `reward.fallback_score` would only waste the allocation, so the run stops.
    """

    # Defaults so that pickling (message only in .args; attributes restored from __dict__) works,
    # e.g. if the error is ever sent from rank 0 to the other ranks.
    def __init__(self, message: str, *, term: str = "", steps: int = 0, last_error: str = ""):
        super().__init__(message)
        self.term = term
        self.steps = steps
        self.last_error = last_error


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception type the CLI reports as one line with exit code 2."""
    return (UserError, GenerationServerError, TrainingAborted)
