"""One retry policy for the project's HTTP clients (the OpenAI-compatible generation client and
the LLM judge), whatever HTTP library each uses.

Transient failures, i.e. the connection failing or timing out and the server answering 429 or a
5xx, are retried with exponential backoff (`backoff_s * 2**k`, capped); anything else is an
answer and is returned or raised at once. Running out of attempts raises the last transient
error, so callers keep their own error types and messages.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0


class RetryableStatus(RuntimeError):
    """The server answered with a status worth retrying (429, 5xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS


def backoff_delay(attempt: int, backoff_s: float, max_backoff_s: float = MAX_BACKOFF_S) -> float:
    """Seconds to wait before retry number `attempt` (1-based)."""
    return min(backoff_s * 2 ** (attempt - 1), max_backoff_s)


def call_with_retries(
    once: Callable[[], T],
    *,
    retries: int,
    backoff_s: float,
    transient: tuple[type[BaseException], ...],
    what: str,
    max_backoff_s: float = MAX_BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`once()` up to 1 + `retries` times; an exception of a `transient` type (include
    RetryableStatus) means try again after the backoff. Returns the first result; raises the
    last transient error when no attempt is left, and any other exception at once."""
    last: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            delay = backoff_delay(attempt, backoff_s, max_backoff_s)
            logger.warning("%s failed (%s); retry %d/%d in %.1f s", what, last, attempt, retries, delay)
            sleep(delay)
        try:
            return once()
        except transient as e:
            last = e
    assert last is not None
    raise last
