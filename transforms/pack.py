"""The pack stage: pack chunks into requests within every provider cap.

``BatchElements`` counts elements only (its ``max_batch_weight`` does not work in Beam 2.77) and
``GroupIntoBatches`` needs keys and state; packing by tokens and bytes is ours. The packer is a
plain object (unit- and property-tested) wrapped in a DoFn that flushes the last, partial request
in ``finish_bundle``: on the FnApiRunner a stage's input is usually one Beam bundle, so requests
come out full; on Dataflow each Beam bundle ends with at most one partial request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from transforms.types import Chunk, RequestBatch

#: JSON framing per input (quotes, comma) counted against the byte cap.
PER_INPUT_OVERHEAD_BYTES = 4


@dataclass(frozen=True, slots=True)
class BatchCaps:
    """The limits of one request: inputs, tokens (by the splitter's tokenizer) and body bytes."""

    max_inputs: int
    max_tokens: int
    max_bytes: int


def make_request_batch(chunks: tuple[Chunk, ...]) -> RequestBatch:
    """A batch whose id derives from its chunk ids: the same chunks give the same id."""
    digest = hashlib.sha256("\n".join(c.chunk_id for c in chunks).encode("utf-8", "surrogatepass"))
    return RequestBatch(
        batch_id=digest.hexdigest()[:16],
        chunks=chunks,
        n_tokens=sum(c.n_tokens for c in chunks),
        n_bytes=sum(_request_bytes(c) for c in chunks),
    )


def _request_bytes(chunk: Chunk) -> int:
    return len(chunk.text.encode("utf-8", "surrogatepass")) + PER_INPUT_OVERHEAD_BYTES


class RequestPacker:
    """Greedy first-fit-in-order packing; a chunk above a cap on its own still gets a request.

    >>> packer = RequestPacker(BatchCaps(max_inputs=2, max_tokens=100, max_bytes=10_000))
    >>> [b for c in chunks for b in packer.add(c)] + list(packer.flush())   # doctest: +SKIP
    """

    def __init__(self, caps: BatchCaps) -> None:
        self.caps = caps
        self._chunks: list[Chunk] = []
        self._tokens = 0
        self._bytes = 0

    def add(self, chunk: Chunk) -> Iterator[RequestBatch]:
        """Add a chunk; yields the current batch first if the chunk would overflow it."""
        size = _request_bytes(chunk)
        if self._chunks and (
            len(self._chunks) + 1 > self.caps.max_inputs
            or self._tokens + chunk.n_tokens > self.caps.max_tokens
            or self._bytes + size > self.caps.max_bytes
        ):
            yield from self.flush()
        self._chunks.append(chunk)
        self._tokens += chunk.n_tokens
        self._bytes += size
        if len(self._chunks) >= self.caps.max_inputs:
            yield from self.flush()

    def flush(self) -> Iterator[RequestBatch]:
        if self._chunks:
            yield make_request_batch(tuple(self._chunks))
            self._chunks, self._tokens, self._bytes = [], 0, 0


class _PackFn(beam.DoFn):
    def __init__(self, caps: BatchCaps) -> None:
        self.caps = caps
        self._packer: RequestPacker | None = None

    def start_bundle(self) -> None:
        self._packer = RequestPacker(self.caps)

    def process(self, chunk: Chunk) -> Iterator[RequestBatch]:
        assert self._packer is not None
        yield from self._packer.add(chunk)

    def finish_bundle(self) -> Iterator[object]:
        assert self._packer is not None
        for batch in self._packer.flush():
            yield GlobalWindows.windowed_value(batch)


class PackRequests(beam.PTransform):
    """``Chunk`` → ``RequestBatch``, each within ``caps``."""

    def __init__(self, caps: BatchCaps) -> None:
        super().__init__()
        self.caps = caps

    def expand(self, chunks: beam.PCollection) -> beam.PCollection:
        return chunks | "Pack" >> beam.ParDo(_PackFn(self.caps))
