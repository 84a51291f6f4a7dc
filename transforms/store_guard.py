"""Writes to the output and the cache during the embed stage, retried briefly, then fatal.

Every answer of the embedding API is paid for; it is only worth anything once it is kept. When
object storage dies mid-run, going on sending means paying for answers that can no longer be
written (a probe of the issue saw 88 requests in three minutes, every cache write failing, and
nothing kept). So a write that still fails after a few attempts over a few seconds sets the run's
abort flag with the kind :data:`~transforms.abort.STORE`: nothing more is sent, and the embed
stage raises :class:`~transforms.errors.StoreError` so the run commits nothing and exits 4 with
a message naming the store.

Two stores are watched: the cache, through its own per-request writes, and the output, through
an empty marker file rewritten after every answered request under the run's
``_temporary/RUN_ID/`` folder (the Parquet writers buffer a whole file before an object store
sees a byte, so their own failures come too late to save anything; one empty PUT per request
costs little beside the request itself). The commit step removes that folder with the rest of
the run's temporary files. While a write is failing, no thread sends a new request
(:meth:`StoreGuard.hold`): the answers already paid for are all the store could lose.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from transforms.abort import STORE, AbortFlag
from transforms.errors import redact
from transforms.limits import Clock

log = logging.getLogger(__name__)

ATTEMPTS = 3  # a write is tried at most this many times before the store is declared dead
WAITS_S = (0.5, 1.0)  # between attempts (an attempt on S3 takes seconds of botocore retries too)
GIVE_UP_S = 4.0  # the store is dead once writes have failed this long, none succeeding since
HOLD_POLL_S = 0.05  # how often a held sender looks whether the store recovered or died


class StoreGuard:
    """Runs store writes with a short retry; on lasting failure, aborts the run (kind STORE).

    Thread-safe. The store is declared dead when one write failed :data:`ATTEMPTS` times, or
    when writes (of any thread) have failed for :data:`GIVE_UP_S` seconds with none succeeding
    since and this write failed twice: with every thread failing at once, the run stops in a few
    seconds however slowly each attempt fails. Once dead, no thread tries again.
    """

    def __init__(self, abort: AbortFlag, clock: Clock, secret: str | None = None) -> None:
        self._abort = abort
        self._clock = clock
        self._secret = secret
        self._lock = threading.Lock()
        self._probed_at: float | None = None
        self._failing_since: float | None = None

    def write(self, what: str, url: str, action: Callable[[], object]) -> bool:
        """Run ``action`` (a write to ``what`` at ``url``); False if the store is dead."""
        error: Exception | None = None
        for attempt in range(ATTEMPTS):
            if self._abort.kind == STORE:
                return False
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - any failure of the store counts
                error = exc
                log.warning("embedpipe: writing to the %s at %s failed (attempt %d of %d): %s: %s",
                            what, url, attempt + 1, ATTEMPTS, type(exc).__name__, exc)
            else:
                with self._lock:
                    self._failing_since = None
                return True
            with self._lock:
                now = self._clock.now()
                if self._failing_since is None:
                    self._failing_since = now
                failing_for = now - self._failing_since
            if attempt >= 1 and failing_for >= GIVE_UP_S:
                break
            if attempt < len(WAITS_S):
                self._clock.sleep(WAITS_S[attempt])
        self._abort.set(redact(
            f"the {what} at {url} cannot be written ({type(error).__name__}: {error}); the run "
            "stopped sending and commits nothing. Check that the store is up and writable "
            "(credentials, space, permissions) and run again: what was cached before is kept",
            self._secret), kind=STORE)
        return False

    def hold(self) -> None:
        """Wait while a store write is failing: until one succeeds, or the store is dead."""
        while self._failing_since is not None and self._abort.kind != STORE:
            self._clock.sleep(HOLD_POLL_S)
