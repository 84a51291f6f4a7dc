"""Progress lines from the embed stage: what each worker process is doing, every few seconds.

One :class:`ProgressReporter` per embed session (so per worker process and run). Batches report
their outcome as they finish; a daemon thread logs one line per interval while work goes on, and
a last line when the session closes::

    embedpipe progress host:4242: 5120 chunks embedded, 3 failed | 212 requests, 4 throttled
    (6s paused) | 61.2k tokens/min (98% of this worker's 62.5k limit), 1.2M in all | 16 batches
    in flight; 12 requests awaiting an answer, the oldest for 2s | ETA 4m10s

"Throttled" counts every slow-down the provider asked for, whatever its form: a 429 answer,
or rate headers saying its window is empty (a pause without a 429); "paused" is the wall time
the limiter held every sender. The requests awaiting an answer are those sent and not yet
answered, with the age of the oldest: a server that takes connections and never answers shows
there, long before any request finishes. The ETA divides this worker's share of the job's
tokens (known once the chunks to send are known) by its pace so far.

Beam's own metrics say the same at the end of a run; these lines are for watching a run live,
in the worker logs of Dataflow or Flink as much as on a terminal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from transforms.limits import RATE_HEADERS, Pauses
from transforms.types import OUTCOME_OK

log = logging.getLogger("embedpipe.progress")


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class ProgressReporter:
    """Thread-safe counters plus a background thread that logs them every ``interval_s``.

    ``awaiting`` reports the requests sent and not yet answered and the age of the oldest
    (:meth:`transforms.metered.InFlight.snapshot`); without it the line says none.
    """

    def __init__(self, worker: str, tokens_per_minute: float, interval_s: float,
                 awaiting: Callable[[], tuple[int, float]] | None = None) -> None:
        self.worker = worker
        self.tokens_per_minute = tokens_per_minute
        self.interval_s = interval_s
        self.awaiting = awaiting or (lambda: (0, 0.0))
        self._pauses = Pauses()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._embedded = self._failed = self._requests = self._throttled = 0
        self._tokens = 0
        self._in_flight = 0
        self._expected_tokens = 0  # this worker's share of the job, by the splitter's count
        self._done_tokens = 0
        self._started_at = self._window_start = time.monotonic()
        self._window_tokens = 0

    def started(self) -> None:
        with self._lock:
            self._in_flight += 1
            if self._thread is None:
                self._started_at = self._window_start = time.monotonic()
                self._thread = threading.Thread(target=self._loop, name="embedpipe-progress",
                                                daemon=True)
                self._thread.start()

    def expect(self, tokens: int) -> None:
        """This worker's expected share of the job's tokens (for the ETA)."""
        with self._lock:
            self._expected_tokens = max(self._expected_tokens, tokens)

    def finished(self, embedded: int, failed: int, usage: list, est_tokens: int = 0,
                 pauses: Pauses | None = None) -> None:
        """One batch done: its chunks, its usage rows, and the limiter's pauses since the last."""
        with self._lock:
            if pauses:
                self._pauses.merge(pauses)
            self._done_tokens += est_tokens
            self._in_flight -= 1
            self._embedded += embedded
            self._failed += failed
            self._requests += len(usage)
            self._throttled += sum(1 for u in usage if u.http_status == 429)
            tokens = sum(u.prompt_tokens for u in usage if u.outcome == OUTCOME_OK)
            self._tokens += tokens
            self._window_tokens += tokens

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            log.info("%s (done; rate over the whole run)", self.line(whole_run=True))

    def line(self, *, whole_run: bool = False) -> str:
        """The progress line; the rate is over the last interval, or the whole run."""
        with self._lock:
            now = time.monotonic()
            since, tokens = (
                (self._started_at, self._tokens) if whole_run
                else (self._window_start, self._window_tokens)
            )
            rate = tokens / max(1e-6, now - since) * 60.0
            self._window_start, self._window_tokens = now, 0
            share = rate / self.tokens_per_minute * 100 if self.tokens_per_minute else 0.0
            throttled = self._throttled + self._pauses.events.get(RATE_HEADERS, 0)
            paused = f" ({self._pauses.seconds:.0f}s paused)" if self._pauses.seconds >= 1 else ""
            return (
                f"embedpipe progress {self.worker}: {self._embedded} chunks embedded, "
                f"{self._failed} failed | {self._requests} requests, {throttled} throttled"
                f"{paused} | {_si(rate)} tokens/min ({share:.0f}% of this worker's "
                f"{_si(self.tokens_per_minute)} limit), {_si(self._tokens)} in all | "
                f"{self._in_flight} batches in flight; {self._awaiting()}{self._eta(now)}"
            )

    def _awaiting(self) -> str:
        n, oldest_s = self.awaiting()
        if not n:
            return "0 requests awaiting an answer"
        return (f"{n} request{'s' if n != 1 else ''} awaiting an answer, "
                f"the oldest for {int(oldest_s)}s")

    def _eta(self, now: float) -> str:
        """`` | ETA 3m05s`` from this worker's pace so far; empty until it can be estimated."""
        remaining = self._expected_tokens - self._done_tokens
        elapsed = now - self._started_at
        if remaining <= 0 or self._done_tokens <= 0 or elapsed <= 0:
            return ""
        seconds = int(remaining / (self._done_tokens / elapsed))
        return f" | ETA {seconds // 60}m{seconds % 60:02d}s"

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            log.info("%s", self.line())
