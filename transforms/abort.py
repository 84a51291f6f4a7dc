"""The abort flag: once a fatal answer says no request can succeed, nothing more is sent.

A bad key, an exhausted quota or an unknown model fails every request alike, so retrying or
bisecting would only burn time and budget. The first fatal answer sets the flag of the
process's embed session; every thread reads it before each request and turns what it has not
sent into ``aborted`` rejects, so the run still commits what it finished and exits 3.

A store that cannot be written (the output, or the cache) sets the flag too, with the kind
:data:`STORE`: then the answers would be paid for and lost, so sending stops just the same, but
the run commits nothing and exits 4 (the embed stage raises :class:`~transforms.errors.
StoreError` once the flag is set with that kind).
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

PROVIDER = "provider"  # a fatal provider answer: commit what was finished, exit 3
STORE = "store"  # the output or cache cannot be written: commit nothing, exit 4


class AbortFlag:
    """Set once, by the first reason given; read lock-free on every request. Thread-safe.

    The first message wins (later fatal answers are usually the same refusal, seen by other
    threads), and it is reported exactly once, by :meth:`report_once`, so the run's ``fatal``
    output holds one line however many requests were in flight.

    >>> flag = AbortFlag()
    >>> flag.set("HTTP 401: bad key"), flag.set("HTTP 403: later"), flag.message
    ('HTTP 401: bad key', 'HTTP 401: bad key', 'HTTP 401: bad key')
    >>> flag.report_once(), flag.report_once()
    ('HTTP 401: bad key', None)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._message: str | None = None
        self._kind: str | None = None
        self._reported = False

    @property
    def message(self) -> str | None:
        """Why the run aborted, or None while it has not."""
        return self._message

    @property
    def is_set(self) -> bool:
        return self._message is not None

    @property
    def kind(self) -> str | None:
        """:data:`PROVIDER` or :data:`STORE` once set; None while the run goes on."""
        return self._kind

    def set(self, message: str, kind: str = PROVIDER) -> str:
        """Abort with ``message`` (already redacted) unless already aborted; the kept reason."""
        with self._lock:
            if self._message is None:
                self._message = message
                self._kind = kind
                log.error("embedpipe: aborting the run: %s", message)
            return self._message

    def report_once(self) -> str | None:
        """The reason, the first time it is asked for after the flag was set; else None."""
        with self._lock:
            if self._message is None or self._reported:
                return None
            self._reported = True
            return self._message
