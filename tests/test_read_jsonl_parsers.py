"""JSONL lines: the fast parser (orjson) reads every line exactly as the reference (json) does."""

from __future__ import annotations

import pytest

from transforms.read_formats import _parse_json_line, _parse_json_line_slowly
from transforms.sections import InputConfig


@pytest.mark.parametrize("line", [
    b'{"id": "a", "text": "plain"}',
    b'{"id": 123456789012345678901234567890, "text": "an id past 64 bits"}',
    b'{"id": "b", "text": "x", "meta": [1, 123456789012345678901234567890]}',
    b'{"id": "c", "text": "\\ud800 lone surrogate"}',
    b'{"id": "d", "text": NaN}',
    b'{"id": "e", "text": "bad \xff byte"}',
    b'{"id": 1.0, "text": "float id"}',
    b'["not", "an", "object"]',
    b'{"id": "f", "text": "trailing" ',
])
def test_jsonl_lines_read_as_json_reads_them(line: bytes) -> None:
    """The fast parser never changes a record or a reject: json's reading is the reference."""
    cfg = InputConfig(path="x.jsonl", metadata_fields=["meta"])
    assert _parse_json_line(line, "x.jsonl", 7, cfg) == _parse_json_line_slowly(
        line, "x.jsonl", 7, cfg)
