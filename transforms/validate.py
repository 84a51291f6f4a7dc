"""The validate stage: raw records → documents, or rejects with a stable reason code.

One set of rules for every input format, so a bad record is named the same way whether it came
from JSONL, CSV, Parquet or a text file. Duplicate ids are resolved here too, deterministically:
the version read from the earliest ``(file URL, line)`` is embedded and every other version is a
``duplicate_id`` reject that names the winner, so re-runs pick the same one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import apache_beam as beam

from pipeline.config import ValidateConfig
from transforms.types import (
    DUPLICATE_ID,
    EMPTY_TEXT,
    INVALID_UTF8,
    MISSING_ID,
    NOT_TEXT,
    STAGE_VALIDATE,
    TOO_LARGE,
    Document,
    RawRecord,
    Reject,
)

TAG_REJECTS = "rejects"


def normalize_id(value: object) -> str | None:
    """An id as a string: strings are stripped, integers formatted; anything else is missing.

    Floats and booleans are refused rather than formatted: ``1.0`` vs ``1`` or ``True`` are the
    kind of silent coercion that later makes two documents share an id.
    """
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def validate_record(record: RawRecord, max_document_bytes: int) -> Document | Reject:
    """Apply the document rules to one record (pure; the unit tests call it directly)."""
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
    if text is None:
        return reject(EMPTY_TEXT, "text is null or absent")
    if not isinstance(text, str):
        return reject(NOT_TEXT, f"text is a {type(text).__name__}, not a string")
    if not text.strip():
        return reject(EMPTY_TEXT, "text is empty or whitespace only")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        # JSON "\\ud800" escapes decode to lone surrogates: valid JSON, not valid Unicode text.
        return reject(INVALID_UTF8, f"text holds an unpaired surrogate at character {exc.start}")
    if size > max_document_bytes:
        return reject(
            TOO_LARGE,
            f"text is {size} bytes, over validate.max_document_bytes={max_document_bytes}",
        )
    return Document(doc_id=doc_id, text=text, source_url=record.source_url,
                    position=record.position, metadata=record.metadata)


def pick_winner(versions: Iterable[Document]) -> tuple[Document, list[Reject]]:
    """The earliest version of a document id, and a ``duplicate_id`` reject for every other."""
    ordered = sorted(versions, key=lambda d: d.sort_key)
    winner = ordered[0]
    rejects = [
        Reject(id=d.doc_id, doc_id=d.doc_id, source=d.source, stage=STAGE_VALIDATE,
               reason=DUPLICATE_ID, detail=f"id also at {winner.source}, which is the one embedded")
        for d in ordered[1:]
    ]
    return winner, rejects


class _ValidateFn(beam.DoFn):
    def __init__(self, max_document_bytes: int) -> None:
        self.max_document_bytes = max_document_bytes

    def process(self, record: RawRecord) -> Iterator[object]:
        result = validate_record(record, self.max_document_bytes)
        if isinstance(result, Reject):
            yield beam.pvalue.TaggedOutput(TAG_REJECTS, result)
        else:
            yield result


def _resolve_duplicates(item: tuple[str, Iterable[Document]]) -> Iterator[object]:
    _, versions = item
    winner, rejects = pick_winner(versions)
    yield winner
    for reject in rejects:
        yield beam.pvalue.TaggedOutput(TAG_REJECTS, reject)


class ValidateDocuments(beam.PTransform):
    """``RawRecord`` → ``{"documents": Document, "rejects": Reject}``, ids unique."""

    def __init__(self, cfg: ValidateConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def expand(self, records: beam.PCollection) -> dict[str, beam.PCollection]:
        checked = records | "CheckRecords" >> beam.ParDo(
            _ValidateFn(self.cfg.max_document_bytes)
        ).with_outputs(TAG_REJECTS, main="documents")
        unique = (
            checked.documents
            | "KeyById" >> beam.Map(lambda d: (d.doc_id, d))
            | "GroupById" >> beam.GroupByKey()
            | "DedupIds" >> beam.FlatMap(_resolve_duplicates).with_outputs(
                TAG_REJECTS, main="documents")
        )
        rejects = (checked[TAG_REJECTS], unique[TAG_REJECTS]) | "MergeRejects" >> beam.Flatten()
        return {"documents": unique.documents, "rejects": rejects}
