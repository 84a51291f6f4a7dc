"""The retry policy on a fake clock: what is retried, how long it waits, when it stops."""

from __future__ import annotations

import pytest

from tests.support.fakes import FakeClock
from transforms.errors import (
    FatalProviderError,
    InputRejectedError,
    RateLimitedError,
    RetryableError,
)
from transforms.retry import RetryPolicy


def call_until(policy: RetryPolicy, clock: FakeClock, errors: list[Exception]) -> int:
    calls = 0
    for attempt in policy.retrying(sleep=clock.sleep):
        with attempt:
            calls += 1
            if errors:
                raise errors.pop(0)
    return calls


def test_retryable_errors_are_retried_until_success() -> None:
    clock = FakeClock()
    calls = call_until(RetryPolicy(5, 60, 1), clock, [RetryableError("503"), RetryableError("x")])
    assert calls == 3
    assert len(clock.sleeps) == 2


def test_gives_up_after_max_attempts_and_reraises_the_last_error() -> None:
    clock = FakeClock()
    errors = [RetryableError(f"e{i}") for i in range(10)]
    with pytest.raises(RetryableError, match="e3"):
        call_until(RetryPolicy(4, 60, 1), clock, errors)
    assert len(clock.sleeps) == 3


@pytest.mark.parametrize("error", [FatalProviderError("401"), InputRejectedError("400")])
def test_fatal_and_per_input_errors_are_not_retried(error: Exception) -> None:
    clock = FakeClock()
    with pytest.raises(type(error)):
        call_until(RetryPolicy(8, 60, 1), clock, [error])
    assert clock.sleeps == []


def test_retry_after_is_honoured_and_capped() -> None:
    clock = FakeClock()
    call_until(RetryPolicy(5, 10, 1), clock, [RateLimitedError("429", retry_after_s=3.0),
                                              RateLimitedError("429", retry_after_s=500.0)])
    assert 3.0 <= clock.sleeps[0] <= 3.25
    assert clock.sleeps[1] == 10.0


def test_backoff_is_jittered_exponential_and_capped() -> None:
    clock = FakeClock()
    errors = [RetryableError("x") for _ in range(7)]
    call_until(RetryPolicy(8, 8, 1), clock, errors)
    assert all(0 <= s <= 8 for s in clock.sleeps)
    assert len(set(clock.sleeps)) > 1  # jitter: not all the same
