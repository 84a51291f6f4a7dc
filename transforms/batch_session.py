"""Batch mode's session: requests become lines of OpenAI batches, answered within hours.

``provider.mode: batch`` swaps the process's :class:`~transforms.embed_session.EmbedSession` for
a :class:`BatchSession` with the same face to the embed stage (``submit(request)`` returns a
future of a :class:`~transforms.embed_session.BatchOutcome`, plus ``flush()`` and ``window``),
so cache probes, twin claims and packing are the online stage's own. Behind it:

- **lines and batches.** Each submitted request is one request line (its body exactly the online
  one). Lines gather in the *open batch* until one more would pass a cap (``batch_max_inputs``
  inputs, 50,000 lines, 200 MB), or until the stage flushes (end of a bundle, a full window);
  the open batch is then uploaded (``POST /files``) and created (``POST /batches``) with
  ``metadata`` naming the output, the run and the part.
- **one poller thread** asks every open batch its state each ``batch_poll_interval_s``, logs the
  batches by state, and harvests a batch that ended: output and error files are read, results
  matched by ``custom_id``, each answer checked and re-ordered exactly as online
  (:meth:`~transforms.providers.base.Provider.parse_response`), written to the cache at once.
- **every state and line outcome.** ``completed``/``expired``/``cancelled`` batches give what
  they finished; lines answered 5xx or ``batch_expired`` (or left undone) go into a later batch,
  up to ``retry.max_attempts``; a line answered 400 (or named by a ``failed`` batch's errors) is
  embedded *online*, where :mod:`transforms.bisection` isolates the refused input as
  ``provider_rejected`` in minutes instead of days of batch round trips; innocent lines of a
  failed batch are resubmitted; 401/403/quota, a batch failed for a reason that names no line,
  or a batch cancelled by someone else abort the run (exit 3), and the run cancels its own
  batches still open, so none is left running.
- **resume.** Before its first line the session lists the organisation's batches
  (``GET /batches``) and re-attaches to those whose ``metadata`` names this output (the crash
  between creating a batch and writing anything down included: the batch *is* the record) and
  that the committed manifest does not list as harvested. Their input files say which texts they
  hold; a chunk whose text is in one waits for that batch instead of being sent again.

Usage: one row per line result (``mode: batch``, ``batch_id``), with the tokens of the line's
body, so the ``ok`` rows' ``prompt_tokens`` are what the provider bills. Online fallbacks
(bisection) are ordinary online rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import httpx
import numpy as np

from transforms.abort import AbortFlag
from transforms.batch_api import BatchApi
from transforms.batch_harvest import OUTPUT_KEY, PART_KEY, RUN_KEY, TOKEN_LIMIT, Harvester
from transforms.batch_lines import MAX_FILE_BYTES, MAX_LINES, request_line
from transforms.batch_records import Job, Line, Pending
from transforms.embed_session import BatchOutcome, EmbedSession, EmbedSettings
from transforms.errors import FatalProviderError, ProviderError
from transforms.limits import MONOTONIC, Clock
from transforms.providers.openai import OpenAIConfig
from transforms.types import ABORTED, RETRIES_EXHAUSTED, Chunk, RequestBatch, UsageRecord

log = logging.getLogger(__name__)

__all__ = ["OUTPUT_KEY", "PART_KEY", "RUN_KEY", "TOKEN_LIMIT", "BatchSession"]


class BatchSession(Harvester):
    """The per-process batch-mode machinery for one run; see the module docstring.

    Wraps an :class:`EmbedSession` for what online and batch modes share: the cache, the abort
    flag, the store guard, the provider and the online path that bisects refused lines.
    """

    def __init__(
        self,
        settings: EmbedSettings,
        *,
        api_key: str | None,
        clock: Clock = MONOTONIC,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.online = EmbedSession(settings, api_key=api_key, clock=clock, transport=transport)
        self.cache = self.online.cache
        self.provider = self.online.provider
        self.clock = clock
        p = settings.provider
        if not isinstance(p, OpenAIConfig):  # the config refuses batch mode for other kinds
            raise TypeError(f"batch mode needs provider.kind openai, not {p.kind}")
        self.cfg = p
        self.api = BatchApi(self.provider, self.online._client, api_key, settings.retry,
                            sleep=sleep)
        self.max_inputs = p.batch_max_inputs
        # Requests the stage may keep waiting: enough to fill the open batches.
        self.window = p.batch_max_open * max(1, -(-p.batch_max_inputs // p.max_inputs_per_request))
        self._lock = threading.RLock()
        self._seal_lock = threading.Lock()
        self._open: list[Line] = []
        self._open_inputs = 0
        self._open_bytes = 0
        self._jobs: dict[str, Job] = {}
        self._claims: dict[str, list[tuple[Pending, Chunk]]] = {}  # sha -> waiting on an attached
        self._attached_shas: dict[str, str] = {}  # sha -> attached batch id
        self._ready: dict[str, np.ndarray] = {}  # vectors harvested from attached batches
        self._seq = 0
        self._parts = 0
        self.created: list[str] = []
        self.reattached: list[str] = []
        self._deferred: list[Line] = []
        self._started = False
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="embedpipe-batch-poller",
                                        daemon=True)
        self._last_progress = 0.0
        self._line_rows: dict[str, UsageRecord] = {}
        self._row_of: dict[str, str] = {}

    # -- the stage's face --------------------------------------------------------------------

    @property
    def abort(self) -> AbortFlag:
        return self.online.abort

    def take_usage(self) -> list[UsageRecord]:
        """Usage rows of re-attached lines that no chunk of this process took (``_take_rows``).

        Billed all the same (their vectors went to the cache), so a single-process run reports
        them; with several processes each would, so none does (``docs/batch.md`` says so).
        """
        if self.settings.workers > 1:
            return []
        with self._lock:
            rows = list(self._line_rows.values())
            self._line_rows.clear()
        return rows

    def submit(self, request: RequestBatch) -> Future[BatchOutcome]:
        """Queue ``request`` as a line of the open batch (or wait for a re-attached batch)."""
        self._start()
        future: Future[BatchOutcome] = Future()
        pending = Pending(request, future, left=len(request.chunks))
        aborted = self.abort.message
        if aborted is not None:
            self._settle_rejects(pending, request.chunks, ABORTED, aborted, 0)
            return future
        new: list[Chunk] = []
        ready: list[tuple[Chunk, np.ndarray]] = []
        with self._lock:
            for chunk in request.chunks:
                vector = self._ready.get(chunk.content_sha256)
                if vector is not None:
                    ready.append((chunk, vector))
                elif chunk.content_sha256 in self._attached_shas:
                    self._claims.setdefault(chunk.content_sha256, []).append((pending, chunk))
                else:
                    new.append(chunk)
        if ready:
            self._take_rows(pending, [c for c, _ in ready])
            self._settle_vectors(pending, [c for c, _ in ready], np.stack([v for _, v in ready]))
        if new:
            self._add(Line(self._custom_id(request), tuple(new), pending))
        return future

    def flush(self) -> None:
        """Seal the open batch now: the stage is about to wait for what it submitted."""
        self._seal()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._poller.is_alive():
            self._poller.join(timeout=30)
        self.online.close()

    # -- lines and batches -------------------------------------------------------------------

    def _custom_id(self, request: RequestBatch) -> str:
        with self._lock:
            self._seq += 1
            return f"r{self._seq}-{request.batch_id[:16]}"

    def _body(self, chunks: Sequence[Chunk]) -> dict[str, object]:
        request = self.provider.build_request([c.text for c in chunks], None)
        assert request.json is not None
        return dict(request.json)

    def _add(self, line: Line) -> None:
        size = len(request_line(line.custom_id, self._body(line.chunks)))
        with self._lock:
            full = self._open and (self._open_inputs + len(line.chunks) > self.max_inputs
                                   or len(self._open) + 1 > MAX_LINES
                                   or self._open_bytes + size > MAX_FILE_BYTES)
        if full:
            self._seal()
        with self._lock:
            self._open.append(line)
            self._open_inputs += len(line.chunks)
            self._open_bytes += size

    def _seal(self) -> None:
        """Upload the open lines and create their batch; on failure they end as rejects."""
        with self._seal_lock:
            with self._lock:
                lines, self._open = self._open, []
                self._open_inputs = self._open_bytes = 0
                self._parts += 1
                part = self._parts
            if not lines:
                return
            aborted = self.abort.message
            if aborted is not None:
                for line in lines:
                    self._settle_rejects(line.pending, line.chunks, ABORTED, aborted, 0)
                return
            data = b"".join(request_line(line.custom_id, self._body(line.chunks))
                            for line in lines)
            metadata = {OUTPUT_KEY: self.settings.batch_key or "", RUN_KEY: self.settings.run_id,
                        PART_KEY: f"{self.online.worker}/{part}"}
            try:
                file_id = self.api.upload(f"embedpipe-{self.settings.run_id}-{part}.jsonl", data)
                info = self.api.create(file_id, metadata,
                                       self.cfg.batch_completion_window)
            except ProviderError as exc:
                self._failed_to_submit(lines, exc)
                return
            job = Job(info=info, lines={line.custom_id: line for line in lines},
                       started=self.clock.now())
            with self._lock:
                self._jobs[info.id] = job
                self.created.append(info.id)
            log.info("batch %s created: %d requests, %d inputs (%s)", info.id, len(lines),
                     sum(len(line.chunks) for line in lines), self.online.worker)
            self._wake.set()

    def _failed_to_submit(self, lines: list[Line], exc: ProviderError) -> None:
        detail = self.online._describe(exc)
        if isinstance(exc, FatalProviderError):
            message = self.abort.set(self.online._redact(
                f"the provider refused the run: {detail}"))
            for line in lines:
                self._settle_rejects(line.pending, line.chunks, ABORTED, message, 1)
            self._abort_all()
            return
        attempts = self.settings.retry.max_attempts
        for line in lines:
            self._settle_rejects(line.pending, line.chunks, RETRIES_EXHAUSTED,
                                 f"could not submit the batch after {attempts} attempts: {detail}",
                                 attempts)

    # -- polling -----------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        self._reattach()
        self._poller.start()

    def _poll_loop(self) -> None:
        interval = self.cfg.batch_poll_interval_s
        while not self._closed.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                self._poll_once()
            except Exception:  # never let the poller die silently: the stage would wait forever
                log.exception("batch poller failed; aborting the run")
                self.abort.set("the batch poller failed unexpectedly (see the log)")
                self._abort_all()

    def _poll_once(self) -> None:
        if self.abort.is_set:
            self._abort_all()
        with self._lock:
            jobs = list(self._jobs.values())
            waiting = bool(self._deferred) and not any(j.attached is None for j in jobs)
            deferred, self._deferred = (self._deferred, []) if waiting else ([], self._deferred)
        for line in deferred:  # no batch of ours left to wait for: resubmit them now
            self._add(line)
        if deferred:
            self._seal()
        for job in jobs:
            try:
                info = self.api.get(job.info.id)
            except ProviderError as exc:
                if self.unreadable(job, exc):
                    with self._lock:
                        self._jobs.pop(job.info.id, None)
                    self._abort_all()
                continue
            job.unreadable_since = None
            if info.status != job.info.status:
                log.info("batch %s: %s (%d/%d requests done, %d failed)", info.id, info.status,
                         info.completed, info.total, info.failed)
            job.info = info
            if info.done:
                self._harvest(job)
        self._progress()

    def _progress(self) -> None:
        interval = self.settings.progress_interval_s
        now = self.clock.now()
        if interval is None or now - self._last_progress < interval:
            return
        self._last_progress = now
        with self._lock:
            jobs = list(self._jobs.values())
        states = Counter(job.info.status for job in jobs)
        done = sum(job.info.completed for job in jobs)
        total = sum(job.info.total for job in jobs)
        log.info("[%s] batches: %s open (%s), requests %d/%d done; %d created, %d re-attached",
                 self.online.worker, len(jobs),
                 ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none", done, total,
                 len(self.created), len(self.reattached))

    def _abort_all(self) -> None:
        """The run is aborted: open lines end now, our open batches are cancelled."""
        message = self.abort.message or "the run was aborted"
        with self._lock:
            lines, self._open = self._open, []
            jobs = [j for j in self._jobs.values() if not j.info.done]
        for line in lines:
            self._settle_rejects(line.pending, line.chunks, ABORTED, message, 0)
        for job in jobs:
            if job.attached is not None or job.cancelled_by_us:
                if job.attached is not None:
                    self._release_claims(job, message)
                continue
            job.cancelled_by_us = True
            try:
                job.info = self.api.cancel(job.info.id)
                log.warning("batch %s cancelled: %s", job.info.id, message)
            except ProviderError as exc:
                # Ended meanwhile (the cancel answers 409): harvested at the next poll, what it
                # finished kept. Otherwise its lines end as rejects now.
                log.warning("batch %s could not be cancelled: %s", job.info.id,
                            self.online._describe(exc))
                if exc.http_status != 409:
                    for line in job.lines.values():
                        self._settle_rejects(line.pending, line.chunks, ABORTED, message, 1)
                    job.lines.clear()
        self._wake.set()
