"""The retry policy: which errors are tried again, how long to wait, and when to give up.

One policy object, built from ``retry.*`` config, composed from tenacity strategies:

- retry only :class:`~transforms.errors.RetryableError` (429, 5xx, timeouts, resets, malformed or
  misaligned answers). Per-input and fatal errors are never retried: they are handled by
  bisection (:mod:`transforms.bisection`) and the abort flag (:mod:`transforms.abort`).
- wait what the provider asked for (``Retry-After`` / ``retry-after-ms``) when it said so, else
  exponential backoff with full jitter (many workers compete for one API, so their retries must
  spread out), both capped at ``retry.max_wait_s``.
- stop after ``retry.max_attempts`` attempts of the same request.

The sleep function is injected, so tests run the policy on a fake clock.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import tenacity
from tenacity.wait import wait_base

from transforms.errors import RetryableError


class wait_provider_hint(wait_base):
    """Wait the provider's ``Retry-After`` (plus a little jitter) when given, else ``fallback``."""

    def __init__(self, fallback: wait_base, max_wait_s: float, jitter_s: float = 0.25) -> None:
        self.fallback = fallback
        self.max_wait_s = max_wait_s
        self.jitter_s = jitter_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        hint = getattr(exc, "retry_after_s", None)
        if hint is not None:
            return min(self.max_wait_s, hint + random.uniform(0, self.jitter_s))
        return min(self.max_wait_s, self.fallback(retry_state))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one request is retried. Stateless: build a fresh :meth:`retrying` per request."""

    max_attempts: int = 8
    max_wait_s: float = 120.0
    initial_wait_s: float = 1.0

    def wait_strategy(self) -> wait_base:
        backoff = tenacity.wait_random_exponential(multiplier=self.initial_wait_s,
                                                   max=self.max_wait_s)
        return wait_provider_hint(backoff, self.max_wait_s)

    def retrying(self, sleep: Callable[[float], None] = time.sleep) -> tenacity.Retrying:
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=self.wait_strategy(),
            retry=tenacity.retry_if_exception_type(RetryableError),
            reraise=True,
            sleep=sleep,
        )
