"""Batch mode's records: a submitted request, a request line, a batch waited for.

Mutable on purpose and private to batch mode: :class:`~transforms.batch_session.BatchSession`
settles a request chunk by chunk as its lines come back, under its own lock.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future
from dataclasses import dataclass, field

from transforms.batch_api import BatchInfo
from transforms.embed_session import BatchOutcome
from transforms.types import Chunk, RequestBatch

__all__ = ["Job", "Line", "Pending", "bare_chunk", "sha256_of"]


@dataclass(eq=False)
class Pending:
    """One request the stage submitted: settled chunk by chunk, resolved when none is left."""

    request: RequestBatch
    future: Future[BatchOutcome]
    left: int
    outcome: BatchOutcome = field(default_factory=BatchOutcome)


@dataclass(eq=False)
class Line:
    """A request line: the chunks of one submitted request not already in an earlier batch."""

    custom_id: str
    chunks: tuple[Chunk, ...]
    pending: Pending
    attempt: int = 1


@dataclass(eq=False)
class Job:
    """A batch this process waits for: its own lines, or (re-attached) the texts of each line."""

    info: BatchInfo
    lines: dict[str, Line] = field(default_factory=dict)
    attached: dict[str, list[str]] | None = None  # custom_id -> content sha256 per input
    started: float = 0.0  # when it was created (or found), on the session's clock
    cancelled_by_us: bool = False
    unreadable_since: float | None = None  # the Batch API has not answered about it since then


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def bare_chunk(sha: str) -> Chunk:
    """A chunk that only carries its text's digest: what the cache keys a vector by."""
    return Chunk(chunk_id=sha, doc_id="", chunk_index=0, char_start=0, char_end=0, n_tokens=0,
                 content_sha256=sha, text="", source="")
