"""Document rules and the deterministic duplicate winner."""

from __future__ import annotations

import pytest

from transforms.types import Document, RawRecord, Reject
from transforms.validate import normalize_id, pick_winner, validate_record


def rec(doc_id=None, text=None, url="file:///c/a.jsonl", line=1) -> RawRecord:
    return RawRecord(source_url=url, position=line, doc_id=doc_id, text=text)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (rec(None, "t"), "missing_id"),
        (rec("", "t"), "missing_id"),
        (rec("   ", "t"), "missing_id"),
        (rec(1.5, "t"), "missing_id"),
        (rec(True, "t"), "missing_id"),
        (rec("a", None), "empty_text"),
        (rec("a", ""), "empty_text"),
        (rec("a", " \n\t "), "empty_text"),
        (rec("a", 42), "not_text"),
        (rec("a", ["x"]), "not_text"),
        (rec("a", "é" * 60), "too_large"),
        (rec("a", "x\ud800y"), "invalid_utf8"),
        (rec("a\udc80", "text"), "invalid_utf8"),  # 120 bytes in UTF-8 though only 60 characters
    ],
)
def test_bad_records_get_their_reason(record: RawRecord, reason: str) -> None:
    result = validate_record(record, max_document_bytes=100)
    assert isinstance(result, Reject)
    assert result.reason == reason
    assert result.stage == "validate"
    assert result.source == "file:///c/a.jsonl:1"
    assert result.detail


def test_valid_record_becomes_document_with_integer_id_as_string() -> None:
    result = validate_record(rec(7, "hello", line=3), max_document_bytes=100)
    assert result == Document("7", "hello", "file:///c/a.jsonl", 3)


def test_normalize_id_strips() -> None:
    assert normalize_id("  x ") == "x"


def test_duplicate_winner_is_earliest_file_then_line_whatever_the_order() -> None:
    versions = [
        Document("x", "c", "file:///c/b.jsonl", 1),
        Document("x", "b", "file:///c/a.jsonl", 10),
        Document("x", "a", "file:///c/a.jsonl", 2),
    ]
    for order in (versions, versions[::-1]):
        winner, rejects = pick_winner(order)
        assert winner.text == "a"
        assert [r.source for r in rejects] == ["file:///c/a.jsonl:10", "file:///c/b.jsonl:1"]
        assert {r.reason for r in rejects} == {"duplicate_id"}
        assert all("file:///c/a.jsonl:2" in r.detail for r in rejects)
