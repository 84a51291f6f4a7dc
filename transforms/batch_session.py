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

import datetime as dt
import functools
import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import fsspec
import httpx
import numpy as np

from transforms.abort import STORE, AbortFlag
from transforms.batch_api import TERMINAL, BatchApi, BatchInfo
from transforms.batch_lines import (
    MAX_FILE_BYTES,
    MAX_LINES,
    LineResult,
    request_inputs,
    request_line,
    result_lines,
)
from transforms.embed_session import BatchOutcome, EmbedSession, EmbedSettings, _rejects
from transforms.errors import (
    FatalProviderError,
    MalformedResponseError,
    ProviderError,
    RetryableError,
)
from transforms.limits import MONOTONIC, Clock
from transforms.providers.base import check_vectors
from transforms.providers.openai import OpenAIConfig
from transforms.types import (
    ABORTED,
    OUTCOME_FAILED,
    RETRIES_EXHAUSTED,
    Chunk,
    EmbeddedBatch,
    RequestBatch,
    UsageRecord,
)
from transforms.usage import Attempt

log = logging.getLogger(__name__)

#: The ``metadata`` keys that tie a batch to its output, run and part.
OUTPUT_KEY, RUN_KEY, PART_KEY = "embedpipe_output", "embedpipe_run", "embedpipe_part"
#: A ``failed`` batch's error code that means "too many tokens queued": wait, then resubmit.
TOKEN_LIMIT = "token_limit_exceeded"


@dataclass(eq=False)
class _Pending:
    """One request the stage submitted: settled chunk by chunk, resolved when none is left."""

    request: RequestBatch
    future: Future[BatchOutcome]
    left: int
    outcome: BatchOutcome = field(default_factory=BatchOutcome)


@dataclass(eq=False)
class _Line:
    """A request line: the chunks of one submitted request not already in an earlier batch."""

    custom_id: str
    chunks: tuple[Chunk, ...]
    pending: _Pending
    attempt: int = 1


@dataclass(eq=False)
class _Job:
    """A batch this process waits for: its own lines, or (re-attached) the texts of each line."""

    info: BatchInfo
    lines: dict[str, _Line] = field(default_factory=dict)
    attached: dict[str, list[str]] | None = None  # custom_id -> content sha256 per input
    started: float = 0.0  # when it was created (or found), on the session's clock
    cancelled_by_us: bool = False


class BatchSession:
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
        self._open: list[_Line] = []
        self._open_inputs = 0
        self._open_bytes = 0
        self._jobs: dict[str, _Job] = {}
        self._claims: dict[str, list[tuple[_Pending, Chunk]]] = {}  # sha -> waiting on an attached
        self._attached_shas: dict[str, str] = {}  # sha -> attached batch id
        self._ready: dict[str, np.ndarray] = {}  # vectors harvested from attached batches
        self._seq = 0
        self._parts = 0
        self.created: list[str] = []
        self.reattached: list[str] = []
        self._states: Counter[str] = Counter()
        self._started = False
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="embedpipe-batch-poller",
                                        daemon=True)
        self._last_progress = 0.0
        self._orphan_usage: list[UsageRecord] = []  # rows of re-attached lines, not yet emitted

    # -- the stage's face --------------------------------------------------------------------

    @property
    def abort(self) -> AbortFlag:
        return self.online.abort

    def take_usage(self) -> list[UsageRecord]:
        """Usage rows of re-attached lines no request has carried out yet (see ``_settled``)."""
        with self._lock:
            rows, self._orphan_usage = self._orphan_usage, []
        return rows

    def submit(self, request: RequestBatch) -> Future[BatchOutcome]:
        """Queue ``request`` as a line of the open batch (or wait for a re-attached batch)."""
        self._start()
        future: Future[BatchOutcome] = Future()
        pending = _Pending(request, future, left=len(request.chunks))
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
            self._settle_vectors(pending, [c for c, _ in ready], np.stack([v for _, v in ready]))
        if new:
            self._add(_Line(self._custom_id(request), tuple(new), pending))
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

    def _add(self, line: _Line) -> None:
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
            job = _Job(info=info, lines={line.custom_id: line for line in lines},
                       started=self.clock.now())
            with self._lock:
                self._jobs[info.id] = job
                self.created.append(info.id)
            log.info("batch %s created: %d requests, %d inputs (%s)", info.id, len(lines),
                     sum(len(line.chunks) for line in lines), self.online.worker)
            self._wake.set()

    def _failed_to_submit(self, lines: list[_Line], exc: ProviderError) -> None:
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
        for job in list(self._jobs.values()):
            try:
                info = self.api.get(job.info.id)
            except FatalProviderError as exc:
                self.abort.set(self.online._redact(
                    f"the provider refused the run: {self.online._describe(exc)}"))
                self._abort_all()
                return
            except RetryableError as exc:
                log.warning("batch %s: no state this time (%s); asking again later",
                            job.info.id, self.online._describe(exc))
                continue
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
            except ProviderError as exc:  # it can still finish; its lines end as rejects then
                log.warning("batch %s could not be cancelled: %s", job.info.id,
                            self.online._describe(exc))
                for line in job.lines.values():
                    self._settle_rejects(line.pending, line.chunks, ABORTED, message, 1)
                job.lines.clear()
        self._wake.set()

    # -- harvesting --------------------------------------------------------------------------

    def _results(self, info: BatchInfo) -> dict[str, LineResult]:
        results: dict[str, LineResult] = {}
        for file_id in (info.output_file_id, info.error_file_id):
            if file_id:
                for result in result_lines(self.api.content(file_id), source=file_id):
                    results[result.custom_id] = result
        return results

    def _harvest(self, job: _Job) -> None:
        """Settle every line of a batch that ended, in whatever state."""
        info = job.info
        try:
            results = self._results(info)
        except ProviderError as exc:
            # The files cannot be read now: ask again at the next poll.
            log.warning("batch %s: its results cannot be read yet (%s)", info.id,
                        self.online._describe(exc))
            return
        with self._lock:
            self._jobs.pop(info.id, None)
        if job.attached is not None:
            self._harvest_attached(job, results)
            return
        named_lines = self._lines_named_by_errors(job)
        requeue: list[_Line] = []
        for number, line in enumerate(job.lines.values(), start=1):
            result = results.get(line.custom_id)
            if result is not None and result.status is not None:
                again = self._settle_answer(job, line, result)
            else:
                again = self._settle_unanswered(job, line, result, named=number in named_lines)
            if again is not None:
                requeue.append(again)
        job.lines.clear()
        if self.abort.is_set:
            self._abort_all()
            return
        if requeue:
            for line in requeue:
                self._add(line)
            self._seal()

    def _lines_named_by_errors(self, job: _Job) -> set[int]:
        if job.info.status != "failed":
            return set()
        return {int(e["line"]) for e in job.info.errors if isinstance(e.get("line"), int)}

    def _settle_answer(self, job: _Job, line: _Line, result: LineResult) -> _Line | None:
        """A line the batch answered: its vectors, an online retry, a later batch or a reject."""
        status = result.status or 0
        response = httpx.Response(status, json=result.body,
                                  headers={"x-request-id": result.request_id or ""})
        n = len(line.chunks)
        est_tokens = sum(c.n_tokens for c in line.chunks)
        attempt = self._attempt(job, line)
        if status == 200:
            try:
                answer = self.provider.parse_response(response, n, est_tokens)
                vectors = self.provider.finish_vectors(answer.vectors)
                check_vectors(vectors, n, self.provider.expected_dim)
            except MalformedResponseError as exc:
                return self._retry_later(job, line, attempt, exc)
            if self.provider.expected_dim is None:
                self.provider.served_dim = int(vectors.shape[1])
            answer = replace(answer, provider_request_id=result.request_id)
            self._usage(line.pending, self.online._metered.rows.answered(attempt, answer), job)
            self._settle_vectors(line.pending, list(line.chunks), vectors, remember=True)
            return None
        error = self.provider.classify_error(response)
        error.provider_request_id = result.request_id
        if isinstance(error, FatalProviderError):
            self._fatal(job, line, attempt, error)
            return None
        if isinstance(error, RetryableError):
            return self._retry_later(job, line, attempt, error)
        # Refused for its content (or too large): online, where bisection isolates the input.
        self._usage(line.pending, self.online._metered.rows.failed(
            attempt, error, detail=self.online._describe(error), will_retry=True), job)
        self._online(line)
        return None

    def _settle_unanswered(self, job: _Job, line: _Line, result: LineResult | None,
                           *, named: bool) -> _Line | None:
        """A line without an answer: the batch expired, failed, or was cancelled before it."""
        status = job.info.status
        code = result.error_code if result is not None else None
        if status == "failed":
            codes = {str(e.get("code")) for e in job.info.errors}
            if named:  # validation named this line: online, where it gets a real answer
                self._online(line)
                return None
            if TOKEN_LIMIT in codes or any(isinstance(e.get("line"), int)
                                           for e in job.info.errors):
                return line  # innocent: resubmitted as it was
            described = "; ".join(f"{e.get('code')}: {e.get('message')}"
                                  for e in job.info.errors) or "no reason given"
            self._fatal(job, line, self._attempt(job, line),
                        FatalProviderError(f"batch {job.info.id} failed: {described}"))
            return None
        if status == "cancelled" and not job.cancelled_by_us:
            self._fatal(job, line, self._attempt(job, line), FatalProviderError(
                f"batch {job.info.id} was cancelled outside this run; run the same command "
                "again to resubmit what it did not finish"))
            return None
        if status == "cancelled" or self.abort.is_set:
            self._settle_rejects(line.pending, line.chunks, ABORTED,
                                 self.abort.message or f"batch {job.info.id} was cancelled", 1)
            return None
        return self._retry_later(job, line, self._attempt(job, line), RetryableError(
            f"batch {job.info.id} ended {status} before this line was done ({code or 'no answer'})"))

    def _retry_later(self, job: _Job, line: _Line, attempt: Attempt,
                     error: ProviderError) -> _Line | None:
        attempts = self.settings.retry.max_attempts
        again = line.attempt < attempts and not self.abort.is_set
        detail = self.online._describe(error)
        self._usage(line.pending, self.online._metered.rows.failed(
            attempt, error, detail=detail, will_retry=again), job)
        if again:
            return _Line(f"{line.custom_id}.{line.attempt + 1}", line.chunks, line.pending,
                         line.attempt + 1)
        if self.abort.is_set:
            self._settle_rejects(line.pending, line.chunks, ABORTED, self.abort.message or "", 1)
        else:
            self._settle_rejects(line.pending, line.chunks, RETRIES_EXHAUSTED,
                                 f"gave up after {line.attempt} batches: {detail}", line.attempt)
        return None

    def _fatal(self, job: _Job, line: _Line, attempt: Attempt, error: ProviderError) -> None:
        message = self.abort.set(self.online._redact(
            f"the provider refused the run: {self.online._describe(error)}"))
        self._usage(line.pending, replace(self.online._metered.rows.failed(
            attempt, error, detail=self.online._describe(error), will_retry=False),
            outcome=OUTCOME_FAILED), job)
        self._settle_rejects(line.pending, line.chunks, ABORTED, message, line.attempt)

    def _online(self, line: _Line) -> None:
        """Embed ``line`` online; its outcome (vectors, rejects, rows) joins the request's."""
        chunks = line.chunks
        request = RequestBatch(batch_id=f"{line.custom_id}-online", chunks=chunks,
                               n_tokens=sum(c.n_tokens for c in chunks),
                               n_bytes=sum(len(c.text.encode()) for c in chunks))
        future = self.online.submit(request)
        future.add_done_callback(functools.partial(self._merge_online, line.pending))

    def _merge_online(self, pending: _Pending, future: Future[BatchOutcome]) -> None:
        outcome = future.result()
        with self._lock:
            out = pending.outcome
            out.batches.extend(outcome.batches)
            out.rejects.extend(outcome.rejects)
            out.usage.extend(outcome.usage)
            out.fatal = out.fatal or outcome.fatal
            out.store_failure = out.store_failure or outcome.store_failure
            out.usage_tokens += outcome.usage_tokens
            out.usage_estimate += outcome.usage_estimate
            settled = sum(len(b) for b in outcome.batches) + len(outcome.rejects)
        self._settled(pending, settled)

    # -- re-attaching ------------------------------------------------------------------------

    def _reattach(self) -> None:
        """Find the batches an earlier process submitted for this output, and wait for them."""
        key = self.settings.batch_key
        if not key:
            return
        harvested = self._harvested_before()
        try:
            found = [b for b in self.api.batches()
                     if b.metadata.get(OUTPUT_KEY) == key and b.id not in harvested
                     and b.status not in ("failed", "cancelled")]
        except ProviderError as exc:
            log.warning("cannot list earlier batches (%s): nothing is re-attached",
                        self.online._describe(exc))
            return
        for info in found:
            try:
                inputs = list(request_inputs(self.api.content(info.input_file_id)))
            except ProviderError as exc:
                log.warning("batch %s: its input file cannot be read (%s); not re-attached",
                            info.id, self.online._describe(exc))
                continue
            job = _Job(info=info, attached={}, started=self.clock.now())
            assert job.attached is not None
            with self._lock:
                for custom_id, texts in inputs:
                    shas = [_sha(t) for t in texts]
                    job.attached[custom_id] = shas
                    for sha in shas:
                        self._attached_shas[sha] = info.id
                self._jobs[info.id] = job
                self.reattached.append(info.id)
            log.info("batch %s (%s, from run %s) re-attached: %d requests", info.id, info.status,
                     info.metadata.get(RUN_KEY), len(inputs))
        if found:
            self._wake.set()

    def _harvested_before(self) -> set[str]:
        """Batches the committed manifest of the output lists: their lines are in the output."""
        if self.settings.output is None:
            return set()
        url, options, _ = self.settings.output
        try:
            fs, root = fsspec.core.url_to_fs(url, **dict(options))
            manifest = json.loads(fs.cat_file(f"{root.rstrip('/')}/manifest.json"))
        except (FileNotFoundError, ValueError):
            return set()
        batch = manifest.get("batch") if isinstance(manifest, dict) else None
        return set(batch.get("batches", [])) if isinstance(batch, dict) else set()

    def _harvest_attached(self, job: _Job, results: dict[str, LineResult]) -> None:
        """Vectors of a re-attached batch to the cache and to the chunks that wait for them."""
        assert job.attached is not None
        found: dict[str, np.ndarray] = {}
        for custom_id, shas in job.attached.items():
            result = results.get(custom_id)
            if result is None or result.status != 200:
                continue
            response = httpx.Response(200, json=result.body)
            try:
                answer = self.provider.parse_response(response, len(shas), 0)
                vectors = self.provider.finish_vectors(answer.vectors)
                check_vectors(vectors, len(shas), self.provider.expected_dim)
            except MalformedResponseError:
                continue
            attempt = self._attempt(job, None, n_inputs=len(shas), custom_id=custom_id)
            row = self.online._metered.rows.answered(
                attempt, replace(answer, provider_request_id=result.request_id))
            self._orphan_usage.append(replace(row, mode="batch", batch_id=job.info.id))
            for sha, vector in zip(shas, vectors, strict=True):
                found[sha] = vector
        if found and self.cache is not None and self.settings.cache is not None:
            chunks = tuple(_bare_chunk(sha) for sha in found)
            self.online._remember([EmbeddedBatch(chunks=chunks, model=self.settings.provider.model,
                                                 vectors=np.stack(list(found.values())))])
        with self._lock:
            self._ready.update(found)
            for shas in job.attached.values():
                for sha in shas:
                    self._attached_shas.pop(sha, None)
        self._release_claims(job, None)

    def _release_claims(self, job: _Job, aborted: str | None) -> None:
        """The chunks that waited for a re-attached batch: their vectors, or a line of their own."""
        assert job.attached is not None
        shas = {sha for shas in job.attached.values() for sha in shas}
        with self._lock:
            waiting = [(p, c) for sha in shas for p, c in self._claims.pop(sha, [])]
            for sha in shas:
                self._attached_shas.pop(sha, None)
        by_pending: dict[int, tuple[_Pending, list[Chunk]]] = {}
        for pending, chunk in waiting:
            by_pending.setdefault(id(pending), (pending, []))[1].append(chunk)
        for pending, chunks in by_pending.values():
            if aborted is not None:
                self._settle_rejects(pending, chunks, ABORTED, aborted, 0)
                continue
            have = [c for c in chunks if c.content_sha256 in self._ready]
            if have:
                self._settle_vectors(pending, have,
                                     np.stack([self._ready[c.content_sha256] for c in have]))
            rest = tuple(c for c in chunks if c.content_sha256 not in self._ready)
            if rest:
                self._add(_Line(self._custom_id(pending.request), rest, pending))
                self._seal()

    # -- settling ----------------------------------------------------------------------------

    def _attempt(self, job: _Job, line: _Line | None, *, n_inputs: int = 0,
                 custom_id: str = "") -> Attempt:
        started = dt.datetime.fromtimestamp(job.info.created_at or time.time(), tz=dt.timezone.utc)
        return Attempt(
            request_id=f"{job.info.id}:{line.custom_id if line else custom_id}",
            n_inputs=len(line.chunks) if line else n_inputs,
            number=line.attempt if line else 1,
            started_at=started,
            latency_ms=max(0.0, (self.clock.now() - job.started) * 1000),
        )

    def _usage(self, pending: _Pending, row: UsageRecord, job: _Job) -> None:
        with self._lock:
            pending.outcome.usage.append(replace(row, mode="batch", batch_id=job.info.id))

    def _settle_vectors(self, pending: _Pending, chunks: list[Chunk], vectors: np.ndarray,
                        *, remember: bool = False) -> None:
        batch = EmbeddedBatch(chunks=tuple(chunks), model=self.settings.provider.model,
                              vectors=vectors)
        if remember:
            self.online._remember([batch])
        with self._lock:
            pending.outcome.batches.append(batch)
        self._settled(pending, len(chunks))

    def _settle_rejects(self, pending: _Pending, chunks: Sequence[Chunk], reason: str,
                        detail: str, attempts: int) -> None:
        with self._lock:
            pending.outcome.rejects.extend(_rejects(chunks, reason, detail, attempts))
        self._settled(pending, len(chunks))

    def _settled(self, pending: _Pending, n: int) -> None:
        with self._lock:
            pending.left -= n
            if pending.left > 0:
                return
            out = pending.outcome
            orphans, self._orphan_usage = self._orphan_usage, []
            out.usage.extend(orphans)
        if self.online.abort.kind == STORE:
            out.store_failure = self.online.abort.message
        else:
            out.fatal = out.fatal or self.online.abort.report_once()
        pending.future.set_result(out)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _bare_chunk(sha: str) -> Chunk:
    """A chunk that only carries its text's digest: what the cache keys a vector by."""
    return Chunk(chunk_id=sha, doc_id="", chunk_index=0, char_start=0, char_end=0, n_tokens=0,
                 content_sha256=sha, text="", source="")


__all__ = ["OUTPUT_KEY", "PART_KEY", "RUN_KEY", "TERMINAL", "BatchSession"]
