"""What batch mode does with a batch that ended, and with batches an earlier process left.

Mixed into :class:`~transforms.batch_session.BatchSession` (which owns the lines, the batches
and the poller): this half reads a finished batch's output and error files and settles every
line (see the table in ``docs/batch.md``), re-attaches to the batches of an earlier process, and
settles requests chunk by chunk into the outcomes the embed stage emits.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import TYPE_CHECKING

import fsspec
import httpx
import numpy as np

from transforms.abort import STORE, AbortFlag
from transforms.batch_api import BatchApi, BatchInfo
from transforms.batch_lines import LineResult, request_inputs, result_lines
from transforms.batch_records import Job, Line, Pending, bare_chunk, sha256_of
from transforms.cache import CacheIndex
from transforms.embed_session import BatchOutcome, EmbedSession, EmbedSettings, _rejects
from transforms.errors import (
    FatalProviderError,
    MalformedResponseError,
    ProviderError,
    RetryableError,
)
from transforms.limits import Clock
from transforms.providers.base import Provider, check_vectors
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

log = logging.getLogger("transforms.batch_session")

#: The ``metadata`` keys that tie a batch to its output, run and part.
OUTPUT_KEY, RUN_KEY, PART_KEY = "embedpipe_output", "embedpipe_run", "embedpipe_part"
#: A ``failed`` batch's error code that means "too many tokens queued": wait, then resubmit.
TOKEN_LIMIT = "token_limit_exceeded"
#: How long a batch's state or files may stay unreadable (5xx, no connection) before the run
#: stops waiting for it: a bound on every wait, far above an API's ordinary outages.
UNREADABLE_LIMIT_S = 3600.0
#: How far back the batch list is read to re-attach: OpenAI keeps batch files 30 days.
LISTING_HORIZON_S = 30 * 86400.0


class Harvester:
    """The harvesting half of :class:`~transforms.batch_session.BatchSession`."""

    # Set by BatchSession.__init__.
    settings: EmbedSettings
    online: EmbedSession
    provider: Provider
    api: BatchApi
    cache: CacheIndex | None
    clock: Clock
    reattached: list[str]
    _lock: threading.RLock
    _jobs: dict[str, Job]
    _claims: dict[str, list[tuple[Pending, Chunk]]]
    _attached_shas: dict[str, str]
    _ready: dict[str, np.ndarray]
    _line_rows: dict[str, UsageRecord]  # usage of re-attached lines, until a chunk takes one
    _row_of: dict[str, str]  # sha -> the key of its re-attached line in _line_rows
    _wake: threading.Event
    _deferred: list[Line]  # lines of a batch refused for the queue's token limit

    if TYPE_CHECKING:  # BatchSession's own
        @property
        def abort(self) -> AbortFlag: ...
        def _add(self, line: Line) -> None: ...
        def _seal(self) -> None: ...
        def _abort_all(self) -> None: ...
        def _custom_id(self, request: RequestBatch) -> str: ...

    # -- harvesting --------------------------------------------------------------------------

    def _results(self, info: BatchInfo) -> dict[str, LineResult]:
        results: dict[str, LineResult] = {}
        for file_id in (info.output_file_id, info.error_file_id):
            if file_id:
                for result in result_lines(self.api.content(file_id), source=file_id):
                    results[result.custom_id] = result
        return results

    def _harvest(self, job: Job) -> None:
        """Settle every line of a batch that ended, in whatever state."""
        info = job.info
        try:
            results = self._results(info)
        except ProviderError as exc:
            if not self.unreadable(job, exc):
                return  # asked again at the next poll
            results = {}  # given up: every line is settled below (aborted)
        with self._lock:
            self._jobs.pop(info.id, None)
        if job.attached is not None:
            self._harvest_attached(job, results)
            return
        named_lines = self._lines_named_by_errors(job)
        requeue: list[Line] = []
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
        with self._lock:  # a batch of ours ended: the queue has room for the deferred lines
            requeue.extend(self._deferred)
            self._deferred.clear()
        if requeue:
            for line in requeue:
                self._add(line)
            self._seal()

    def unreadable(self, job: Job, exc: ProviderError) -> bool:
        """Note that ``job`` could not be read; True once the run stops waiting for it.

        A fatal answer (the key revoked) stops the run at once; anything else is asked again
        at the next poll, for up to :data:`UNREADABLE_LIMIT_S`, then the run aborts naming it.
        """
        now = self.clock.now()
        if job.unreadable_since is None:
            job.unreadable_since = now
        detail = self.online._describe(exc)
        if isinstance(exc, FatalProviderError):
            self.abort.set(self.online._redact(f"the provider refused the run: {detail}"))
        elif now - job.unreadable_since >= UNREADABLE_LIMIT_S and not self.abort.is_set:
            self.abort.set(self.online._redact(
                f"batch {job.info.id} could not be read for {now - job.unreadable_since:.0f}s "
                f"({detail}); run the same command again later to pick it up"))
        if not self.abort.is_set:
            log.warning("batch %s cannot be read now (%s); asking again at the next poll",
                        job.info.id, detail)
            return False
        for line in job.lines.values():
            self._settle_rejects(line.pending, line.chunks, ABORTED, self.abort.message or "", 1)
        job.lines.clear()
        return True
    def _lines_named_by_errors(self, job: Job) -> set[int]:
        if job.info.status != "failed":
            return set()
        return {int(e["line"]) for e in job.info.errors if isinstance(e.get("line"), int)}

    def _settle_answer(self, job: Job, line: Line, result: LineResult) -> Line | None:
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
            if not answer.tokens_estimated:  # the summary's units check, as online
                with self._lock:
                    line.pending.outcome.usage_tokens += answer.prompt_tokens
                    line.pending.outcome.usage_estimate += est_tokens
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

    def _settle_unanswered(self, job: Job, line: Line, result: LineResult | None,
                           *, named: bool) -> Line | None:
        """A line without an answer: the batch expired, failed, or was cancelled before it."""
        status = job.info.status
        code = result.error_code if result is not None else None
        if status == "failed":
            codes = {str(e.get("code")) for e in job.info.errors}
            if named:  # validation named this line: online, where it gets a real answer
                self._online(line)
                return None
            if any(isinstance(e.get("line"), int) for e in job.info.errors):
                return line  # innocent: resubmitted as it was
            if TOKEN_LIMIT in codes:  # the queue is full: wait for a batch of ours to end
                again = self._retry_later(job, line, self._attempt(job, line), RetryableError(
                    f"batch {job.info.id} failed: the organisation's queue of enqueued tokens "
                    "is full (token_limit_exceeded)"))
                if again is not None:
                    with self._lock:
                        self._deferred.append(again)
                return None
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

    def _retry_later(self, job: Job, line: Line, attempt: Attempt,
                     error: ProviderError) -> Line | None:
        attempts = self.settings.retry.max_attempts
        again = line.attempt < attempts and not self.abort.is_set
        detail = self.online._describe(error)
        self._usage(line.pending, self.online._metered.rows.failed(
            attempt, error, detail=detail, will_retry=again), job)
        if again:
            return Line(f"{line.custom_id}.{line.attempt + 1}", line.chunks, line.pending,
                         line.attempt + 1)
        if self.abort.is_set:
            self._settle_rejects(line.pending, line.chunks, ABORTED, self.abort.message or "", 1)
        else:
            self._settle_rejects(line.pending, line.chunks, RETRIES_EXHAUSTED,
                                 f"gave up after {line.attempt} batches: {detail}", line.attempt)
        return None

    def _fatal(self, job: Job, line: Line, attempt: Attempt, error: ProviderError) -> None:
        message = self.abort.set(self.online._redact(
            f"the provider refused the run: {self.online._describe(error)}"))
        self._usage(line.pending, replace(self.online._metered.rows.failed(
            attempt, error, detail=self.online._describe(error), will_retry=False),
            outcome=OUTCOME_FAILED), job)
        self._settle_rejects(line.pending, line.chunks, ABORTED, message, line.attempt)

    def _online(self, line: Line) -> None:
        """Embed ``line`` online; its outcome (vectors, rejects, rows) joins the request's."""
        chunks = line.chunks
        request = RequestBatch(batch_id=f"{line.custom_id}-online", chunks=chunks,
                               n_tokens=sum(c.n_tokens for c in chunks),
                               n_bytes=sum(len(c.text.encode()) for c in chunks))
        future = self.online.submit(request)
        future.add_done_callback(functools.partial(self._merge_online, line.pending))

    def _merge_online(self, pending: Pending, future: Future[BatchOutcome]) -> None:
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
            # Newest first; older than the files' retention, nothing can be collected any more.
            recent = itertools.takewhile(
                lambda b: not b.created_at or b.created_at >= time.time() - LISTING_HORIZON_S,
                self.api.batches())
            # Not this run's own: another worker process of the run is waiting for those.
            found = [b for b in recent
                     if b.metadata.get(OUTPUT_KEY) == key and b.id not in harvested
                     and b.metadata.get(RUN_KEY) != self.settings.run_id
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
            job = Job(info=info, attached={}, started=self.clock.now())
            assert job.attached is not None
            with self._lock:
                for custom_id, texts in inputs:
                    shas = [sha256_of(t) for t in texts]
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

    def _harvest_attached(self, job: Job, results: dict[str, LineResult]) -> None:
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
            key = f"{job.info.id}:{custom_id}"
            with self._lock:
                self._line_rows[key] = replace(row, mode="batch", batch_id=job.info.id)
                for sha, vector in zip(shas, vectors, strict=True):
                    found[sha] = vector
                    self._row_of[sha] = key
        if found and self.cache is not None and self.settings.cache is not None:
            chunks = tuple(bare_chunk(sha) for sha in found)
            self.online._remember([EmbeddedBatch(chunks=chunks, model=self.settings.provider.model,
                                                 vectors=np.stack(list(found.values())))])
        with self._lock:
            self._ready.update(found)
            for shas in job.attached.values():
                for sha in shas:
                    self._attached_shas.pop(sha, None)
        self._release_claims(job, None)

    def _release_claims(self, job: Job, aborted: str | None) -> None:
        """The chunks that waited for a re-attached batch: their vectors, or a line of their own."""
        assert job.attached is not None
        shas = {sha for shas in job.attached.values() for sha in shas}
        with self._lock:
            waiting = [(p, c) for sha in shas for p, c in self._claims.pop(sha, [])]
            for sha in shas:
                self._attached_shas.pop(sha, None)
        by_pending: dict[int, tuple[Pending, list[Chunk]]] = {}
        for pending, chunk in waiting:
            by_pending.setdefault(id(pending), (pending, []))[1].append(chunk)
        for pending, chunks in by_pending.values():
            if aborted is not None:
                self._settle_rejects(pending, chunks, ABORTED, aborted, 0)
                continue
            have = [c for c in chunks if c.content_sha256 in self._ready]
            self._take_rows(pending, have)
            if have:
                self._settle_vectors(pending, have,
                                     np.stack([self._ready[c.content_sha256] for c in have]))
            rest = tuple(c for c in chunks if c.content_sha256 not in self._ready)
            if rest:
                self._add(Line(self._custom_id(pending.request), rest, pending))
                self._seal()

    # -- settling ----------------------------------------------------------------------------

    def _attempt(self, job: Job, line: Line | None, *, n_inputs: int = 0,
                 custom_id: str = "") -> Attempt:
        started = dt.datetime.fromtimestamp(job.info.created_at or time.time(), tz=dt.timezone.utc)
        return Attempt(
            request_id=f"{job.info.id}:{line.custom_id if line else custom_id}",
            n_inputs=len(line.chunks) if line else n_inputs,
            number=line.attempt if line else 1,
            started_at=started,
            latency_ms=max(0.0, (self.clock.now() - job.started) * 1000),
        )

    def _take_rows(self, pending: Pending, chunks: Sequence[Chunk]) -> None:
        """The usage rows of the re-attached lines whose vectors ``chunks`` take, each once.

        A re-attached line's row goes with the first request that uses one of its vectors, so
        that two worker processes re-attaching the same batch do not both report it; a line no
        chunk takes is reported at the end of the bundle by a single-process run
        (:meth:`~transforms.batch_session.BatchSession.take_usage`).
        """
        with self._lock:
            for chunk in chunks:
                row = self._line_rows.pop(self._row_of.get(chunk.content_sha256, ""), None)
                if row is not None:
                    pending.outcome.usage.append(row)

    def _usage(self, pending: Pending, row: UsageRecord, job: Job) -> None:
        with self._lock:
            pending.outcome.usage.append(replace(row, mode="batch", batch_id=job.info.id))

    def _settle_vectors(self, pending: Pending, chunks: list[Chunk], vectors: np.ndarray,
                        *, remember: bool = False) -> None:
        batch = EmbeddedBatch(chunks=tuple(chunks), model=self.settings.provider.model,
                              vectors=vectors)
        if remember:
            self.online._remember([batch])
        with self._lock:
            pending.outcome.batches.append(batch)
        self._settled(pending, len(chunks))

    def _settle_rejects(self, pending: Pending, chunks: Sequence[Chunk], reason: str,
                        detail: str, attempts: int) -> None:
        with self._lock:
            pending.outcome.rejects.extend(_rejects(chunks, reason, detail, attempts))
        self._settled(pending, len(chunks))

    def _settled(self, pending: Pending, n: int) -> None:
        with self._lock:
            pending.left -= n
            if pending.left > 0:
                return
            out = pending.outcome
        if self.online.abort.kind == STORE:
            out.store_failure = self.online.abort.message
        else:
            out.fatal = out.fatal or self.online.abort.report_once()
        pending.future.set_result(out)
