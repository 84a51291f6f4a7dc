"""The embed stage: chunks in, aligned vectors out, with rejects and one usage row per attempt.

:class:`EmbedChunks` is the stage; its one DoFn, :class:`EmbedChunksFn`, serves chunks from the
cache, packs the rest into requests and keeps a window of at most ``limits.max_concurrency``
requests in flight, yielding results as they complete and waiting for the rest in
``finish_bundle``; memory is bounded by the window, not by the Beam bundle.

What happens to one request (rate limits, retries, bisection of a refused request, the abort of
a run the provider refuses, usage rows) is the process's :class:`~transforms.embed_session.
EmbedSession`, shared by every DoFn instance and thread of the process; see
:mod:`transforms.embed_session` and the small modules it composes (:mod:`transforms.bisection`,
:mod:`transforms.metered`, :mod:`transforms.usage`, :mod:`transforms.abort`).
"""

from __future__ import annotations

import functools
import typing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, replace

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms import tags
from transforms.embed_session import BatchOutcome, EmbedSession, EmbedSettings
from transforms.errors import StoreError
from transforms.limits import PAUSE_CAUSES
from transforms.outputs import in_global_window
from transforms.pack import BatchCaps, RequestPacker
from transforms.process_memory import (
    release_freed_memory,
    restore_garbage_collector,
    tune_garbage_collector,
)
from transforms.sessions import Session, acquire_session, release_session
from transforms.types import (
    OUTCOME_OK,
    OUTCOME_RETRY,
    Chunk,
    EmbeddedBatch,
    Reject,
    RequestBatch,
    UsageRecord,
)

# The session's names are re-exported: the composition root builds settings and runs the
# preflight through this module, the stage's one entry point.
__all__ = [
    "LOOKUP_GROUP", "BatchOutcome",
    "CacheCounts", "EmbedChunks", "EmbedChunksFn", "EmbedSession", "EmbedSettings",
    "acquire_session", "release_session",
]



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
        # The limiter's pauses by cause (429s, empty rate windows, unbelievable usage) and the
        # provider's token count against ours, for the run summary.
        self.paused_ms = counter("paused_ms")
        self.pauses = {cause: counter(f"pauses.{cause}") for cause in PAUSE_CAUSES}
        self.usage_tokens = counter("usage_tokens_reported")
        self.usage_estimate = counter("usage_tokens_estimated")

    def record(self, outcome: BatchOutcome) -> None:
        for cause, n in outcome.pauses.events.items():
            self.pauses[cause].inc(n)
        if outcome.pauses.seconds:
            self.paused_ms.inc(int(outcome.pauses.seconds * 1000))
        if outcome.usage_estimate:
            self.usage_tokens.inc(outcome.usage_tokens)
            self.usage_estimate.inc(outcome.usage_estimate)
        for row in outcome.usage:
            self.requests.inc()
            self.latency_ms.update(int(row.latency_ms))
            if row.outcome == OUTCOME_RETRY:
                self.retries.inc()
            if row.http_status == 429:
                self.throttled.inc()
            if row.outcome == OUTCOME_OK:
                self.prompt_tokens.inc(row.prompt_tokens)




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
    :class:`~transforms.cache.CacheIndex`, :class:`~transforms.pack.RequestPacker` and the
    process's :class:`EmbedSession`.

    Memory is bounded by ``LOOKUP_GROUP`` chunks, one request in the packer and
    ``max_concurrency`` requests in flight, whatever the size of the Beam bundle.
    """

    def __init__(self, settings: EmbedSettings, caps: BatchCaps) -> None:
        self.settings = settings
        self.caps = caps
        self._session: Session | None = None
        self._metrics = _EmbedMetrics()

    def setup(self) -> None:
        tune_garbage_collector()
        self._gc_tuned = True
        self._session = acquire_session(self.settings)

    def start_bundle(self) -> None:
        self._waiting: list[Chunk] = []
        self._packer = RequestPacker(self.caps)
        self._inflight: deque[tuple[RequestBatch, Future[BatchOutcome]]] = deque()
        self._claimed: dict[str, list[Chunk]] = {}
        self._counts = CacheCounts()

    def process(self, chunk: Chunk) -> Iterator[object]:
        self._waiting.append(chunk)
        if len(self._waiting) >= LOOKUP_GROUP:
            yield from self._route()

    def finish_bundle(self) -> Iterator[object]:
        assert self._session is not None
        outputs = [*self._route(), *self._submit(self._packer.flush())]
        self._session.flush()  # batch mode: the open batch goes out now
        while self._inflight:
            outputs.extend(self._emit(*self._inflight.popleft()))
        outputs.extend(beam.pvalue.TaggedOutput(tags.USAGE, row)
                       for row in self._session.take_usage())
        if self._claimed:  # every claim is settled by the answer of the chunk that holds it
            raise AssertionError(f"{len(self._claimed)} chunks were left waiting for a vector")
        outputs.append(beam.pvalue.TaggedOutput(tags.CACHE, self._counts.as_tuple()))
        yield from in_global_window(outputs)

    def teardown(self) -> None:
        if self._session is not None:
            release_session(self.settings)
            self._session = None
        if getattr(self, "_gc_tuned", False):
            self._gc_tuned = False
            restore_garbage_collector()

    # -- routing -------------------------------------------------------------------------------

    def _route(self) -> Iterator[object]:
        """Serve the waiting chunks from the cache, claim or join the rest, pack what is new."""
        assert self._session is not None
        chunks, self._waiting = self._waiting, []
        cache = self._session.cache
        if cache is not None and chunks:
            served_at: list[np.ndarray] = []
            for positions, vectors, sparse in cache.lookup_groups(chunks):
                served = tuple(chunks[i] for i in positions.tolist())
                self._counts.hits += len(served)
                self._counts.tokens_saved += sum(c.n_tokens for c in served)
                self._metrics.chunks_embedded.inc(len(served))
                served_at.append(positions)
                yield EmbeddedBatch(chunks=served, model=self.settings.provider.model,
                                    vectors=vectors, sparse=sparse)
            if served_at:
                missed = np.ones(len(chunks), dtype=bool)
                for positions in served_at:
                    missed[positions] = False
                chunks = [chunks[i] for i in np.flatnonzero(missed).tolist()]
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

    def _submit(self, requests: Iterator[RequestBatch]) -> Iterator[object]:
        assert self._session is not None
        for request in requests:
            self._inflight.append((request, self._session.submit(request)))
            while len(self._inflight) >= self._session.window:
                self._session.flush()  # batch mode: what waits must be on its way first
                wait([f for _, f in self._inflight], return_when=FIRST_COMPLETED)
                for item in [x for x in self._inflight if x[1].done()]:
                    self._inflight.remove(item)
                    yield from self._emit(*item)

    def _emit(self, request: RequestBatch, future: Future[BatchOutcome]) -> Iterator[object]:
        """A finished request's outputs, with every chunk that waited on one of its texts."""
        outcome = future.result()
        if outcome.store_failure is not None:
            # The output or cache is dead: fail the stage, so the run commits nothing (exit 4).
            raise StoreError(outcome.store_failure)
        release_freed_memory()
        self._metrics.record(outcome)
        for batch in outcome.batches:
            batch = self._with_twins(batch)
            self._metrics.chunks_embedded.inc(len(batch))
            yield batch
        by_key: dict[tuple[str, str], list[Chunk]] = {}
        for chunk in request.chunks:
            by_key.setdefault((chunk.chunk_id, chunk.source), []).append(chunk)
        for reject in outcome.rejects:
            chunk = by_key[(reject.id or "", reject.source)].pop()
            twins = self._claimed.pop(chunk.content_sha256, ())
            self._metrics.chunks_failed.inc(1 + len(twins))
            yield beam.pvalue.TaggedOutput(tags.REJECTS, reject)
            for twin in twins:
                yield beam.pvalue.TaggedOutput(tags.REJECTS, replace(
                    reject, id=twin.chunk_id, doc_id=twin.doc_id, source=twin.source))
        for usage in outcome.usage:
            yield beam.pvalue.TaggedOutput(tags.USAGE, usage)
        if outcome.fatal is not None:
            yield beam.pvalue.TaggedOutput(tags.FATAL, outcome.fatal)

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
        sparse = None if batch.sparse is None else tuple(batch.sparse[i] for i in rows)
        return EmbeddedBatch(chunks=tuple(chunks), model=batch.model, vectors=batch.vectors[rows],
                             sparse=sparse)


class EmbedChunks(beam.PTransform):
    """``Chunk`` → ``{"vectors": EmbeddedBatch, "rejects", "usage", "fatal": str, "cache"}``.

    ``cache`` holds one :meth:`CacheCounts.as_tuple` per Beam bundle.
    """

    def __init__(self, settings: EmbedSettings, caps: BatchCaps) -> None:
        super().__init__()
        self.settings = settings
        self.caps = caps

    def expand(self, chunks: beam.PCollection) -> dict[str, beam.PCollection]:
        results = chunks | "CallProvider" >> beam.ParDo(
            EmbedChunksFn(self.settings, self.caps)
        ).with_output_types(
            EmbeddedBatch, **{tags.REJECTS: Reject, tags.USAGE: UsageRecord, tags.FATAL: str,
                              tags.CACHE: typing.Any}
        ).with_outputs(tags.REJECTS, tags.USAGE, tags.FATAL, tags.CACHE, main=tags.VECTORS)
        return {
            tags.VECTORS: results.vectors,
            tags.REJECTS: results[tags.REJECTS],
            tags.USAGE: results[tags.USAGE],
            tags.FATAL: results[tags.FATAL],
            tags.CACHE: results[tags.CACHE],
        }
