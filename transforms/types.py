"""The records that flow between stages: the data contracts of the pipeline.

Every record is a frozen, slotted dataclass. Stages never mutate an element they receive; they
build a new one (``dataclasses.replace``) so that Beam may hand the same object to several
consumers, and so that a retried Beam bundle sees exactly what the first attempt saw.

Flow::

    SourceFile ─read─► RawRecord ─validate─► Document ─split─► Chunk ─pack─► RequestBatch
    RequestBatch ─embed─► EmbeddedBatch | Reject | UsageRecord ─write─► WrittenFile ─► manifest.json

Metadata is kept as a tuple of ``(name, value)`` pairs in the order of ``input.metadata_fields``:
hashable, picklable and impossible to mutate by accident, unlike a shared ``dict``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Metadata = tuple[tuple[str, Any], ...]
#: A sparse vector: indices (int32, strictly increasing) and their values (float32).
SparseVector = tuple[np.ndarray, np.ndarray]

# Reject stages (contract: rejects.stage).
STAGE_READ = "read"
STAGE_VALIDATE = "validate"
STAGE_SPLIT = "split"
STAGE_EMBED = "embed"

# Stable reject reason codes (contract: rejects.reason). Add, never rename.
EMPTY_TEXT = "empty_text"
MISSING_ID = "missing_id"
DUPLICATE_ID = "duplicate_id"
NOT_TEXT = "not_text"
INVALID_UTF8 = "invalid_utf8"
MALFORMED_RECORD = "malformed_record"
UNREADABLE_FILE = "unreadable_file"
NO_FILES_MATCHED = "no_files_matched"
MISSING_FIELD = "missing_field"
TOO_LARGE = "too_large"
SPLIT_FAILED = "split_failed"
PROVIDER_REJECTED = "provider_rejected"
RETRIES_EXHAUSTED = "retries_exhausted"
ABORTED = "aborted"
# Multimodal runs (input.image_field): the record's image could not be used.
IMAGE_UNREADABLE = "image_unreadable"  # missing, or storage refused to read it
INVALID_IMAGE = "invalid_image"  # not an image (or one of a format the API does not take)
IMAGE_TOO_LARGE = "image_too_large"  # over the byte or pixel cap (transforms.images)

# Usage outcomes (contract: usage.outcome).
OUTCOME_OK = "ok"
OUTCOME_RETRY = "retry"
OUTCOME_FAILED = "failed"


def format_source(url: str, position: int | None) -> str:
    """``url:position`` (a 1-based line or row number), or the bare URL for whole-file documents."""
    return url if position is None else f"{url}:{position}"


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One matched input file, produced by the match step and read by one worker.

    ``root`` is the non-glob prefix of the pattern that matched it: text documents take their id
    from the path relative to it, so ids do not change when a corpus moves between buckets.
    """

    url: str
    root: str
    format: str
    size: int


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A record as read, before validation: fields are whatever the file held.

    ``doc_id`` and ``text`` are untyped on purpose; deciding what is acceptable is the validate
    stage's job, so every format shares one set of rules and reason codes.
    """

    source_url: str
    position: int | None
    doc_id: Any
    text: Any
    metadata: Metadata = ()
    #: The value of ``input.image_field`` (None when it is not set, or the record has none).
    image: Any = None

    @property
    def source(self) -> str:
        return format_source(self.source_url, self.position)


@dataclass(frozen=True, slots=True)
class Document:
    """A valid document: a non-empty id and non-blank text within the size limit.

    In a multimodal run (``input.image_field``) ``image`` is the record's image reference as
    given, and ``text`` may be empty when there is an image.
    """

    doc_id: str
    text: str
    source_url: str
    position: int | None
    metadata: Metadata = ()
    image: str | None = None

    @property
    def source(self) -> str:
        return format_source(self.source_url, self.position)

    @property
    def sort_key(self) -> tuple[str, int]:
        """Deterministic order among duplicates: the earliest file, then the earliest line wins."""
        return (self.source_url, -1 if self.position is None else self.position)


def fingerprint(chunk_id: str, source: str) -> int:
    """A 64-bit hash of one chunk's identity: its id and where its document was read.

    The run's checksum is the sum of these (mod 2**64) over every chunk the splitter made; the
    commit step checks it against the same sum over every vector row and chunk reject written, so
    a chunk that vanished between the stages (or one written twice) cannot go unnoticed even when
    the counts happen to agree.
    """
    data = f"{chunk_id}\x00{source}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


FINGERPRINT_MODULUS = 2**64


@dataclass(frozen=True, slots=True)
class DocumentId:
    """A valid document's id and where it was read: all duplicate-id detection needs.

    Duplicate ids are decided at commit from these few bytes per document, not from whole
    documents held in a shuffle (see :mod:`transforms.validate`).
    """

    doc_id: str
    source_url: str
    position: int | None
    #: 64 bits of a hash of ``doc_id``: the commit step groups these (8 bytes a document) and
    #: reads ids only where a key repeats. 0 when unknown (the commit step then hashes).
    key: int = 0

    @property
    def source(self) -> str:
        return format_source(self.source_url, self.position)


@dataclass(frozen=True, slots=True)
class DocumentIds:
    """The ids one validate batch let through, as one element (one Beam element per batch)."""

    ids: tuple[DocumentId, ...]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class ImagePart:
    """A record's checked image, as it travels with its text to the embed stage.

    The bytes do not travel: an element may wait in the embed stage's lookup group, and 2048
    images of 10 MB would not fit in memory. The embed stage reads them again from ``url`` and
    checks them against ``sha256`` (an image changed since it was checked is a reject, never a
    vector of other bytes). An ``http(s)`` image is passed to the provider as is: it has no
    ``sha256`` and no size, as embedpipe never fetches it.
    """

    reference: str  # as the record gave it (the ``image`` column)
    url: str  # where to read it: the resolved fsspec URL, or the http(s)/data: URL itself
    sha256: str | None  # of the bytes; None for an http(s) image
    mime: str | None  # image/png ...; None for an http(s) image
    width: int = 0
    height: int = 0
    n_bytes: int = 0
    est_tokens: int = 0  # the provider's image tokens, estimated from the header

    @property
    def remote(self) -> bool:
        """Whether the provider fetches it (an http(s) URL): embedpipe sends the URL."""
        return self.sha256 is None


@dataclass(frozen=True, slots=True)
class Chunk:
    """A token-bounded slice of a document: ``document.text[char_start:char_end] == text``."""

    chunk_id: str
    doc_id: str
    chunk_index: int
    char_start: int
    char_end: int
    n_tokens: int
    content_sha256: str
    text: str
    source: str
    metadata: Metadata = ()
    #: ``fingerprint(chunk_id, source)``, computed once by the splitter and summed by the
    #: writers: the chunk's term in the run's accounting checksum.
    fingerprint: int = 0
    #: The record's image, in a multimodal run (one chunk per record, text and image fused).
    image: ImagePart | None = None


@dataclass(frozen=True, slots=True)
class RequestBatch:
    """The chunks of one embedding request, within every provider cap.

    ``batch_id`` is derived from the chunk ids, so the same chunks always form the same id in
    logs and usage rows.
    """

    batch_id: str
    chunks: tuple[Chunk, ...]
    n_tokens: int
    n_bytes: int

    def __len__(self) -> int:
        return len(self.chunks)


@dataclass(frozen=True, slots=True, eq=False)
class EmbeddedBatch:
    """Chunks and their vectors: row ``i`` of ``vectors`` belongs to ``chunks[i]``.

    Vectors travel as one float32 matrix per request rather than one array per chunk: a single
    buffer to pickle between stages and to hand to Arrow, instead of thousands of small ones.
    """

    chunks: tuple[Chunk, ...]
    model: str
    vectors: np.ndarray
    #: With ``provider.sparse``: row ``i``'s sparse vector as (indices int32, values float32),
    #: sorted by index; None when the run asks for none.
    sparse: tuple[SparseVector, ...] | None = None

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.chunks):
            raise ValueError(
                f"{self.vectors.shape[0]} vectors for {len(self.chunks)} chunks: misaligned batch"
            )
        if self.sparse is not None and len(self.sparse) != len(self.chunks):
            raise ValueError(
                f"{len(self.sparse)} sparse vectors for {len(self.chunks)} chunks: misaligned")

    def __len__(self) -> int:
        return len(self.chunks)


@dataclass(frozen=True, slots=True)
class Reject:
    """A record or chunk that did not get a vector, and why (contract: ``rejects/``)."""

    id: str | None
    doc_id: str | None
    source: str
    stage: str
    reason: str
    detail: str = ""
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One HTTP attempt, successful or not (contract: ``usage/``)."""

    request_id: str
    provider_request_id: str | None
    model: str
    n_inputs: int
    prompt_tokens: int
    total_tokens: int
    tokens_estimated: bool
    attempt: int
    http_status: int | None
    outcome: str
    error: str | None
    latency_ms: float
    started_at: dt.datetime
    worker: str
    #: The model the answer named (None: it named none, or there was no answer); ``model`` is
    #: the configured one.
    served_model: str | None = None
    #: ``online``, or ``batch`` for a line of an OpenAI batch (``batch_id`` names the batch).
    mode: str = "online"
    batch_id: str | None = None
    #: The answer's ``prompt_tokens_details`` (multimodal APIs): tokens of text and of images.
    text_tokens: int | None = None
    image_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """A committed output file, reported to the manifest step.

    ``stats`` carries per-file aggregates (reject reasons, usage sums) so that the manifest is
    computed from what was actually written, not from a second pass over the data.
    """

    kind: str
    path: str
    rows: int
    stats: tuple[tuple[str, int], ...] = field(default=())


@dataclass(frozen=True, slots=True)
class FileRange:
    """A part of one input file, read by one worker: what spreads one huge file over many.

    ``start`` and ``end`` (exclusive) are byte offsets in JSONL and CSV, each at the start of a
    line or row, and row group indexes in Parquet. ``end`` is None for a file read whole: a
    compressed or text file, a small one, or one with nowhere to cut. ``first_position`` is the
    1-based line or data row number of the range's first line or row, counted from the start of
    the file when the range was planned: a worker that starts mid-file cannot count what came
    before, and without it a record's source would not be exact.
    """

    source: SourceFile
    start: int = 0
    end: int | None = None
    first_position: int = 1

    @property
    def whole(self) -> bool:
        return self.end is None
