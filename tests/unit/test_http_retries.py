"""The one retry policy both HTTP clients use (utils/http.py). The clients themselves are tested
against real local servers in test_judge.py and tests/e2e/test_generation_server.py."""

from __future__ import annotations

import pytest

from nemo_igrpo.utils.http import RetryableStatus, backoff_delay, call_with_retries


def test_transient_errors_are_retried_with_capped_exponential_backoff():
    outcomes = [ConnectionError("down"), RetryableStatus(503, "HTTP 503"), TimeoutError("slow"), "ok"]
    slept = []

    def once():
        out = outcomes.pop(0)
        if isinstance(out, BaseException):
            raise out
        return out

    result = call_with_retries(
        once,
        retries=5,
        backoff_s=1.0,
        max_backoff_s=3.0,
        sleep=slept.append,
        transient=(ConnectionError, TimeoutError, RetryableStatus),
        what="test",
    )
    assert result == "ok" and slept == [1.0, 2.0, 3.0]
    assert [backoff_delay(k, 0.5) for k in (1, 2, 3)] == [0.5, 1.0, 2.0]


def test_running_out_raises_the_last_transient_error():
    calls = []

    def once():
        calls.append(1)
        raise RetryableStatus(429, f"HTTP 429 #{len(calls)}")

    with pytest.raises(RetryableStatus, match="#3"):
        call_with_retries(once, retries=2, backoff_s=0.0, sleep=lambda s: None, transient=(RetryableStatus,), what="t")
    assert len(calls) == 3


def test_other_errors_are_not_retried():
    calls = []

    def once():
        calls.append(1)
        raise ValueError("a real answer")

    with pytest.raises(ValueError):
        call_with_retries(once, retries=4, backoff_s=0.0, sleep=lambda s: None, transient=(ConnectionError,), what="t")
    assert len(calls) == 1
