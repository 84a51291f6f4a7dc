"""The validate stage: raw records → documents, or rejects with a stable reason code.

One set of rules for every input format, so a bad record is named the same way whether it came
from JSONL, CSV, Parquet or a text file.

Duplicate ids are decided deterministically: the version read from the earliest
``(file URL, line)`` is the one in the output, and every other version is a ``duplicate_id``
reject that names the winner, so re-runs pick the same one. Deciding that needs every version of
an id, and waiting for the whole corpus before embedding anything (a GroupByKey on the id held
every document, whole, in memory on the in-process runner) is the one thing a backfill cannot
afford. So this stage does not wait, and settles duplicates in two tiers:

- **Here, as documents stream by** (:class:`SeenIds`): each worker remembers the ids it let
  through (128-bit hashes and sources, ~28 bytes a document) and rejects at once a version whose
  id it already let through from an earlier source. Files are read in order, line by line, so
  within one worker the winner is nearly always seen first and a loser is never sent.
- **At commit, exactly** (:mod:`transforms.dedup`): a :class:`~transforms.types.DocumentId` of
  every version let through goes to the ``ids`` output; the commit step groups those and removes
  the rows of any losing version that got past the first tier (read by another worker, or before
  its winner) from the output before the manifest names it. Such a loser has been sent: it
  costs one request's share, never correctness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import apache_beam as beam
import numpy as np

from transforms import tags
from transforms.outputs import in_global_window
from transforms.sections import ValidateConfig
from transforms.sorted_runs import SortedRuns
from transforms.types import (
    DUPLICATE_ID,
    EMPTY_TEXT,
    INVALID_IMAGE,
    INVALID_UTF8,
    MISSING_ID,
    NOT_TEXT,
    STAGE_VALIDATE,
    TOO_LARGE,
    Document,
    DocumentId,
    DocumentIds,
    RawRecord,
    Reject,
    format_source,
)


def normalize_id(value: object) -> str | None:
    """An id as a string: strings are stripped, integers formatted; anything else is missing.

    Stripped because ids typed or exported by hand carry stray spaces (``"1, text"`` in a CSV)
    that no reader of the output expects; formatted because the output's id column is a string.
    So ``" padded "`` is ``"padded"`` and ``1`` is ``"1"``: two records whose ids meet here
    are duplicates, and the later one is a ``duplicate_id`` reject naming both sources, never a
    silent overwrite. Floats and booleans are refused rather than formatted: ``1.0`` vs ``1`` or
    ``True`` are the kind of silent coercion that later makes two documents share an id.
    """
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def validate_record(record: RawRecord, max_document_bytes: int, *,
                    images: bool = False) -> Document | Reject:
    """Apply the document rules to one record (pure; the unit tests call it directly).

    With ``images`` (a multimodal run), a record's ``image`` must be a string reference when
    present, and a record with an image needs no text: it is embedded from its image alone.
    Whether the image is readable is the image stage's business (:mod:`transforms.images`).
    """
    doc_id = normalize_id(record.doc_id)

    def reject(reason: str, detail: str) -> Reject:
        shown_id = doc_id.encode("utf-8", "replace").decode() if doc_id else None
        return Reject(id=shown_id, doc_id=shown_id, source=record.source, stage=STAGE_VALIDATE,
                      reason=reason, detail=detail)

    if doc_id is None:
        shown = "absent" if record.doc_id is None else f"{type(record.doc_id).__name__} {record.doc_id!r}"
        return reject(MISSING_ID, f"id is {shown[:80]}; every record needs a non-empty id")
    try:
        doc_id.encode("utf-8")
    except UnicodeEncodeError:
        return reject(INVALID_UTF8, "id holds an unpaired surrogate")
    text = record.text
    image = None
    if images:
        image, problem = _image_reference(record.image)
        if problem is not None:
            return reject(INVALID_IMAGE, problem)
        if image is not None and (text is None or (isinstance(text, str) and _blank(text))):
            text = ""  # an image alone is a record: its vector is its image's
    if text is None:
        return reject(EMPTY_TEXT, "text is null or absent")
    if not isinstance(text, str):
        return reject(NOT_TEXT, f"text is a {type(text).__name__}, not a string")
    if image is None and _blank(text):
        return reject(EMPTY_TEXT, "text is empty, or only whitespace, NUL, control or zero-width "
                                  "characters")
    try:
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        # JSON "\\ud800" escapes decode to lone surrogates: valid JSON, not valid Unicode text.
        return reject(INVALID_UTF8, f"text holds an unpaired surrogate at character {exc.start}")
    if size > max_document_bytes:
        return reject(
            TOO_LARGE,
            f"text is {size} bytes, over validate.max_document_bytes={max_document_bytes}",
        )
    return Document(doc_id=doc_id, text=text, source_url=record.source_url,
                    position=record.position, metadata=record.metadata, image=image)


def _blank(text: str) -> bool:
    return not text.strip() or (text[0] in _BLANK and not text.strip(_BLANK))


def _image_reference(value: object) -> tuple[str | None, str | None]:
    """``(reference, None)``, ``(None, None)`` for no image, or ``(None, why it is no image)``."""
    if value is None:
        return None, None
    if not isinstance(value, str):
        return None, (f"image field is a {type(value).__name__}, not a path or URL; set "
                      "input.image_field to the field holding the image's reference")
    value = value.strip()
    return (value or None), None


#: What a text made only of is no text: whitespace (all that ``str.strip`` removes, none past
#: U+3000), control characters (NUL above all) and the zero-width or invisible format
#: characters. Checked only when a text starts with one, so that the usual text costs nothing.
_BLANK = "".join(
    [chr(c) for c in range(0x3001) if chr(c).isspace()] + [chr(c) for c in range(0x20)]
    + ["\x7f", "\u00ad", "\u180e", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"])


def duplicate_detail(earlier: str, later: str, why: str) -> str:
    """A ``duplicate_id`` reject's detail: both sources, so that either can be found."""
    return f"id at {later} also at {earlier}, {why}"


_Version = TypeVar("_Version", Document, DocumentId)


def pick_winner(versions: Iterable[_Version]) -> tuple[_Version, list[Reject]]:
    """The earliest version of a document id, and a ``duplicate_id`` reject for every other."""
    ordered = sorted(versions, key=lambda d: (d.source_url, -1 if d.position is None
                                              else d.position))
    winner = ordered[0]
    rejects = [
        Reject(id=d.doc_id, doc_id=d.doc_id, source=d.source, stage=STAGE_VALIDATE,
               reason=DUPLICATE_ID,
               detail=duplicate_detail(winner.source, d.source, "which is the one embedded"))
        for d in ordered[1:]
    ]
    return winner, rejects


def id_key(doc_id: str) -> int:
    """The first half of :func:`_id_hashes` for one id (the ``DocumentId.key``)."""
    return int(_id_hashes([doc_id])[0][0])


def _id_hashes(doc_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit halves of a 128-bit hash of each id (collisions: ~n²/2**129)."""
    digests = b"".join(hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=16)
                       .digest() for i in doc_ids)
    halves = np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)
    return halves[:, 0].copy(), halves[:, 1].copy()


class SeenIds:
    """The ids one worker let through, with their sources: the first tier of duplicate ids.

    :meth:`admit` takes documents in batches (one vectorised probe a batch) and returns, for
    each, either the document (let it through) or a ``duplicate_id`` reject naming the earlier
    source it was seen at. A version from the same source as the one seen is the same record
    read again (a retried Beam bundle) and goes through.
    """

    def __init__(self) -> None:
        self._runs = SortedRuns()
        self.last_keys = np.zeros(0, dtype=np.uint64)  # the id hashes of the last batch
        self._urls: list[str] = []
        self._url_numbers: dict[str, int] = {}

    def admit(self, docs: Sequence[Document]) -> list[Document | Reject]:
        if not docs:
            self.last_keys = np.zeros(0, dtype=np.uint64)
            return []
        high, low = _id_hashes([d.doc_id for d in docs])
        found, seen_low, seen_url, seen_position = (
            self._runs.find(high) if len(self._runs) else (np.zeros(len(docs), bool),) * 4)
        self.last_keys = high  # read by the DoFn for the ids it writes
        if not found.any() and len(np.unique(high)) == len(docs):
            # The usual batch: no id seen before, none twice. No per-document Python.
            urls = [d.source_url for d in docs]
            numbers = ([self._url_number(urls[0])] * len(docs) if urls.count(urls[0]) == len(urls)
                       else [self._url_number(u) for u in urls])
            self._runs.add(high, low, np.array(numbers, dtype=np.uint32),
                           np.array([_order(d)[1] for d in docs], dtype=np.int64))
            return list(docs)
        out: list[Document | Reject] = []
        first_in_batch: dict[tuple[int, int], Document] = {}
        for i, doc in enumerate(docs):
            earlier: str | None = None
            if found[i] and seen_low[i] == low[i]:
                url = self._urls[int(seen_url[i])]
                position = int(seen_position[i])
                if (url, position) < _order(doc):
                    earlier = format_source(url, None if position < 0 else position)
            twin = first_in_batch.get((int(high[i]), int(low[i])))
            if earlier is None and twin is not None and twin.sort_key < doc.sort_key:
                earlier = twin.source
            if earlier is not None:
                out.append(Reject(id=doc.doc_id, doc_id=doc.doc_id, source=doc.source,
                                  stage=STAGE_VALIDATE, reason=DUPLICATE_ID,
                                  detail=duplicate_detail(earlier, doc.source,
                                                          "which was read earlier")))
                continue
            if twin is None or doc.sort_key < twin.sort_key:
                first_in_batch[(int(high[i]), int(low[i]))] = doc
            out.append(doc)
        admitted = [i for i, item in enumerate(out) if isinstance(item, Document)]
        self._runs.add(high[admitted], low[admitted],
                       np.array([self._url_number(docs[i].source_url) for i in admitted],
                                dtype=np.uint32),
                       np.array([_order(docs[i])[1] for i in admitted], dtype=np.int64))
        return out

    def _url_number(self, url: str) -> int:
        number = self._url_numbers.get(url)
        if number is None:
            number = self._url_numbers[url] = len(self._urls)
            self._urls.append(url)
        return number


def _order(doc: Document) -> tuple[str, int]:
    return doc.sort_key


#: Valid documents checked against :class:`SeenIds` at once.
ADMIT_BATCH = 256


class _ValidateFn(beam.DoFn):
    def __init__(self, max_document_bytes: int, images: bool = False) -> None:
        self.max_document_bytes = max_document_bytes
        self.images = images

    def setup(self) -> None:
        self._seen = SeenIds()  # lives as long as the DoFn: across the bundles of a worker

    def start_bundle(self) -> None:
        self._batch: list[Document] = []

    def process(self, record: RawRecord) -> Iterator[object]:
        result = validate_record(record, self.max_document_bytes, images=self.images)
        if isinstance(result, Reject):
            yield beam.pvalue.TaggedOutput(tags.REJECTS, result)
            return
        self._batch.append(result)
        if len(self._batch) >= ADMIT_BATCH:
            yield from self._admit()

    def finish_bundle(self) -> Iterator[object]:
        yield from in_global_window(self._admit())

    def _admit(self) -> Iterator[object]:
        batch, self._batch = self._batch, []
        admitted = self._seen.admit(batch)
        keys = self._seen.last_keys
        ids: list[DocumentId] = []
        for i, item in enumerate(admitted):
            if isinstance(item, Reject):
                yield beam.pvalue.TaggedOutput(tags.REJECTS, item)
            else:
                yield item
                ids.append(DocumentId(item.doc_id, item.source_url, item.position, int(keys[i])))
        if ids:  # one element per batch: a document's id costs no Beam element of its own
            yield beam.pvalue.TaggedOutput(tags.IDS, DocumentIds(tuple(ids)))


class ValidateDocuments(beam.PTransform):
    """``RawRecord`` → ``{"documents": Document, "rejects": Reject, "ids": DocumentIds}``.

    Documents may share an id here; see the module docstring for where that is settled.
    """

    def __init__(self, cfg: ValidateConfig, *, images: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.images = images  # a multimodal run: records may be an image without text

    def expand(self, records: beam.PCollection) -> dict[str, beam.PCollection]:
        checked = records | "CheckRecords" >> beam.ParDo(
            _ValidateFn(self.cfg.max_document_bytes, self.images)
        ).with_output_types(
            Document, **{tags.REJECTS: Reject, tags.IDS: DocumentIds}
        ).with_outputs(tags.REJECTS, tags.IDS, main=tags.DOCUMENTS)
        return {tags.DOCUMENTS: checked.documents, tags.REJECTS: checked[tags.REJECTS],
                tags.IDS: checked[tags.IDS]}
