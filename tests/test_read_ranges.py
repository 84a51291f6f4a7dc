"""Tests of reading big files in ranges: the planner's cuts, and records identical to a whole read.

A range size of a few KiB stands in for the 64 MiB default, so that files of a few hundred KiB
are cut into dozens of ranges. Every test holds reading in ranges to the one standard that
matters: the records and rejects, with their line and row numbers, that reading the file whole
gives.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import boto3
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import InputConfig
from transforms import read, read_formats, read_ranges
from transforms.read import ReadCorpus, expand_pattern, plan_ranges, read_range, read_records
from transforms.types import (
    INVALID_UTF8,
    MALFORMED_RECORD,
    STAGE_READ,
    UNREADABLE_FILE,
    FileRange,
    RawRecord,
    Reject,
    SourceFile,
)

RANGE = 4096  # bytes: small enough to cut files of a few hundred KiB into dozens of ranges

# --- Helpers -----------------------------------------------------------------------------------


def write(path: Path, data: bytes) -> SourceFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    [source] = expand_pattern(str(path), {}, "auto")
    return source


def cfg_for(source: SourceFile, **options: Any) -> InputConfig:
    return InputConfig(path=source.url, **options)


def in_ranges(
    source: SourceFile, cfg: InputConfig, range_bytes: int = RANGE
) -> tuple[list[FileRange], list[RawRecord | Reject]]:
    """The ranges one file is planned in, and everything read from them, in range order."""
    ranges = plan_ranges(source, cfg, range_bytes)
    assert all(isinstance(r, FileRange) for r in ranges)
    return ranges, [item for part in ranges for item in read_range(part, cfg)]


def assert_tiles(ranges: list[FileRange], end: int) -> None:
    """The ranges cover ``[0, end)`` in order, without a gap or an overlap."""
    assert [r.start for r in ranges] == [0, *(r.end for r in ranges[:-1])]
    assert ranges[-1].end == end
    assert all(r.start < r.end for r in ranges)


def read_reject(source: str, reason: str, detail: str, record_id: str | None = None) -> Reject:
    return Reject(record_id, record_id, source, STAGE_READ, reason, detail)


def run_read(cfg: InputConfig, expected_records: list, expected_rejects: list) -> int:
    """Run ReadCorpus as the pipeline does and check its outputs; return the ranges it read."""
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        out = p | "ReadCorpus" >> ReadCorpus(cfg, range_bytes=RANGE)
        assert_that(out["records"], equal_to(expected_records), label="CheckRecords")
        assert_that(out["rejects"], equal_to(expected_rejects), label="CheckRejects")
    counters = p.result.metrics().query(MetricsFilter().with_name("file_ranges"))["counters"]
    return sum(c.committed for c in counters)


_MEMORY_ROOT = f"memory:///test-read-ranges-{uuid.uuid4().hex}"


def in_memory(name: str, data: bytes) -> SourceFile:
    """A file in fsspec's memory filesystem, overwritten by the next example of a property test."""
    url = f"{_MEMORY_ROOT}/{name}"
    fsspec.filesystem("memory").pipe(url, data)
    [source] = expand_pattern(url, {}, "auto")
    return source


@pytest.fixture(scope="module", autouse=True)
def _clean_memory() -> Iterator[None]:
    yield
    fs = fsspec.filesystem("memory")
    if fs.exists(_MEMORY_ROOT):
        fs.rm(_MEMORY_ROOT, recursive=True)


# --- JSONL -------------------------------------------------------------------------------------

# Line numbers (1-based) of the lines that are not records in the big JSONL file below.
BLANK_LINES = (2, 500, 501, 1777, 2999)
BAD_JSON_LINES = (3, 640, 1500, 2400)
NOT_OBJECT_LINES = (1024, 2048)
BAD_UTF8_LINES = (1300,)


def big_jsonl(n_lines: int = 3000, seed: int = 7) -> tuple[bytes, list[tuple[int, Any]]]:
    """A JSONL file of short and long lines (some longer than a range), and its records' ids
    with their line numbers. Its lines at the numbers above are blank, not JSON, not objects or
    not UTF-8; the file does not end with a newline."""
    rng = random.Random(seed)
    lines, expected = [], []
    for number in range(1, n_lines + 1):
        if number in BLANK_LINES:
            lines.append(b" " * rng.randrange(3))
        elif number in BAD_JSON_LINES:
            lines.append(b'{"id": "broken" "text": 1}')
        elif number in NOT_OBJECT_LINES:
            lines.append(b"[1, 2, 3]")
        elif number in BAD_UTF8_LINES:
            lines.append(b'{"id": "latin1", "text": "caf\xe9"}')
        else:
            size = rng.choice([0, 5, 40, 300, 2000, 9000])  # 9000 bytes: longer than a range
            lines.append(json.dumps({"id": f"d{number}", "text": "x" * size}).encode())
            expected.append((number, f"d{number}"))
    return b"\n".join(lines), expected


def jsonl_rejects(url: str) -> list[Reject]:
    return sorted(
        [
            *(
                read_reject(
                    f"{url}:{n}",
                    MALFORMED_RECORD,
                    "line is not valid JSON: Expecting ',' delimiter at column 17",
                )
                for n in BAD_JSON_LINES
            ),
            *(
                read_reject(f"{url}:{n}", MALFORMED_RECORD, "line is a JSON array, not an object")
                for n in NOT_OBJECT_LINES
            ),
            *(
                read_reject(
                    f"{url}:{n}",
                    INVALID_UTF8,
                    "line is not valid UTF-8: invalid continuation byte at byte 29",
                )
                for n in BAD_UTF8_LINES
            ),
        ],
        key=lambda r: int(r.source.rsplit(":", 1)[1]),
    )


@pytest.mark.parametrize("block_bytes", [7, 1000, 64 * 1024])
def test_jsonl_ranges_tile_the_file_from_line_starts_with_their_first_line_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    # Scan blocks smaller than a line and than a range, too: a cut may fall in any block.
    monkeypatch.setattr(read_ranges, "_SCAN_BLOCK_BYTES", block_bytes)
    data, _ = big_jsonl()
    source = write(tmp_path / "big.jsonl", data)

    ranges = plan_ranges(source, cfg_for(source), RANGE)

    assert len(ranges) >= 8
    assert_tiles(ranges, len(data))
    for part in ranges:
        assert part.source == source
        assert part.start == 0 or data[part.start - 1 : part.start] == b"\n"
        assert part.first_position == data[: part.start].count(b"\n") + 1
    # Each cut is the first line start at or past RANGE bytes into its range.
    for part in ranges[:-1]:
        assert part.end - part.start >= RANGE
        assert b"\n" not in data[part.start + RANGE : part.end - 1]
    assert ranges == plan_ranges(source, cfg_for(source), RANGE)  # the same plan every time


def test_jsonl_read_in_ranges_equals_the_file_read_whole(tmp_path: Path) -> None:
    data, expected = big_jsonl()
    source = write(tmp_path / "big.jsonl", data)
    cfg = cfg_for(source)

    ranges, items = in_ranges(source, cfg)

    assert len(ranges) >= 8
    assert items == list(read_records(source, cfg))
    assert [(r.position, r.doc_id) for r in items if isinstance(r, RawRecord)] == expected
    assert [r for r in items if isinstance(r, Reject)] == jsonl_rejects(source.url)


def test_read_corpus_reads_a_big_jsonl_file_in_ranges_every_record_once(tmp_path: Path) -> None:
    data, expected = big_jsonl()
    source = write(tmp_path / "big.jsonl", data)
    url = source.url
    lines = data.split(b"\n")
    records = [RawRecord(url, n, d, json.loads(lines[n - 1])["text"]) for n, d in expected]

    ranges_read = run_read(cfg_for(source), records, jsonl_rejects(url))

    assert ranges_read == len(plan_ranges(source, cfg_for(source), RANGE)) >= 8


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(
        st.sampled_from(
            [b'{"id": 1, "text": "a"}', b"{", b"[]", b" ", b"\xff", b"\r", b"\n", b"\n", b"\n"]
        ),
        min_size=1,
        max_size=80,
    ),
    range_bytes=st.integers(1, 64),
)
def test_jsonl_of_any_shape_reads_the_same_in_ranges(parts: list[bytes], range_bytes: int) -> None:
    source = in_memory("a.jsonl", b"".join(parts))
    cfg = cfg_for(source)

    ranges, items = in_ranges(source, cfg, range_bytes)

    assert items == list(read_records(source, cfg))
    if not ranges[0].whole:
        assert_tiles(ranges, source.size)


# --- CSV ---------------------------------------------------------------------------------------


def big_csv(n_rows: int = 1500, seed: int = 11) -> tuple[bytes, list[tuple[int, str, str]]]:
    """A CSV file whose quoted texts hold many newlines (most newlines of the file are inside
    a field), with blank lines, CRLF and CR row ends, doubled quotes and a stray quote in an
    unquoted field; and its rows as (row number, id, text)."""
    rng = random.Random(seed)
    out = [b"\xef\xbb\xbfid,text,lang\r\n"]
    expected = []
    for number in range(1, n_rows + 1):
        if number % 97 == 0:
            out.append(b"\n" * rng.randrange(1, 3))  # blank lines: not rows
        kind = rng.randrange(4)
        if kind == 0:
            text = "\n".join("line " * rng.randrange(1, 9) for _ in range(rng.randrange(2, 40)))
            field = '"' + text.replace('"', '""') + '"'
        elif kind == 1:
            text = 'she said "hello"\r\nand left'
            field = '"' + text.replace('"', '""') + '"'
        elif kind == 2:
            text = field = 'a 6" ruler'  # a quote inside an unquoted field is a plain character
        else:
            text = field = "plain " * rng.randrange(1, 30)
        end = rng.choice([b"\n", b"\r\n", b"\r"])
        out.append(f"r{number},{field},en".encode() + end)
        expected.append((number, f"r{number}", text))
    return b"".join(out), expected


def test_csv_ranges_never_cut_inside_a_quoted_field(tmp_path: Path) -> None:
    data, expected = big_csv()
    source = write(tmp_path / "big.csv", data)
    cfg = cfg_for(source, metadata_fields=["lang"])

    ranges, items = in_ranges(source, cfg)

    assert len(ranges) >= 8
    assert_tiles(ranges, len(data))
    # A cut at the first newline past each RANGE bytes would have fallen inside a field.
    naive = [data.index(b"\n", r.start + RANGE) + 1 for r in ranges[:-1]]
    assert any(cut != r.end for cut, r in zip(naive, ranges, strict=True))
    assert items == list(read_records(source, cfg))
    assert [(r.position, r.doc_id, r.text) for r in items] == expected
    assert {r.metadata for r in items} == {(("lang", "en"),)}
    for part in ranges:
        rows_before = sum(1 for r in items if r.position < part.first_position)
        assert part.first_position == rows_before + 1


def test_read_corpus_reads_a_big_csv_file_in_ranges(tmp_path: Path) -> None:
    data, expected = big_csv()
    bad = b'x1,"caf\xe9",en\nx2,too,many,fields\n'  # two rejected rows at the end
    source = write(tmp_path / "big.csv", data + bad)
    url = source.url
    n = len(expected)

    ranges_read = run_read(
        cfg_for(source),
        [RawRecord(url, position, doc_id, text) for position, doc_id, text in expected],
        [
            read_reject(f"{url}:{n + 1}", INVALID_UTF8, "not valid UTF-8 in field(s) text", "x1"),
            read_reject(
                f"{url}:{n + 2}", MALFORMED_RECORD, "row has 4 fields but the header names 3", "x2"
            ),
        ],
    )

    assert ranges_read >= 8


def test_csv_with_a_byte_order_mark_before_a_quoted_header_spanning_lines(tmp_path: Path) -> None:
    header = b'\xef\xbb\xbf"i\nd",text\n'  # unmarked, the first field is quoted; marked, it isn't
    rows = b"".join(f'{i},"{"x" * 50}\n{i}"\n'.encode() for i in range(400))
    source = write(tmp_path / "bom.csv", header + rows)
    cfg = cfg_for(source, id_field="i\nd")

    ranges, items = in_ranges(source, cfg)

    assert len(ranges) >= 4
    assert items == list(read_records(source, cfg))
    assert [(r.position, r.doc_id) for r in items] == [(i + 1, str(i)) for i in range(400)]


def test_csv_row_the_csv_module_rejects_is_counted_as_the_reader_counts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(read_formats, "_CSV_FIELD_LIMIT", 40)
    rows = [f"{i},{'y' * (60 if i % 50 == 0 else 10)}\n" for i in range(1, 1001)]
    source = write(tmp_path / "a.csv", ("id,text\n" + "".join(rows)).encode())
    cfg = cfg_for(source)

    ranges, items = in_ranges(source, cfg)

    assert len(ranges) >= 3
    assert items == list(read_records(source, cfg))
    assert [r.source for r in items if isinstance(r, Reject)] == [
        f"{source.url}:{i}" for i in range(50, 1001, 50)
    ]


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(
        st.sampled_from(
            # U+FEFF mid-file is a character: only the file's start may lose it as a mark.
            [b"a", b",", b'"', b'""', b"\n", b"\r", b"\r\n", b"\xc3\xa9", b"\xff", b"\xef\xbb\xbf"]
        ),
        min_size=1,
        max_size=80,
    ),
    bom=st.booleans(),
    range_bytes=st.integers(1, 64),
)
def test_csv_of_any_shape_reads_the_same_in_ranges(
    parts: list[bytes], bom: bool, range_bytes: int
) -> None:
    data = (b"\xef\xbb\xbf" if bom else b"") + b'id,"te\nxt"\r\n' + b"".join(parts)
    source = in_memory("a.csv", data)
    cfg = cfg_for(source, text_field="te\nxt")

    ranges, items = in_ranges(source, cfg, range_bytes)

    assert items == list(read_records(source, cfg))
    if not ranges[0].whole:
        assert_tiles(ranges, source.size)


# --- Parquet -----------------------------------------------------------------------------------


def parquet_groups(n_rows: int, group_rows: int) -> bytes:
    table = pa.table(
        {"id": [f"p{i}" for i in range(n_rows)], "text": [f"text {i} " * 20 for i in range(n_rows)]}
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=group_rows, compression="none")
    return sink.getvalue()


def test_parquet_is_cut_between_row_groups_with_exact_row_numbers(tmp_path: Path) -> None:
    source = write(tmp_path / "big.parquet", parquet_groups(n_rows=4000, group_rows=250))
    cfg = cfg_for(source)
    assert pq.ParquetFile(tmp_path / "big.parquet").metadata.num_row_groups == 16

    ranges, items = in_ranges(source, cfg, range_bytes=3 * 250 * 100)

    assert len(ranges) >= 4
    assert_tiles(ranges, 16)
    assert [r.first_position for r in ranges] == [r.start * 250 + 1 for r in ranges]
    assert items == list(read_records(source, cfg))
    assert [(r.position, r.doc_id) for r in items] == [(i + 1, f"p{i}") for i in range(4000)]


def test_read_corpus_reads_parquet_row_groups_in_ranges(tmp_path: Path) -> None:
    source = write(tmp_path / "big.parquet", parquet_groups(n_rows=1200, group_rows=100))
    url = source.url

    ranges_read = run_read(
        cfg_for(source),
        [RawRecord(url, i + 1, f"p{i}", f"text {i} " * 20) for i in range(1200)],
        [],
    )

    assert ranges_read == 12  # each row group holds more than RANGE bytes


def test_parquet_of_one_row_group_is_read_whole(tmp_path: Path) -> None:
    source = write(tmp_path / "one.parquet", parquet_groups(n_rows=1000, group_rows=1000))

    assert plan_ranges(source, cfg_for(source), RANGE) == [FileRange(source)]


# --- Object stores -----------------------------------------------------------------------------


def test_reads_ranges_from_s3(s3_options: dict[str, Any]) -> None:
    data, expected = big_jsonl(n_lines=800)
    s3 = boto3.client("s3", endpoint_url=s3_options["client_kwargs"]["endpoint_url"])
    s3.put_object(Bucket="corpus", Key="big.jsonl", Body=data)
    cfg = InputConfig(path="s3://corpus/big.jsonl", storage_options=s3_options)
    [source] = expand_pattern(cfg.paths[0], cfg.storage_options, cfg.format)

    ranges, items = in_ranges(source, cfg)

    assert len(ranges) >= 8
    assert items == list(read_records(source, cfg))
    assert [(r.position, r.doc_id) for r in items if isinstance(r, RawRecord)] == expected


# --- Files read whole --------------------------------------------------------------------------


def test_compressed_jsonl_stays_one_range(tmp_path: Path) -> None:
    data, _ = big_jsonl()
    source = write(tmp_path / "big.jsonl.gz", gzip.compress(data))
    assert source.size > 4 * RANGE  # well past the range size, compressed
    cfg = cfg_for(source)

    [part] = plan_ranges(source, cfg, RANGE)

    assert part == FileRange(source) and part.whole
    assert list(read_range(part, cfg)) == list(read_records(source, cfg))


def test_text_file_stays_one_range(tmp_path: Path) -> None:
    source = write(tmp_path / "book.txt", b"a line\n" * 10_000)

    assert plan_ranges(source, cfg_for(source), RANGE) == [FileRange(source)]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "text", "unknown"])
def test_small_file_is_one_range_planned_without_opening_it(fmt: str) -> None:
    # The file does not exist: opening it would be a reject.
    source = SourceFile(url=f"memory:///nowhere/small.{fmt}", root="", format=fmt, size=RANGE)

    assert plan_ranges(source, InputConfig(path=source.url), RANGE) == [FileRange(source)]


def test_file_with_nowhere_to_cut_is_read_whole(tmp_path: Path) -> None:
    source = write(tmp_path / "one-line.jsonl", json.dumps({"id": 1, "text": "x" * 50_000}).encode())

    assert plan_ranges(source, cfg_for(source), RANGE) == [FileRange(source)]


# --- Failures ----------------------------------------------------------------------------------


def test_big_file_that_cannot_be_opened_is_the_readers_reject(tmp_path: Path) -> None:
    url = (tmp_path / "gone.jsonl").as_uri()
    source = SourceFile(url=url, root="", format="jsonl", size=10 * RANGE)
    cfg = InputConfig(path=url)

    [reject] = plan_ranges(source, cfg, RANGE)

    assert reject == next(read_records(source, cfg))
    assert (reject.source, reject.reason) == (url, UNREADABLE_FILE)


def test_file_that_breaks_off_while_planned_is_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(source: SourceFile, cfg: InputConfig, range_bytes: int, scan: Any) -> Iterator:
        scan.opened = True
        yield 100, 2
        raise OSError("connection reset")

    monkeypatch.setitem(read._CUTTERS, "jsonl", broken)
    source = SourceFile(url="memory:///x.jsonl", root="", format="jsonl", size=10 * RANGE)

    assert plan_ranges(source, InputConfig(path=source.url), RANGE) == [FileRange(source)]


def test_range_whose_file_is_gone_is_rejected_at_its_first_line(tmp_path: Path) -> None:
    data, _ = big_jsonl()
    source = write(tmp_path / "big.jsonl", data)
    ranges = plan_ranges(source, cfg_for(source), RANGE)
    (tmp_path / "big.jsonl").unlink()

    rejects = [item for part in ranges for item in read_range(part, cfg_for(source))]

    # A range that fails is reported at its first line: its file was there when it was planned.
    assert [r.source for r in rejects] == [f"{source.url}:{r.first_position}" for r in ranges]
    assert {r.reason for r in rejects} == {UNREADABLE_FILE}


def test_range_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="range_bytes must be positive"):
        ReadCorpus(InputConfig(path="x"), range_bytes=0)
