"""The per-process session registry: one embedding session per (process, run).

Deliberate module-level state: the session is created lazily by the first DoFn that needs it and
closed when the last one is torn down, so every DoFn instance and thread of a worker process
shares one rate budget, one HTTP client and one cache index. Keyed by run id so that several
runs in one process (tests, notebooks) never share a limiter or an abort flag.

``provider.mode`` picks the kind of session: :class:`~transforms.embed_session.EmbedSession`
(online) or :class:`~transforms.batch_session.BatchSession` (OpenAI's Batch API), which show the
stage the same face: ``submit``, ``flush``, ``window``, ``take_usage``, ``cache``, ``close``.
"""

from __future__ import annotations

import os
import threading

from transforms.batch_session import BatchSession
from transforms.embed_session import EmbedSession, EmbedSettings

#: What the embed stage holds: either kind of session.
Session = EmbedSession | BatchSession

_SESSIONS: dict[str, tuple[Session, int]] = {}
_SESSIONS_LOCK = threading.Lock()


def acquire_session(settings: EmbedSettings) -> Session:
    """The process's session for ``settings.run_id``, created on first use; pair with release.

    ``provider.mode: batch`` gets a :class:`~transforms.batch_session.BatchSession`, which has
    the same face to the stage (``submit``, ``flush``, ``window``, ``cache``, ``close``).
    """
    with _SESSIONS_LOCK:
        session, users = _SESSIONS.get(settings.run_id, (None, 0))
        if session is None:
            key_env = settings.provider.api_key_env
            api_key = os.environ.get(key_env) if key_env else None
            session = (BatchSession(settings, api_key=api_key)
                       if settings.provider.mode == "batch"
                       else EmbedSession(settings, api_key=api_key))
        _SESSIONS[settings.run_id] = (session, users + 1)
        return session


def release_session(settings: EmbedSettings) -> None:
    """Drop one user of the run's session; the last one closes it."""
    with _SESSIONS_LOCK:
        session, users = _SESSIONS.get(settings.run_id, (None, 0))
        if session is None:
            return
        if users <= 1:
            del _SESSIONS[settings.run_id]
            session.close()
        else:
            _SESSIONS[settings.run_id] = (session, users - 1)
