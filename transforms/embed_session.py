"""The embed session: one request batch in, its vectors, rejects and usage rows out.

Beam calls ``process`` one element at a time, and on the FnApiRunner a whole stage's input is
often one Beam bundle, so concurrency cannot come from Beam. It lives here, per worker process:
one :class:`EmbedSession` per process and run, shared by every DoFn instance and thread through
a documented module-level registry (:func:`acquire_session`), so the rate budget is not
multiplied by the number of threads.

A session owns the process's HTTP client, provider, thread pool and cache index, and composes
the parts that decide what happens to a request, each a small object of its own module:

- :class:`~transforms.bisection.RequestCap` cuts a batch into requests; :func:`~transforms.
  bisection.bisect` splits a request refused for one input until that input is alone (only it
  is rejected, with the provider's message), and a "too large" answer that states a cap lowers
  the cap for every later batch; while a request larger than any answered is out, others as
  large wait for its answer, so a cap costs one refused request per worker;
- :class:`~transforms.metered.MeteredCall` sends each request through the rate limiter and the
  retry policy, with one usage row per HTTP attempt (:class:`~transforms.usage.UsageRows`);
- :class:`~transforms.abort.AbortFlag`: a fatal answer (bad key, no quota, unknown model) stops
  the run: nothing more is sent, every remaining chunk becomes an ``aborted`` reject, so the run
  still commits what it finished and exits 3;
- :class:`~transforms.store_guard.StoreGuard`: a cache write, or the output's marker, that still
  fails after a short retry stops sending too, and the run commits nothing (exit 4).

The HTTP transport and the clock are injected (``transport=``, as ``httpx.Client`` takes it, and
``clock=``, passed on to the limiter, the retry waits and the provider), so the whole session
runs in a unit test on ``httpx.MockTransport`` and a fake clock, without Beam and without
sleeping.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import httpx

from transforms.abort import STORE, AbortFlag
from transforms.answer_watch import AnswerWatch
from transforms.bisection import Refused, RequestCap, bisect, spans
from transforms.cache import CacheIndex, CacheSpec, close_cache, open_cache
from transforms.errors import (
    DimensionChangedError,
    FatalProviderError,
    ProviderError,
    RequestTooLargeError,
    RetryableError,
    redact,
)
from transforms.limits import MONOTONIC, Clock, Pauses, RateLimiter, RateLimits
from transforms.metered import MeteredCall
from transforms.progress import ProgressReporter
from transforms.providers import provider_class_for
from transforms.providers.base import Provider
from transforms.retry import RetryPolicy
from transforms.sections import ProviderConfig
from transforms.store_guard import StoreGuard
from transforms.types import (
    ABORTED,
    PROVIDER_REJECTED,
    RETRIES_EXHAUSTED,
    STAGE_EMBED,
    Chunk,
    EmbeddedBatch,
    Reject,
    RequestBatch,
    UsageRecord,
)
from transforms.usage import UsageRows

log = logging.getLogger(__name__)


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
    # The dimension the preflight saw served, when provider.dimensions is not set: every answer
    # must have it (a server restarted with another model cannot mix dimensions into the run).
    served_dim: int | None = None
    # Where the run's output goes, as (URL, storage options, run id): its marker is rewritten
    # every few seconds, so a dead output store stops the run (None: not watched, the preflight).
    output: tuple[str, tuple[tuple[str, object], ...], str] | None = None
    # Batch mode: the digest of the output and the namespace, in every batch's metadata, by
    # which a later process finds the batches submitted for this output.
    batch_key: str | None = None
    # A multimodal run's image reader (transforms.images.ImageLoader): each record's image is
    # read again, checked against its hash and sent as a data: URL. None: a text run.
    images: Any = None


@dataclass
class BatchOutcome:
    """What one batch produced; filled by one thread, then emitted by the DoFn."""

    batches: list[EmbeddedBatch] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    usage: list[UsageRecord] = field(default_factory=list)
    fatal: str | None = None
    # The output or cache could not be written: the run must stop and commit nothing.
    store_failure: str | None = None
    # The limiter's pauses handed over with this batch (each pause is reported once).
    pauses: Pauses = field(default_factory=Pauses)
    # Over the answers that reported usage: the provider's count, and ours of the same inputs.
    usage_tokens: int = 0
    usage_estimate: int = 0


class EmbedSession:
    """The per-process embedding machinery for one run. Thread-safe; see the module docstring.

    ``transport`` replaces the HTTP transport of the session's ``httpx.Client`` (tests pass an
    ``httpx.MockTransport``); ``clock`` times the limiter, the retry waits and the provider's
    own waits. A missing API key aborts the session at once: every batch becomes rejects.

    >>> session = EmbedSession(settings, api_key=None, transport=httpx.MockTransport(handler),
    ...                        clock=fake_clock)                            # doctest: +SKIP
    >>> outcome = session.embed_batch(make_request_batch(chunks))                # doctest: +SKIP
    """

    def __init__(
        self,
        settings: EmbedSettings,
        *,
        api_key: str | None,
        clock: Clock = MONOTONIC,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.provider: Provider = provider_class_for(settings.provider)(
            settings.provider, clock=clock)
        self.provider.served_dim = settings.served_dim
        self.limiter = RateLimiter(settings.limits, clock=clock,
                                   max_pause_s=settings.retry.max_wait_s)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.abort = AbortFlag()
        self.stores = StoreGuard(self.abort, clock, secret=api_key)
        self._marker: tuple[fsspec.AbstractFileSystem, str] | None = None  # the output's
        self._marker_made = False
        self.watch = AnswerWatch(settings.provider.model, worker=self.worker)
        # Largest request the server accepted after a "too large" answer (learned, shrinks only).
        self.cap = RequestCap(settings.provider.max_inputs_per_request)
        self._api_key = api_key
        self._metered = MeteredCall(
            limiter=self.limiter,
            retry=settings.retry,
            rows=UsageRows(model=settings.provider.model, worker=self.worker),
            clock=clock,
            describe=self._describe,
        )
        timeout_s = settings.provider.timeout_s
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=settings.max_concurrency,
                                max_keepalive_connections=settings.max_concurrency),
            transport=transport,
        )
        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="embedpipe-embed"
        )
        self.cache: CacheIndex | None = (
            open_cache(settings.cache) if settings.cache is not None else None)
        self.progress = (
            ProgressReporter(self.worker, settings.limits.tokens_per_minute,
                             settings.progress_interval_s, self._metered.in_flight.snapshot)
            if settings.progress_interval_s else None
        )
        if settings.provider.api_key_env and not api_key:
            self.abort.set(self._redact(
                f"environment variable {settings.provider.api_key_env} is not set on worker "
                f"{self.worker}; export it where the pipeline runs "
                "(or set provider.api_key_env: null for a server without authentication)"
            ))

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        # After a dead store, threads still inside a failing write send nothing more: the run
        # does not wait for their store client's own retries to give up.
        dead = self.abort.kind == STORE
        self._executor.shutdown(wait=not dead, cancel_futures=dead)
        self._client.close()
        if self.cache is not None and self.settings.cache is not None:
            close_cache(self.settings.cache)
        if self.progress is not None:
            self.progress.close()

    def submit(self, batch: RequestBatch) -> Future[BatchOutcome]:
        """Embed ``batch`` on the session's thread pool."""
        return self._executor.submit(self.embed_batch, batch)

    @property
    def window(self) -> int:
        """How many submitted requests the stage may keep waiting: those in flight."""
        return self.settings.max_concurrency

    def flush(self) -> None:
        """Nothing is held back online (batch mode's session seals its open batch here)."""

    def take_usage(self) -> list[UsageRecord]:
        """Rows no outcome carries: none online (batch mode's re-attached lines)."""
        return []

    # -- one batch -------------------------------------------------------------------------

    def embed_batch(self, batch: RequestBatch) -> BatchOutcome:
        """Embed every chunk of ``batch``: each ends embedded or rejected, never both."""
        out = BatchOutcome()
        if self.progress is not None:
            self.progress.started()
        send = functools.partial(self._send, batch, out)
        for start, span in spans(batch.chunks, self.cap.value):
            for answer in bisect(span, send, offset=start, on_cap=self.cap.learn):
                if isinstance(answer, EmbeddedBatch):
                    out.batches.append(answer)
                elif isinstance(answer, Refused):
                    # An image that could not be read was never sent: its own reason, 0 attempts.
                    reason = getattr(answer.error, "reason", None)
                    out.rejects.extend(_rejects(answer.items, reason or PROVIDER_REJECTED,
                                                self._describe(answer.error),
                                                0 if reason else 1))
                else:
                    out.rejects.extend(answer)
        self._remember(out.batches)
        if out.batches:
            self._probe_output()
        out.pauses = self.limiter.take_pauses()
        if self.progress is not None:
            self.progress.finished(sum(len(b) for b in out.batches), len(out.rejects), out.usage,
                                   batch.n_tokens, out.pauses)
        if self.abort.kind == STORE:
            out.store_failure = self.abort.message
        else:
            out.fatal = self.abort.report_once()
        return out

    def _send(
        self, batch: RequestBatch, out: BatchOutcome, offset: int, chunks: Sequence[Chunk]
    ) -> EmbeddedBatch | list[Reject]:
        """One request for ``chunks`` (a span of ``batch``): its vectors, or its rejects.

        Per-input and "too large" errors are raised, for :func:`~transforms.bisection.bisect`
        to split on; fatal and exhausted ones end the span here. A cap the server states is
        learned before the request's turn at the :meth:`~transforms.bisection.RequestCap.admit`
        gate ends, so the requests waiting there are cut to it without being sent.
        """
        self.stores.hold()  # a store write failing: send nothing until it recovers or dies
        aborted = self.abort.message
        if aborted is not None:
            return _rejects(chunks, ABORTED, aborted, 0)
        # Texts; a multimodal provider's typed parts, each image read (an ImageError rejects
        # that record before anything is sent).
        texts = self.provider.request_inputs(chunks, self.settings.images)
        est_tokens = sum(c.n_tokens for c in chunks)
        try:
            with self.cap.admit(len(chunks)):
                aborted = self.abort.message  # again: the request it waited for may have aborted
                if aborted is not None:
                    return _rejects(chunks, ABORTED, aborted, 0)
                try:
                    result = self._metered(
                        functools.partial(self.provider.embed, self._client, texts,
                                          self._api_key, est_tokens),
                        request_id=f"{batch.batch_id}:{offset}+{len(chunks)}",
                        n_inputs=len(chunks),
                        est_tokens=est_tokens,
                        usage=out.usage,
                    )
                except RequestTooLargeError as exc:
                    if exc.max_inputs:
                        self.cap.learn(exc.max_inputs)
                    raise
                self.cap.answered(len(chunks))
        except FatalProviderError as exc:
            message = self.abort.set(
                self._redact(f"the provider refused the run: {self._describe(exc)}"))
            return _rejects(chunks, ABORTED, message, 1)
        except DimensionChangedError as exc:
            message = self.abort.set(self._redact(
                f"the server now serves vectors of another dimension: {self._describe(exc)}; "
                "it changed model mid-run. Set provider.model (and provider.dimensions) to what "
                "it serves and run again"))
            return _rejects(chunks, ABORTED, message, self.settings.retry.max_attempts)
        except RetryableError as exc:
            attempts = self.settings.retry.max_attempts
            detail = f"gave up after {attempts} attempts: {self._describe(exc)}"
            return _rejects(chunks, RETRIES_EXHAUSTED, detail, attempts)
        if self.provider.expected_dim is None:  # the first answer sets the run's dimension
            self.provider.served_dim = int(result.vectors.shape[1])
        self.watch.observe(result, n_inputs=len(chunks), est_tokens=est_tokens)
        if not result.tokens_estimated and self.limiter.plausible(est_tokens,
                                                                  result.prompt_tokens):
            out.usage_tokens += result.prompt_tokens
            out.usage_estimate += est_tokens
        return EmbeddedBatch(chunks=tuple(chunks), model=self.settings.provider.model,
                             vectors=result.vectors, sparse=result.sparse)

    # -- helpers ----------------------------------------------------------------------------

    def _remember(self, batches: list[EmbeddedBatch]) -> None:
        """Commit the batch's new vectors to the cache now, so a crash cannot lose them.

        A write that still fails after the guard's short retry stops the run (see
        :mod:`transforms.store_guard`): a dead cache is most often a dead object store, the
        output's too, and every answer from then on would be paid for and lost.
        """
        cache, spec = self.cache, self.settings.cache
        if cache is None or spec is None or not batches:
            return
        self.stores.write("cache", spec.url, functools.partial(cache.write, batches))

    def _probe_output(self) -> None:
        """Rewrite the output's marker (see :mod:`transforms.store_guard`), through the guard."""
        if self.settings.output is None or self.abort.is_set:
            return
        url, options, run_id = self.settings.output
        if self._marker is None:
            fs, root = fsspec.core.url_to_fs(url, **dict(options))
            name = f"alive-{self.worker.replace(':', '-')}"
            self._marker = (fs, f"{root.rstrip('/')}/_temporary/{run_id}/{name}")
        self.stores.write("output", url, self._touch_marker)

    def _touch_marker(self) -> None:
        assert self._marker is not None
        fs, path = self._marker
        if not self._marker_made:  # a local folder must exist first; an object store needs none
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"")
        self._marker_made = True

    def _redact(self, text: str) -> str:
        return redact(text, self._api_key)

    def _describe(self, exc: ProviderError) -> str:
        return self._redact(exc.describe())


def _rejects(chunks: Sequence[Chunk], reason: str, detail: str, attempts: int) -> list[Reject]:
    return [
        Reject(id=c.chunk_id, doc_id=c.doc_id, source=c.source, stage=STAGE_EMBED,
               reason=reason, detail=detail, attempts=attempts)
        for c in chunks
    ]
