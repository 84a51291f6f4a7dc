"""The metered call: one logical request, admitted by the limiter, retried, and accounted for.

Each HTTP attempt of a request takes its share of the rate budget before it is sent
(:class:`~transforms.limits.RateLimiter`), and gives it back if the provider did not process it;
a 429 slows every sender of the process down, and the provider's tokens and rate headers
correct the budget after a success. Transient failures are tried again by the
:class:`~transforms.retry.RetryPolicy`, on the injected clock; every attempt, answered or not,
leaves one usage row (:mod:`transforms.usage`). What is not transient is raised to the caller,
classified: a per-input error to be bisected, a fatal one to abort on, or the last transient
error once the attempts are exhausted.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from transforms.errors import ProviderError, RateLimitedError, RetryableError
from transforms.limits import MONOTONIC, Clock, RateLimiter
from transforms.providers.base import EmbeddingResult
from transforms.retry import RetryPolicy
from transforms.types import UsageRecord
from transforms.usage import Attempt, UsageRows


class InFlight:
    """The HTTP requests sent and not yet answered: how many, and since when. Thread-safe.

    A server that accepts connections and never answers showed "0 requests" for ten minutes:
    requests are counted when they finish. This says what is waiting, for the progress lines.
    """

    def __init__(self, clock: Clock = MONOTONIC) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._sent: dict[int, float] = {}
        self._ids = itertools.count()

    @contextmanager
    def sending(self) -> Iterator[None]:
        """Around one HTTP attempt: counted from entry until it answers or fails."""
        with self._lock:
            token = next(self._ids)
            self._sent[token] = self.clock.now()
        try:
            yield
        finally:
            with self._lock:
                del self._sent[token]

    def snapshot(self) -> tuple[int, float]:
        """``(requests awaiting an answer, seconds the oldest has waited)``; ``(0, 0.0)`` if none."""
        with self._lock:
            if not self._sent:
                return 0, 0.0
            return len(self._sent), self.clock.now() - min(self._sent.values())


class MeteredCall:
    """Limiter + retry policy + usage rows around one ``send`` of a request. Thread-safe.

    One instance per session, shared by its threads (the limiter is what they share; the retry
    state is made fresh per call). ``describe`` turns an error into the text a usage row
    stores; the session passes one that redacts the API key.

    >>> metered = MeteredCall(limiter=limiter, retry=RetryPolicy(), rows=rows)  # doctest: +SKIP
    >>> result = metered(send, request_id="b1:0+16", n_inputs=16, est_tokens=2000,
    ...                  usage=rows_out)                                         # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        limiter: RateLimiter,
        retry: RetryPolicy,
        rows: UsageRows,
        clock: Clock = MONOTONIC,
        describe: Callable[[ProviderError], str] = ProviderError.describe,
    ) -> None:
        self.limiter = limiter
        self.retry = retry
        self.rows = rows
        self.clock = clock
        self.describe = describe
        self.in_flight = InFlight(clock)

    def __call__(
        self,
        send: Callable[[], EmbeddingResult],
        *,
        request_id: str,
        n_inputs: int,
        est_tokens: int,
        usage: list[UsageRecord],
    ) -> EmbeddingResult:
        """``send()`` until it answers, a non-transient error, or the last attempt.

        Appends one row per attempt to ``usage`` (also when it raises); attempt ``k`` is named
        ``<request_id>:<k>``. Raises the classified :class:`~transforms.errors.ProviderError`.
        """
        limiter, policy = self.limiter, self.retry
        for attempt in policy.retrying(sleep=self.clock.sleep):
            with attempt:
                number = attempt.retry_state.attempt_number
                charged = limiter.charge_for(est_tokens)
                limiter.acquire(charged)
                started_at = dt.datetime.now(dt.timezone.utc)
                t0 = self.clock.now()
                try:
                    with self.in_flight.sending():
                        result = send()
                except ProviderError as exc:
                    limiter.refund(charged)
                    if isinstance(exc, RateLimitedError):
                        limiter.on_throttle(exc.retry_after_s)
                    will_retry = isinstance(exc, RetryableError) and number < policy.max_attempts
                    usage.append(self.rows.failed(
                        self._attempt(request_id, n_inputs, number, started_at, t0), exc,
                        detail=self.describe(exc), will_retry=will_retry,
                    ))
                    raise
                self._settle(charged, est_tokens, result)
                usage.append(self.rows.answered(
                    self._attempt(request_id, n_inputs, number, started_at, t0), result))
                return result
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def _settle(self, charged: int, est_tokens: int, result: EmbeddingResult) -> None:
        """Correct the budget by what the provider counted and what its headers say is left."""
        limiter = self.limiter
        limiter.settle(
            charged, est_tokens, None if result.tokens_estimated else result.prompt_tokens)
        limiter.on_success()
        hint = result.rate_hint
        if hint is not None:
            reset_s = max(hint.reset_requests_s or 0, hint.reset_tokens_s or 0) or None
            limiter.on_hint(hint.remaining_requests, hint.remaining_tokens, reset_s)

    def _attempt(
        self, request_id: str, n_inputs: int, number: int, started_at: dt.datetime, t0: float
    ) -> Attempt:
        return Attempt(request_id=f"{request_id}:{number}", n_inputs=n_inputs, number=number,
                       started_at=started_at, latency_ms=(self.clock.now() - t0) * 1000.0)
