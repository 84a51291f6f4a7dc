"""The abort flag: once a fatal answer says no request can succeed, nothing more is sent.

A bad key, an exhausted quota or an unknown model fails every request alike, so retrying or
bisecting would only burn time and budget. The first fatal answer sets the flag of the
process's embed session; every thread reads it before each request and turns what it has not
sent into ``aborted`` rejects, so the run still commits what it finished and exits 3.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


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
        self._reported = False

    @property
    def message(self) -> str | None:
        """Why the run aborted, or None while it has not."""
        return self._message

    @property
    def is_set(self) -> bool:
        return self._message is not None

    def set(self, message: str) -> str:
        """Abort with ``message`` (already redacted) unless already aborted; the kept reason."""
        with self._lock:
            if self._message is None:
                self._message = message
                log.error("embedpipe: aborting the run: %s", message)
            return self._message

    def report_once(self) -> str | None:
        """The reason, the first time it is asked for after the flag was set; else None."""
        with self._lock:
            if self._message is None or self._reported:
                return None
            self._reported = True
            return self._message
