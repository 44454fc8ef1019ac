"""Error types for bad input. The CLI prints these as one line and exits 2 (no traceback).

`UserError` is the common base of the project's own "you can fix this" errors, so the CLI can
catch them in one place without importing every module that defines one (importing the policy
package pulls in torch and megatron-core). Errors of a few modules that are not subclasses (they
must stay `ValueError`s for library callers) are looked up by name, only when their module has
already been imported: an exception from a module that was never imported cannot be in flight.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """An error the user can fix (bad input, a bad setting); printed without a traceback."""


class DataError(UserError, ValueError):
    """A dataset problem, naming the file and row (e.g. a missing field)."""


class GenerationServerError(RuntimeError):
    """A generation server is unreachable, failing, or serves another model."""


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


# (module, class name) of user-error types defined elsewhere that do not derive from UserError.
_FOREIGN_USER_ERRORS = (
    ("nemo_igrpo.policy.model", "UnsupportedModelError"),
    ("nemo_igrpo.rewards.registry", "RewardResolutionError"),
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception type the CLI reports as one line with exit code 2."""
    types: list[type[BaseException]] = [UserError, GenerationServerError, TrainingAborted]
    for module_name, class_name in _FOREIGN_USER_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            types.append(cls)
    return tuple(types)
