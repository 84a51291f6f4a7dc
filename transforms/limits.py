"""Client-side rate limiting: requests-per-minute and tokens-per-minute token buckets.

One :class:`RateLimiter` exists per worker process (see :mod:`transforms.embed_session`) and is shared by
every thread and DoFn instance in it, so the budget is not multiplied by the thread count. With N
worker processes each one is built with ``1/N`` of the configured limits.

The model, in three parts:

1. **Buckets.** Each request takes one unit from the RPM bucket and its estimated tokens from the
   TPM bucket, waiting until both have enough. Buckets hold ``burst_s`` seconds of budget, so a
   cold start cannot send a minute's worth at once. A request larger than the TPM bucket is let
   through when the bucket is full and drives it negative: the long-run rate stays exact.
2. **Calibration.** The provider counts tokens with its own tokenizer, or in characters
   (infinity). After each answer the bucket is charged the difference between the provider's
   ``prompt_tokens`` and what was taken; the first believable ``actual / estimated`` sets the
   scale of later estimates outright, later ones move an exponential moving average. The embed
   session sends its first request alone (:class:`~transforms.bisection.RequestCap`), so that
   first answer arrives before anything else is admitted at a guessed scale.
3. **Adaptation (AIMD).** A 429 halves the effective rate and pauses every sender for the
   ``Retry-After`` the provider asked; each success grows the rate back additively toward the
   configured limit. ``x-ratelimit-remaining-*`` headers near zero pause until their reset.

Every wait is bounded by ``max_pause_s`` (``retry.max_wait_s``): a ``Retry-After: 3600``, a
rate window said to reset in an hour, or the debt of one answer whose usage claims 10^12
tokens each froze a run for the whole period. A pause asked for is shortened to the bound, the
bucket's debt never exceeds the bound's worth of budget, and a usage count that no unit of
text can explain (:meth:`RateLimiter.plausible`) is not trusted at all. Each pause is counted in
:class:`Pauses`, by cause, for the progress lines and the run summary.

Every method takes its time from an injected :class:`Clock`, so tests run on a fake clock.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


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


#: Causes of a pause, as :class:`Pauses` counts them.
RETRY_AFTER = "retry_after"  # a 429 (with or without Retry-After)
RATE_HEADERS = "rate_headers"  # x-ratelimit-remaining-* at zero on an answer
UNTRUSTED_USAGE = "untrusted_usage"  # an answer whose usage was not believed (no pause)
PAUSE_CAUSES = (RETRY_AFTER, RATE_HEADERS, UNTRUSTED_USAGE)


@dataclass
class Pauses:
    """What slowed the limiter down: events by cause, and the seconds every sender was held.

    ``seconds`` counts wall time once, however many pauses overlapped.
    """

    events: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, cause: str, seconds: float = 0.0) -> None:
        self.events[cause] = self.events.get(cause, 0) + 1
        self.seconds += seconds

    def merge(self, other: Pauses) -> None:
        for cause, n in other.events.items():
            self.events[cause] = self.events.get(cause, 0) + n
        self.seconds += other.seconds

    def __bool__(self) -> bool:
        return bool(self.events) or self.seconds > 0


class RateLimiter:
    """RPM + TPM buckets with calibration and AIMD adaptation; thread-safe.

    ``max_pause_s`` bounds every wait the limiter imposes (see the module docstring); the embed
    session passes ``retry.max_wait_s``.
    """

    #: Fraction of the configured rate kept after a 429 (multiplicative decrease).
    DECREASE = 0.5
    #: Fraction of the configured rate regained per successful request (additive increase).
    INCREASE = 0.02
    #: The lowest fraction of the configured rate adaptation may fall to.
    MIN_FACTOR = 0.05
    #: Weight of the newest observation in the calibration average.
    CALIBRATION_ALPHA = 0.2
    #: A usage count more than this many times the local estimate, or less than its inverse,
    #: is not believed: no unit of text (characters, bytes, word pieces) is that far from
    #: cl100k. Above ``UNTRUSTED_FLOOR`` tokens only: a tiny request padded to the model's
    #: length (8 inputs of 512) is a large ratio and a harmless count.
    UNTRUSTED_RATIO = 50.0
    UNTRUSTED_FLOOR = 8192

    def __init__(
        self,
        limits: RateLimits,
        *,
        clock: Clock = MONOTONIC,
        burst_s: float = 1.0,
        max_pause_s: float = 120.0,
    ) -> None:
        self.limits = limits
        self.clock = clock
        self.burst_s = burst_s
        self.max_pause_s = max_pause_s
        now = clock.now()
        self._lock = threading.Lock()
        self._factor = 1.0
        self._calibration = 1.0
        self._calibrated = False
        self._paused_until = now
        self._pauses = Pauses()  # not yet reported (see take_pauses)
        self._warned_untrusted = False
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

    def take_pauses(self) -> Pauses:
        """The pauses since the last call, handed over once (so a sum over callers is exact)."""
        with self._lock:
            pauses, self._pauses = self._pauses, Pauses()
            return pauses

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
                    self._bound_debt()
                    return waited
            self.clock.sleep(wait)
            waited += wait

    def plausible(self, est_tokens: int, actual_tokens: int) -> bool:
        """Whether a usage count can be believed for a request estimated at ``est_tokens``.

        Zero is "not counted" (some servers always say 0); a count more than
        ``UNTRUSTED_RATIO`` times the estimate (above ``UNTRUSTED_FLOOR``) or less than its
        inverse is no unit of text, but a bug or a placeholder: believed, one answer of 10^12
        drained the budget for hours.
        """
        if actual_tokens <= 0 or est_tokens <= 0:
            return False
        ratio = actual_tokens / est_tokens
        if ratio < 1.0 / self.UNTRUSTED_RATIO:
            return False
        return ratio <= self.UNTRUSTED_RATIO or actual_tokens <= self.UNTRUSTED_FLOOR

    def settle(self, charged: int, est_tokens: int, actual_tokens: int | None) -> None:
        """Correct the TPM bucket with the provider's count and update the calibration.

        The first believable count sets the calibration outright (a provider counting in
        characters is 4x from its first answer, not after a dozen 429s); later ones move a
        moving average. An unbelievable count changes nothing and is counted and logged once.
        """
        if actual_tokens is None or est_tokens <= 0:
            return
        if not self.plausible(est_tokens, actual_tokens):
            if actual_tokens > 0:
                self._untrusted(est_tokens, actual_tokens)
            return
        with self._lock:
            self._tokens.level -= actual_tokens - charged
            self._bound_debt()
            ratio = actual_tokens / est_tokens
            if self._calibrated:
                self._calibration += self.CALIBRATION_ALPHA * (ratio - self._calibration)
            else:
                self._calibration, self._calibrated = ratio, True

    def _untrusted(self, est_tokens: int, actual_tokens: int) -> None:
        with self._lock:
            self._pauses.add(UNTRUSTED_USAGE)
            warn, self._warned_untrusted = not self._warned_untrusted, True
        if warn:
            log.warning(
                "embedpipe: the provider reported usage.prompt_tokens=%d for a request estimated "
                "at %d tokens (%.3gx); a count that far off is not trusted for rate limiting "
                "(this and any like it; usage/ keeps what the provider said)",
                actual_tokens, est_tokens, actual_tokens / est_tokens)

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
        """A 429: slow down and let the provider's window reset before anyone sends again.

        The pause is what the provider asked (1 s if nothing), at most ``max_pause_s``.
        """
        with self._lock:
            now = self.clock.now()
            self._factor = max(self.MIN_FACTOR, self._factor * self.DECREASE)
            self._apply_factor()
            pause = retry_after_s if retry_after_s is not None else 1.0
            self._pause(RETRY_AFTER, now, pause)
            self._requests.refill(now)
            self._tokens.refill(now)
            # Drop any burst credit: after a 429 the provider's window is known to be full.
            self._requests.level = min(self._requests.level, 0.0)
            self._tokens.level = min(self._tokens.level, 0.0)

    def on_hint(self, remaining_requests: float | None, remaining_tokens: float | None,
                reset_s: float | None) -> None:
        """Pause until the provider's window resets when its headers say it is (nearly) empty.

        At most ``max_pause_s``: a reset an hour away (or a Unix timestamp read as seconds) is
        the provider's business; the next answer says again what is left.
        """
        if reset_s is None:
            return
        exhausted = (remaining_requests is not None and remaining_requests < 1) or (
            remaining_tokens is not None and remaining_tokens <= 0
        )
        if exhausted:
            with self._lock:
                self._pause(RATE_HEADERS, self.clock.now(), reset_s)

    def _pause(self, cause: str, now: float, pause_s: float) -> None:
        """Hold every sender for ``pause_s`` (bounded), counting it; the caller holds the lock."""
        until = now + max(0.0, min(pause_s, self.max_pause_s))
        added = until - max(self._paused_until, now)
        if added > 0:
            self._paused_until = until
            self._pauses.add(cause, added)
        elif cause == RETRY_AFTER:
            self._pauses.add(cause)  # inside a pause already asked for: counted, not extended

    def _bound_debt(self) -> None:
        """Never owe the TPM bucket more than ``max_pause_s`` of budget; the caller holds the lock.

        A request larger than the whole bucket still pays what it cost, up to that bound: the
        long-run rate stays exact for any request a provider could take within its own limits.
        """
        floor = -self._tokens.rate_per_s * self.max_pause_s
        self._tokens.level = max(self._tokens.level, floor)

    def _apply_factor(self) -> None:
        rpm = self.limits.requests_per_minute * self._factor
        tpm = self.limits.tokens_per_minute * self._factor
        self._requests.rate_per_s = rpm / 60.0
        self._requests.capacity = max(1.0, rpm / 60.0 * self.burst_s)
        self._tokens.rate_per_s = tpm / 60.0
        self._tokens.capacity = max(1.0, tpm / 60.0 * self.burst_s)
