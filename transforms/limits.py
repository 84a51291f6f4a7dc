"""Client-side rate limiting: requests-per-minute and tokens-per-minute token buckets.

One :class:`RateLimiter` exists per worker process (see :mod:`transforms.embed_session`) and is shared by
every thread and DoFn instance in it, so the budget is not multiplied by the thread count. With N
worker processes each one is built with ``1/N`` of the configured limits.

The model, in three parts:

1. **Buckets.** Each request takes one unit from the RPM bucket and its estimated tokens from the
   TPM bucket, waiting until both have enough. Buckets hold ``burst_s`` seconds of budget, so a
   cold start cannot send a minute's worth at once. A request larger than the TPM bucket is let
   through when the bucket is full and drives it negative: the long-run rate stays exact.
2. **Calibration.** The provider counts tokens with its own tokenizer. After each answer the
   bucket is charged the difference between the provider's ``prompt_tokens`` and what was taken,
   and an exponential moving average of ``actual / estimated`` scales later estimates.
3. **Adaptation (AIMD).** A 429 halves the effective rate and pauses every sender for the
   ``Retry-After`` the provider asked; each success grows the rate back additively toward the
   configured limit. ``x-ratelimit-remaining-*`` headers near zero pause until their reset.

Every method takes its time from an injected :class:`Clock`, so tests run on a fake clock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


MONOTONIC = MonotonicClock()


@dataclass
class TokenBucket:
    """A leaky bucket of ``capacity`` units refilled at ``rate_per_s``; not thread-safe alone."""

    rate_per_s: float
    capacity: float
    level: float
    updated: float

    @classmethod
    def full(cls, rate_per_s: float, capacity: float, now: float) -> TokenBucket:
        return cls(rate_per_s, capacity, capacity, now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
            self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``min(amount, capacity)`` units are available (0 if they are now)."""
        need = min(amount, self.capacity) - self.level
        # A tolerance, so float rounding can never ask for a wait too small to move the clock.
        return 0.0 if need <= 1e-6 else need / self.rate_per_s


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The budget of one worker process (its share of the configured limits)."""

    requests_per_minute: float
    tokens_per_minute: float

    def share(self, workers: int) -> RateLimits:
        n = max(1, workers)
        return RateLimits(self.requests_per_minute / n, self.tokens_per_minute / n)


class RateLimiter:
    """RPM + TPM buckets with calibration and AIMD adaptation; thread-safe."""

    #: Fraction of the configured rate kept after a 429 (multiplicative decrease).
    DECREASE = 0.5
    #: Fraction of the configured rate regained per successful request (additive increase).
    INCREASE = 0.02
    #: The lowest fraction of the configured rate adaptation may fall to.
    MIN_FACTOR = 0.05
    #: Weight of the newest observation in the calibration average.
    CALIBRATION_ALPHA = 0.2

    def __init__(
        self,
        limits: RateLimits,
        *,
        clock: Clock = MONOTONIC,
        burst_s: float = 1.0,
    ) -> None:
        self.limits = limits
        self.clock = clock
        self.burst_s = burst_s
        now = clock.now()
        self._lock = threading.Lock()
        self._factor = 1.0
        self._calibration = 1.0
        self._paused_until = now
        self._requests = TokenBucket.full(0.0, 0.0, now)
        self._tokens = TokenBucket.full(0.0, 0.0, now)
        self._apply_factor()
        self._requests.level = self._requests.capacity
        self._tokens.level = self._tokens.capacity

    # -- introspection ----------------------------------------------------------------------

    @property
    def factor(self) -> float:
        """The current fraction of the configured rate (1.0 when nothing was throttled)."""
        return self._factor

    @property
    def calibration(self) -> float:
        """Provider tokens per locally estimated token, as learned so far."""
        return self._calibration

    # -- the hot path -----------------------------------------------------------------------

    def charge_for(self, est_tokens: int) -> int:
        """The tokens to take for a request estimated locally at ``est_tokens``."""
        return max(1, round(est_tokens * self._calibration))

    def acquire(self, tokens: int) -> float:
        """Block until one request of ``tokens`` may be sent; returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self.clock.now()
                self._requests.refill(now)
                self._tokens.refill(now)
                wait = max(
                    self._paused_until - now,
                    self._requests.wait_for(1),
                    self._tokens.wait_for(tokens),
                )
                if wait <= 0:
                    self._requests.level -= 1
                    self._tokens.level -= tokens
                    return waited
            self.clock.sleep(wait)
            waited += wait

    def settle(self, charged: int, est_tokens: int, actual_tokens: int | None) -> None:
        """Correct the TPM bucket with the provider's count and update the calibration."""
        if actual_tokens is None or est_tokens <= 0:
            return
        with self._lock:
            self._tokens.level -= actual_tokens - charged
            ratio = actual_tokens / est_tokens
            self._calibration += self.CALIBRATION_ALPHA * (ratio - self._calibration)

    def refund(self, charged: int) -> None:
        """Give back the tokens of a request that the provider did not process."""
        with self._lock:
            self._tokens.level = min(self._tokens.capacity, self._tokens.level + charged)

    # -- adaptation -------------------------------------------------------------------------

    def on_success(self) -> None:
        with self._lock:
            if self._factor < 1.0:
                self._factor = min(1.0, self._factor + self.INCREASE)
                self._apply_factor()

    def on_throttle(self, retry_after_s: float | None) -> None:
        """A 429: slow down and let the provider's window reset before anyone sends again."""
        with self._lock:
            now = self.clock.now()
            self._factor = max(self.MIN_FACTOR, self._factor * self.DECREASE)
            self._apply_factor()
            pause = retry_after_s if retry_after_s is not None else 1.0
            self._paused_until = max(self._paused_until, now + pause)
            self._requests.refill(now)
            self._tokens.refill(now)
            # Drop any burst credit: after a 429 the provider's window is known to be full.
            self._requests.level = min(self._requests.level, 0.0)
            self._tokens.level = min(self._tokens.level, 0.0)

    def on_hint(self, remaining_requests: float | None, remaining_tokens: float | None,
                reset_s: float | None) -> None:
        """Pause until the provider's window resets when its headers say it is (nearly) empty."""
        if reset_s is None:
            return
        exhausted = (remaining_requests is not None and remaining_requests < 1) or (
            remaining_tokens is not None and remaining_tokens <= 0
        )
        if exhausted:
            with self._lock:
                self._paused_until = max(self._paused_until, self.clock.now() + reset_s)

    def _apply_factor(self) -> None:
        rpm = self.limits.requests_per_minute * self._factor
        tpm = self.limits.tokens_per_minute * self._factor
        self._requests.rate_per_s = rpm / 60.0
        self._requests.capacity = max(1.0, rpm / 60.0 * self.burst_s)
        self._tokens.rate_per_s = tpm / 60.0
        self._tokens.capacity = max(1.0, tpm / 60.0 * self.burst_s)
