"""The embed stage: bundles in, aligned vectors out, with rejects and one usage row per attempt.

Beam calls ``process`` one element at a time, and on the FnApiRunner a whole stage's input is
often one bundle, so concurrency cannot come from Beam. It lives here, per worker process:

- one :class:`EmbedSession` per process and run (HTTP client, provider, rate limiter, thread
  pool, abort flag), shared by every DoFn instance and thread through a documented module-level
  registry, so the rate budget is not multiplied by the number of threads;
- each DoFn keeps a window of at most ``limits.max_concurrency`` bundles in flight, yields
  results as they complete, and waits for the rest in ``finish_bundle``; memory is bounded by
  the window, not by the Beam bundle.

Per request: the limiter admits it, the provider sends it, the retry policy retries transient
failures. A per-input rejection bisects the bundle until the offending chunks are alone (only
they are rejected, with the provider's message); a "too large" answer splits it and remembers the
cap it states for later bundles; a fatal answer (bad key, no quota, unknown model) sets the
session's abort flag: nothing more is sent, and every remaining chunk becomes an ``aborted``
reject, so the run still commits what it finished and exits 3.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import functools
import logging
import os
import socket
import threading
import time
import typing
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

import apache_beam as beam
import httpx
from apache_beam.metrics import Metrics

from transforms.bundle import BundleCaps, BundlePacker
from transforms.cache import CacheIndex, CacheSpec, close_cache, open_cache
from transforms.errors import (
    FatalProviderError,
    InputRejectedError,
    ProviderError,
    RateLimitedError,
    RequestTooLargeError,
    RetryableError,
    redact,
)
from transforms.limits import MONOTONIC, Clock, RateLimiter, RateLimits
from transforms.outputs import in_global_window
from transforms.progress import ProgressReporter
from transforms.providers import get_provider_class
from transforms.providers.base import EmbeddingResult, Provider
from transforms.retry import RetryPolicy
from transforms.sections import ProviderConfig
from transforms.types import (
    ABORTED,
    OUTCOME_FAILED,
    OUTCOME_OK,
    OUTCOME_RETRY,
    PROVIDER_REJECTED,
    RETRIES_EXHAUSTED,
    STAGE_EMBED,
    Bundle,
    Chunk,
    EmbeddedBatch,
    Reject,
    UsageRecord,
)

log = logging.getLogger(__name__)

TAG_REJECTS = "rejects"
TAG_USAGE = "usage"
TAG_FATAL = "fatal"
TAG_CACHE = "cache"


@dataclass(frozen=True, slots=True)
class EmbedSettings:
    """Everything a worker needs to embed, and nothing secret: the key is read on the worker."""

    run_id: str
    provider: ProviderConfig
    limits: RateLimits  # this worker's share
    max_concurrency: int
    retry: RetryPolicy
    progress_interval_s: float | None = 5.0  # None: no progress lines (--quiet)
    cache: CacheSpec | None = None  # where finished vectors are remembered; None: no cache
    workers: int = 1  # processes sharing the job (for this worker's share in the ETA)


@dataclass
class BundleOutcome:
    """What one bundle produced; filled by one thread, then emitted by the DoFn."""

    batches: list[EmbeddedBatch] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    usage: list[UsageRecord] = field(default_factory=list)
    fatal: str | None = None


class EmbedSession:
    """The per-process embedding machinery for one run. Thread-safe; see the module docstring."""

    def __init__(
        self,
        settings: EmbedSettings,
        *,
        api_key: str | None,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.settings = settings
        self.provider: Provider = get_provider_class(settings.provider.kind)(settings.provider)
        self.limiter = RateLimiter(settings.limits, clock=clock)
        self.clock = clock
        self._api_key = api_key
        timeout_s = settings.provider.timeout_s
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=settings.max_concurrency,
                                max_keepalive_connections=settings.max_concurrency),
        )
        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="embedpipe-embed"
        )
        self._abort_lock = threading.Lock()
        self._abort_message: str | None = None
        self._fatal_reported = False
        # Largest request the server accepted after a "too large" answer (learned, shrinks only).
        self._max_inputs = settings.provider.max_inputs_per_request
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.cache: CacheIndex | None = (
            open_cache(settings.cache) if settings.cache is not None else None)
        self._progress = (
            ProgressReporter(self.worker, settings.limits.tokens_per_minute,
                             settings.progress_interval_s)
            if settings.progress_interval_s else None
        )
        if settings.provider.api_key_env and not api_key:
            self._abort(
                f"environment variable {settings.provider.api_key_env} is not set on worker "
                f"{self.worker}; export it where the pipeline runs "
                "(or set provider.api_key_env: null for a server without authentication)"
            )

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._client.close()
        if self.cache is not None and self.settings.cache is not None:
            close_cache(self.settings.cache)
        if self._progress is not None:
            self._progress.close()

    def submit(self, bundle: Bundle) -> Future[BundleOutcome]:
        return self._executor.submit(self.embed_bundle, bundle)

    # -- one bundle -------------------------------------------------------------------------

    def embed_bundle(self, bundle: Bundle) -> BundleOutcome:
        out = BundleOutcome()
        if self._progress is not None:
            self._progress.started()
        step = self._max_inputs
        for start in range(0, len(bundle.chunks), step):
            self._embed_span(bundle, start, bundle.chunks[start : start + step], out)
        self._remember(out.batches)
        if self._progress is not None:
            self._progress.finished(sum(len(b) for b in out.batches), len(out.rejects), out.usage,
                                    bundle.n_tokens)
        with self._abort_lock:
            if self._abort_message is not None and not self._fatal_reported:
                self._fatal_reported = True
                out.fatal = self._abort_message
        return out

    def _embed_span(
        self, bundle: Bundle, offset: int, chunks: Sequence[Chunk], out: BundleOutcome
    ) -> None:
        """Embed ``chunks`` (a span of ``bundle``), bisecting on per-input or size errors."""
        if self._abort_message is not None:
            out.rejects.extend(_rejects(chunks, ABORTED, self._abort_message, 0))
            return
        try:
            result = self._request(bundle, offset, chunks, out)
        except FatalProviderError as exc:
            message = self._abort(f"the provider refused the run: {self._describe(exc)}")
            out.rejects.extend(_rejects(chunks, ABORTED, message, 1))
            return
        except RetryableError as exc:
            attempts = self.settings.retry.max_attempts
            detail = f"gave up after {attempts} attempts: {self._describe(exc)}"
            out.rejects.extend(_rejects(chunks, RETRIES_EXHAUSTED, detail, attempts))
            return
        except (InputRejectedError, RequestTooLargeError) as exc:
            if len(chunks) == 1:
                out.rejects.extend(_rejects(chunks, PROVIDER_REJECTED, self._describe(exc), 1))
                return
            if isinstance(exc, RequestTooLargeError) and exc.max_inputs:
                # The server said its cap: obey it from now on. Without a stated cap, only this
                # request is bisected: one oversized input must not shrink every later request.
                self._learn_max_inputs(exc.max_inputs)
                if exc.max_inputs < len(chunks):
                    for start in range(0, len(chunks), exc.max_inputs):
                        self._embed_span(bundle, offset + start,
                                         chunks[start : start + exc.max_inputs], out)
                    return
            half = len(chunks) // 2
            self._embed_span(bundle, offset, chunks[:half], out)
            self._embed_span(bundle, offset + half, chunks[half:], out)
            return
        out.batches.append(
            EmbeddedBatch(chunks=tuple(chunks), model=self.settings.provider.model,
                          vectors=result.vectors)
        )

    def _request(
        self, bundle: Bundle, offset: int, chunks: Sequence[Chunk], out: BundleOutcome
    ) -> EmbeddingResult:
        """One logical request with retries; appends a usage row per HTTP attempt."""
        texts = [c.text for c in chunks]
        est_tokens = sum(c.n_tokens for c in chunks)
        policy = self.settings.retry
        for attempt in policy.retrying(sleep=self.clock.sleep):
            with attempt:
                number = attempt.retry_state.attempt_number
                request_id = f"{bundle.bundle_id}:{offset}+{len(chunks)}:{number}"
                charged = self.limiter.charge_for(est_tokens)
                self.limiter.acquire(charged)
                started = dt.datetime.now(dt.timezone.utc)
                t0 = time.perf_counter()
                try:
                    result = self.provider.embed(self._client, texts, self._api_key, est_tokens)
                except ProviderError as exc:
                    self.limiter.refund(charged)
                    if isinstance(exc, RateLimitedError):
                        self.limiter.on_throttle(exc.retry_after_s)
                    will_retry = isinstance(exc, RetryableError) and number < policy.max_attempts
                    out.usage.append(self._usage(
                        request_id, exc.provider_request_id, len(chunks), 0, 0, True, number,
                        exc.http_status, OUTCOME_RETRY if will_retry else OUTCOME_FAILED,
                        self._describe(exc), t0, started,
                    ))
                    raise
                self.limiter.settle(
                    charged, est_tokens, None if result.tokens_estimated else result.prompt_tokens
                )
                self.limiter.on_success()
                hint = result.rate_hint
                if hint is not None:
                    reset_s = max(hint.reset_requests_s or 0, hint.reset_tokens_s or 0) or None
                    self.limiter.on_hint(hint.remaining_requests, hint.remaining_tokens, reset_s)
                out.usage.append(self._usage(
                    request_id, result.provider_request_id, len(chunks), result.prompt_tokens,
                    result.total_tokens, result.tokens_estimated, number, result.http_status,
                    OUTCOME_OK, None, t0, started,
                ))
                return result
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    # -- helpers ----------------------------------------------------------------------------

    def _remember(self, batches: list[EmbeddedBatch]) -> None:
        """Commit the bundle's new vectors to the cache now, so a crash cannot lose them.

        A cache that cannot be written costs money on a re-run, not correctness: the vectors
        still reach the output, so a failure here is logged and the run goes on.
        """
        if self.cache is None or not batches:
            return
        try:
            self.cache.write(batches)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("embedpipe: could not write to the cache at %s (%s: %s)",
                        self.settings.cache.url if self.settings.cache else "?",
                        type(exc).__name__, exc)

    def _learn_max_inputs(self, cap: int) -> None:
        """Remember a smaller request size for every later bundle of this process."""
        cap = max(1, cap)
        if cap < self._max_inputs:
            log.warning("embedpipe: the provider caps requests at %d inputs; sending at most "
                        "that many from now on (set provider.max_inputs_per_request=%d)", cap, cap)
            self._max_inputs = cap

    def _abort(self, message: str) -> str:
        with self._abort_lock:
            if self._abort_message is None:
                self._abort_message = redact(message, self._api_key)
                log.error("embedpipe: aborting the run: %s", self._abort_message)
            return self._abort_message

    def _describe(self, exc: ProviderError) -> str:
        return redact(exc.describe(), self._api_key)

    def _usage(
        self, request_id: str, provider_request_id: str | None, n_inputs: int,
        prompt_tokens: int, total_tokens: int, estimated: bool, attempt: int,
        http_status: int | None, outcome: str, error: str | None, t0: float,
        started: dt.datetime,
    ) -> UsageRecord:
        return UsageRecord(
            request_id=request_id,
            provider_request_id=provider_request_id,
            model=self.settings.provider.model,
            n_inputs=n_inputs,
            prompt_tokens=prompt_tokens,
            total_tokens=total_tokens,
            tokens_estimated=estimated,
            attempt=attempt,
            http_status=http_status,
            outcome=outcome,
            error=error,
            latency_ms=(time.perf_counter() - t0) * 1000.0,
            started_at=started,
            worker=self.worker,
        )


def _rejects(chunks: Sequence[Chunk], reason: str, detail: str, attempts: int) -> list[Reject]:
    return [
        Reject(id=c.chunk_id, doc_id=c.doc_id, source=c.source, stage=STAGE_EMBED,
               reason=reason, detail=detail, attempts=attempts)
        for c in chunks
    ]


# -- the per-process session registry --------------------------------------------------------
#
# Deliberate module-level state: one EmbedSession per (process, run), created lazily by the first
# DoFn that needs it and closed when the last one is torn down. Keyed by run id so that several
# runs in one process (tests, notebooks) never share a limiter or an abort flag.

_SESSIONS: dict[str, tuple[EmbedSession, int]] = {}
_SESSIONS_LOCK = threading.Lock()


def acquire_session(settings: EmbedSettings) -> EmbedSession:
    with _SESSIONS_LOCK:
        session, users = _SESSIONS.get(settings.run_id, (None, 0))
        if session is None:
            key_env = settings.provider.api_key_env
            session = EmbedSession(settings, api_key=os.environ.get(key_env) if key_env else None)
        _SESSIONS[settings.run_id] = (session, users + 1)
        return session


def release_session(settings: EmbedSettings) -> None:
    with _SESSIONS_LOCK:
        session, users = _SESSIONS.get(settings.run_id, (None, 0))
        if session is None:
            return
        if users <= 1:
            del _SESSIONS[settings.run_id]
            session.close()
        else:
            _SESSIONS[settings.run_id] = (session, users - 1)


# -- the Beam side ----------------------------------------------------------------------------


class _EmbedMetrics:
    """Beam metrics of the embed stage (namespace ``embedpipe``).

    Updated on the DoFn's own thread when an outcome is emitted: Beam's metric containers are
    bound to the bundle-processing thread, not to the session's pool threads.
    """

    def __init__(self) -> None:
        counter = functools.partial(Metrics.counter, "embedpipe")
        self.requests = counter("requests")
        self.retries = counter("retries")
        self.throttled = counter("throttled")
        self.prompt_tokens = counter("prompt_tokens")
        self.chunks_embedded = counter("chunks_embedded")
        self.chunks_failed = counter("chunks_failed")
        self.latency_ms = Metrics.distribution("embedpipe", "request_latency_ms")

    def record(self, outcome: BundleOutcome) -> None:
        for row in outcome.usage:
            self.requests.inc()
            self.latency_ms.update(int(row.latency_ms))
            if row.outcome == OUTCOME_RETRY:
                self.retries.inc()
            if row.http_status == 429:
                self.throttled.inc()
            if row.outcome == OUTCOME_OK:
                self.prompt_tokens.inc(row.prompt_tokens)



#: Seconds between two hand-backs of freed heap memory to the system (see below).
TRIM_INTERVAL_S = 2.0
_last_trim = 0.0


def release_freed_memory() -> None:
    """Give freed heap pages back to the system, at most every ``TRIM_INTERVAL_S``.

    Each answer is megabytes (body, decoded vectors) allocated on one of the request threads;
    glibc keeps freed blocks in per-thread arenas, and its adaptive mmap threshold soon serves
    such sizes from those arenas, so a process's RSS crept up by ~140 MB over a million chunks
    while the live Python heap stayed flat (tracemalloc). ``malloc_trim`` returns the free pages;
    elsewhere (no glibc) this does nothing.
    """
    global _last_trim
    now = time.monotonic()
    if now - _last_trim < TRIM_INTERVAL_S or _MALLOC_TRIM is None:
        return
    _last_trim = now
    _MALLOC_TRIM(0)


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()

#: Chunks looked up in the cache at once: one vectorised probe of the index per group.
LOOKUP_GROUP = 2048


@dataclass
class CacheCounts:
    """What the cache saved in one Beam bundle; summed over the run for the manifest."""

    hits: int = 0  # chunks served from the cache
    misses: int = 0  # texts sent to the provider
    duplicates: int = 0  # chunks that took the vector of an identical text sent in this run
    tokens_saved: int = 0  # the tokens of hits and duplicates

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.hits, self.misses, self.duplicates, self.tokens_saved)


class EmbedChunksFn(beam.DoFn):
    """Chunks in, vectors out: cache probe, request packing and the in-flight window in one step.

    One DoFn on purpose. The three must share per-bundle state that Beam cannot carry between
    steps: a text waiting in the packer or in flight is *claimed*, and a later chunk with the
    same text waits for its vector instead of being sent again. Keeping that state inside one
    DoFn keeps it inside one Beam bundle, so a retried bundle replays all of it, and nothing a
    bundle owns is ever emitted by another. The parts are small objects of their own modules:
    :class:`~transforms.cache.CacheIndex`, :class:`~transforms.bundle.BundlePacker` and the
    process's :class:`EmbedSession`.

    Memory is bounded by ``LOOKUP_GROUP`` chunks, one request in the packer and
    ``max_concurrency`` requests in flight, whatever the size of the Beam bundle.
    """

    def __init__(self, settings: EmbedSettings, caps: BundleCaps) -> None:
        self.settings = settings
        self.caps = caps
        self._session: EmbedSession | None = None
        self._metrics = _EmbedMetrics()

    def setup(self) -> None:
        self._session = acquire_session(self.settings)

    def start_bundle(self) -> None:
        self._waiting: list[Chunk] = []
        self._packer = BundlePacker(self.caps)
        self._inflight: deque[tuple[Bundle, Future[BundleOutcome]]] = deque()
        self._claimed: dict[str, list[Chunk]] = {}
        self._counts = CacheCounts()

    def process(self, chunk: Chunk) -> Iterator[object]:
        self._waiting.append(chunk)
        if len(self._waiting) >= LOOKUP_GROUP:
            yield from self._route()

    def finish_bundle(self) -> Iterator[object]:
        outputs = [*self._route(), *self._submit(self._packer.flush())]
        while self._inflight:
            outputs.extend(self._emit(*self._inflight.popleft()))
        if self._claimed:  # every claim is settled by the answer of the chunk that holds it
            raise AssertionError(f"{len(self._claimed)} chunks were left waiting for a vector")
        outputs.append(beam.pvalue.TaggedOutput(TAG_CACHE, self._counts.as_tuple()))
        yield from in_global_window(outputs)

    def teardown(self) -> None:
        if self._session is not None:
            release_session(self.settings)
            self._session = None

    # -- routing -------------------------------------------------------------------------------

    def _route(self) -> Iterator[object]:
        """Serve the waiting chunks from the cache, claim or join the rest, pack what is new."""
        assert self._session is not None
        chunks, self._waiting = self._waiting, []
        cache = self._session.cache
        if cache is not None and chunks:
            hits, vectors = cache.lookup(chunks)
            if hits:
                served = tuple(chunks[i] for i in hits)
                self._counts.hits += len(served)
                self._counts.tokens_saved += sum(c.n_tokens for c in served)
                self._metrics.chunks_embedded.inc(len(served))
                yield EmbeddedBatch(chunks=served, model=self.settings.provider.model,
                                    vectors=vectors)
                taken = set(hits)
                chunks = [c for i, c in enumerate(chunks) if i not in taken]
        for chunk in chunks:
            if cache is not None:
                twins = self._claimed.get(chunk.content_sha256)
                if twins is not None:
                    twins.append(chunk)
                    self._counts.duplicates += 1
                    self._counts.tokens_saved += chunk.n_tokens
                    continue
                self._claimed[chunk.content_sha256] = []
            self._counts.misses += 1
            yield from self._submit(self._packer.add(chunk))

    def _submit(self, bundles: Iterator[Bundle]) -> Iterator[object]:
        assert self._session is not None
        for bundle in bundles:
            self._inflight.append((bundle, self._session.submit(bundle)))
            while len(self._inflight) >= self.settings.max_concurrency:
                wait([f for _, f in self._inflight], return_when=FIRST_COMPLETED)
                for item in [x for x in self._inflight if x[1].done()]:
                    self._inflight.remove(item)
                    yield from self._emit(*item)

    def _emit(self, bundle: Bundle, future: Future[BundleOutcome]) -> Iterator[object]:
        """A finished request's outputs, with every chunk that waited on one of its texts."""
        outcome = future.result()
        release_freed_memory()
        self._metrics.record(outcome)
        for batch in outcome.batches:
            batch = self._with_twins(batch)
            self._metrics.chunks_embedded.inc(len(batch))
            yield batch
        by_key: dict[tuple[str, str], list[Chunk]] = {}
        for chunk in bundle.chunks:
            by_key.setdefault((chunk.chunk_id, chunk.source), []).append(chunk)
        for reject in outcome.rejects:
            chunk = by_key[(reject.id or "", reject.source)].pop()
            twins = self._claimed.pop(chunk.content_sha256, ())
            self._metrics.chunks_failed.inc(1 + len(twins))
            yield beam.pvalue.TaggedOutput(TAG_REJECTS, reject)
            for twin in twins:
                yield beam.pvalue.TaggedOutput(TAG_REJECTS, replace(
                    reject, id=twin.chunk_id, doc_id=twin.doc_id, source=twin.source))
        for usage in outcome.usage:
            yield beam.pvalue.TaggedOutput(TAG_USAGE, usage)
        if outcome.fatal is not None:
            yield beam.pvalue.TaggedOutput(TAG_FATAL, outcome.fatal)

    def _with_twins(self, batch: EmbeddedBatch) -> EmbeddedBatch:
        """``batch`` plus the chunks that waited for one of its texts, each with its vector."""
        rows: list[int] = []
        chunks: list[Chunk] = []
        for i, chunk in enumerate(batch.chunks):
            rows.append(i)
            chunks.append(chunk)
            for twin in self._claimed.pop(chunk.content_sha256, ()):
                rows.append(i)
                chunks.append(twin)
        if len(chunks) == len(batch.chunks):
            return batch
        return EmbeddedBatch(chunks=tuple(chunks), model=batch.model, vectors=batch.vectors[rows])


class EmbedChunks(beam.PTransform):
    """``Chunk`` → ``{"vectors": EmbeddedBatch, "rejects", "usage", "fatal": str, "cache"}``.

    ``cache`` holds one :meth:`CacheCounts.as_tuple` per Beam bundle.
    """

    def __init__(self, settings: EmbedSettings, caps: BundleCaps) -> None:
        super().__init__()
        self.settings = settings
        self.caps = caps

    def expand(self, chunks: beam.PCollection) -> dict[str, beam.PCollection]:
        results = chunks | "CallProvider" >> beam.ParDo(
            EmbedChunksFn(self.settings, self.caps)
        ).with_output_types(
            EmbeddedBatch, **{TAG_REJECTS: Reject, TAG_USAGE: UsageRecord, TAG_FATAL: str,
                              TAG_CACHE: typing.Any}
        ).with_outputs(TAG_REJECTS, TAG_USAGE, TAG_FATAL, TAG_CACHE, main="vectors")
        return {
            "vectors": results.vectors,
            "rejects": results[TAG_REJECTS],
            "usage": results[TAG_USAGE],
            "fatal": results[TAG_FATAL],
            "cache": results[TAG_CACHE],
        }
