"""Tests of the read stage: listing, every format and codec, every read reject, Beam, S3.

Files are real: under ``tmp_path``, in fsspec's in-memory filesystem, and in a moto S3 server on
loopback. Each test reads the way the pipeline does: expand the pattern, then read each file.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import boto3
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from pipeline.config import InputConfig
from transforms import read_formats
from transforms.errors import InputError
from transforms.read import (
    NO_FILES_MATCHED,
    UNKNOWN_FORMAT,
    ReadCorpus,
    expand_pattern,
    read_records,
)
from transforms.types import (
    INVALID_UTF8,
    MALFORMED_RECORD,
    STAGE_READ,
    UNREADABLE_FILE,
    RawRecord,
    Reject,
    SourceFile,
)

# --- Helpers -----------------------------------------------------------------------------------


def jsonl(*rows: Any) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_all(pattern: str | Path, **input_options: Any) -> list[RawRecord | Reject]:
    """Everything one pattern yields, in the order the stage yields it."""
    cfg = InputConfig(path=str(pattern), **input_options)
    return [
        item
        for source in expand_pattern(str(pattern), cfg.storage_options, cfg.format)
        for item in read_records(source, cfg)
    ]


def records(items: list[RawRecord | Reject]) -> list[RawRecord]:
    return [item for item in items if isinstance(item, RawRecord)]


def read_reject(source: str, reason: str, detail: str, record_id: str | None = None) -> Reject:
    return Reject(record_id, record_id, source, STAGE_READ, reason, detail)


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh directory in fsspec's process-wide memory filesystem, removed afterwards.

    Spelled as the stage spells the URLs it lists, so expected values read plainly.
    """
    root = f"memory:///test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


# --- Listing -----------------------------------------------------------------------------------


def test_glob_matches_files_sorted_by_url_with_the_literal_prefix_as_root(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", "c.csv", "sub/d.jsonl"):
        write(tmp_path / name, b'{"id": 1}\n')

    files = expand_pattern(f"{tmp_path}/*.jsonl", {}, "auto")

    assert files == [
        SourceFile(url=(tmp_path / n).as_uri(), root=tmp_path.as_uri(), format="jsonl", size=10)
        for n in ("a.jsonl", "b.jsonl")
    ]


def test_recursive_glob_takes_its_root_before_the_first_wildcard(tmp_path: Path) -> None:
    for name in ("x/a.jsonl", "x/deep/er/b.jsonl", "x/deep/c.txt", "y/d.jsonl"):
        write(tmp_path / name, b"{}\n")

    files = expand_pattern(f"{tmp_path}/x/**/*.jsonl", {}, "auto")

    assert [f.url for f in files] == [
        (tmp_path / "x/a.jsonl").as_uri(),
        (tmp_path / "x/deep/er/b.jsonl").as_uri(),
    ]
    assert {f.root for f in files} == {(tmp_path / "x").as_uri()}


@pytest.mark.parametrize("suffix", ["", "/"])
def test_directory_names_every_file_below_it(tmp_path: Path, suffix: str) -> None:
    for name in ("b.txt", "a/c.txt", "a/b/d.txt"):
        write(tmp_path / "corpus" / name, b"text")
    (tmp_path / "corpus" / "empty").mkdir()

    files = expand_pattern(f"{tmp_path}/corpus{suffix}", {}, "auto")

    assert [f.url for f in files] == [
        (tmp_path / "corpus" / n).as_uri() for n in ("a/b/d.txt", "a/c.txt", "b.txt")
    ]
    assert {f.root for f in files} == {(tmp_path / "corpus").as_uri()}


def test_single_file_has_its_parent_as_root(memory_root: str) -> None:
    fsspec.filesystem("memory").pipe(f"{memory_root}/dir/one.csv", b"id,text\n")

    assert expand_pattern(f"{memory_root}/dir/one.csv", {}, "auto") == [
        SourceFile(
            url=f"{memory_root}/dir/one.csv",
            root=f"{memory_root}/dir",
            format="csv",
            size=8,
        )
    ]


@pytest.mark.parametrize("pattern", ["missing.jsonl", "missing-dir/", "*.parquet", "**/*.md"])
def test_pattern_that_matches_nothing_is_an_empty_list(tmp_path: Path, pattern: str) -> None:
    write(tmp_path / "only.jsonl", b"{}\n")

    assert expand_pattern(f"{tmp_path}/{pattern}", {}, "auto") == []


def test_listing_failure_is_an_input_error_naming_the_pattern() -> None:
    with pytest.raises(InputError, match="cannot list nosuch://bucket/x: ValueError"):
        expand_pattern("nosuch://bucket/x", {}, "auto")


def test_listing_order_does_not_depend_on_creation_order(memory_root: str) -> None:
    fs = fsspec.filesystem("memory")
    for name in ("m", "c", "x", "a", "q"):
        fs.pipe(f"{memory_root}/{name}.jsonl", b"{}\n")

    urls = [f.url for f in expand_pattern(memory_root, {}, "auto")]

    assert urls == sorted(urls)
    assert len(urls) == 5


def test_auto_format_follows_the_extension_after_any_compression_suffix(memory_root: str) -> None:
    expected = {
        "a.jsonl": "jsonl",
        "b.ndjson": "jsonl",
        "c.json": "jsonl",
        "d.JSONL.GZ": "jsonl",
        "e.parquet": "parquet",
        "f.pq": "parquet",
        "g.csv.zst": "csv",
        "h.txt.bz2": "text",
        "i.md.zstd": "text",
        "j.text.xz": "text",
        "k.rst": "text",
        "l.html": "text",
        "m.parquet.gz": UNKNOWN_FORMAT,  # Parquet needs random access: not readable compressed
        "n.bin": UNKNOWN_FORMAT,
        "README": UNKNOWN_FORMAT,
    }
    fs = fsspec.filesystem("memory")
    for name in expected:
        fs.pipe(f"{memory_root}/{name}", b"x")

    formats = {f.url.rsplit("/", 1)[1]: f.format for f in expand_pattern(memory_root, {}, "auto")}

    assert formats == expected


def test_explicit_format_applies_whatever_the_extension(memory_root: str) -> None:
    fsspec.filesystem("memory").pipe(f"{memory_root}/notes.jsonl", b'{"id": 1}\n')

    items = read_all(f"{memory_root}/*", format="text")

    assert [(r.doc_id, r.text) for r in records(items)] == [("notes.jsonl", '{"id": 1}\n')]


def test_file_of_unknown_format_is_rejected_not_skipped(memory_root: str) -> None:
    fsspec.filesystem("memory").pipe(f"{memory_root}/data.bin", b"\x00\x01")

    [reject] = read_all(memory_root)

    assert reject == read_reject(
        f"{memory_root}/data.bin",
        UNREADABLE_FILE,
        "the file name does not say its format; "
        "set input.format to one of csv, jsonl, parquet, text",
        f"{memory_root}/data.bin",  # a file's reject carries its URL as id
    )


# --- JSONL -------------------------------------------------------------------------------------

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "": lambda data: data,
    ".gz": gzip.compress,
    ".zst": zstandard.ZstdCompressor().compress,
    ".zstd": zstandard.ZstdCompressor().compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
}


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_jsonl_is_read_in_order_whatever_the_compression(tmp_path: Path, suffix: str) -> None:
    data = jsonl(
        {"id": "a", "text": "first", "lang": "en", "extra": 1},
        {"id": 2, "text": "second", "tags": ["x"]},
    ) + b"  \n" + jsonl({"text": 3, "lang": None})
    path = write(tmp_path / f"docs.jsonl{suffix}", COMPRESSORS[suffix](data))
    url = path.as_uri()

    items = read_all(path, metadata_fields=["lang", "tags"])

    # Ids and texts are kept as found: judging them is the validate stage's job.
    assert items == [
        RawRecord(url, 1, "a", "first", (("lang", "en"), ("tags", None))),
        RawRecord(url, 2, 2, "second", (("lang", None), ("tags", ["x"]))),
        RawRecord(url, 4, None, 3, (("lang", None), ("tags", None))),
    ]


def test_jsonl_honours_the_configured_field_names(memory_root: str) -> None:
    fsspec.filesystem("memory").pipe(f"{memory_root}/a.ndjson", jsonl({"key": "k", "body": "b"}))

    [record] = read_all(memory_root, id_field="key", text_field="body")

    assert (record.doc_id, record.text) == ("k", "b")


def test_line_that_is_not_utf8_is_rejected_with_its_line_number(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.jsonl",
        jsonl({"id": 1, "text": "ok"}) + b"\n" + b'{"id": 2, "text": "caf\xe9"}\n'
        + jsonl({"id": 3, "text": "ok"}),
    )

    items = read_all(path)

    assert items[1] == read_reject(
        f"{path.as_uri()}:3",
        INVALID_UTF8,
        "line is not valid UTF-8: invalid continuation byte at byte 22",
    )
    assert [(r.doc_id, r.position) for r in records(items)] == [(1, 1), (3, 4)]


def test_line_that_is_not_json_is_malformed(memory_root: str) -> None:
    fsspec.filesystem("memory").pipe(
        f"{memory_root}/a.jsonl", b'{"id": 1, "text": "a" "b"}\n' + jsonl({"id": 2})
    )

    items = read_all(memory_root)

    assert items[0] == read_reject(
        f"{memory_root}/a.jsonl:1",
        MALFORMED_RECORD,
        "line is not valid JSON: Expecting ',' delimiter at column 23",
    )
    assert records(items)[0].doc_id == 2


@pytest.mark.parametrize(
    ("line", "kind"),
    [(b"[1, 2]", "array"), (b'"text"', "string"), (b"42", "number"), (b"null", "null")],
)
def test_json_value_that_is_not_an_object_is_malformed(
    memory_root: str, line: bytes, kind: str
) -> None:
    fsspec.filesystem("memory").pipe(f"{memory_root}/a.jsonl", line + b"\n")

    [reject] = read_all(memory_root)

    assert reject.reason == MALFORMED_RECORD
    assert reject.detail == f"line is a JSON {kind}, not an object"


def test_corrupt_gzip_keeps_the_lines_before_it_and_ends_the_file(tmp_path: Path) -> None:
    whole = gzip.compress(
        jsonl(*({"id": i, "text": f"document number {i} " * 20} for i in range(2000)))
    )
    path = write(tmp_path / "a.jsonl.gz", whole[: len(whole) // 2])

    items = read_all(path)

    *good, last = items
    assert good and all(isinstance(item, RawRecord) for item in good)
    assert [r.position for r in good] == list(range(1, len(good) + 1))
    assert last == read_reject(
        f"{path.as_uri()}:{len(good) + 1}",
        UNREADABLE_FILE,
        "EOFError: Compressed file ended before the end-of-stream marker was reached",
        path.as_uri(),
    )


def test_file_that_cannot_be_opened_is_rejected_by_url(tmp_path: Path) -> None:
    source = SourceFile(url=(tmp_path / "gone.jsonl").as_uri(), root="", format="jsonl", size=1)

    [reject] = read_records(source, InputConfig(path=source.url))

    assert (reject.source, reject.reason) == (source.url, UNREADABLE_FILE)
    assert reject.detail.startswith("FileNotFoundError: ")


def test_reject_detail_never_shows_a_storage_option(memory_root: str) -> None:
    secret = "s3cr3t-0123456789abcdef"
    options = {"client_kwargs": {"token": secret}}
    url = f"{memory_root}/{secret}/gone.jsonl"
    source = SourceFile(url=url, root=memory_root, format="jsonl", size=1)

    [reject] = read_records(source, InputConfig(path=url, storage_options=options))

    assert reject.reason == UNREADABLE_FILE
    assert secret not in reject.detail and "[REDACTED]" in reject.detail


# --- CSV ---------------------------------------------------------------------------------------


def test_csv_rows_are_records_of_strings_numbered_from_the_first_data_row(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.csv",
        b'id,text,lang\n1,plain,en\n\n2,"quoted, with\nnewline",fr\n3,short row\n',
    )
    url = path.as_uri()

    items = read_all(path, metadata_fields=["lang"])

    assert items == [
        RawRecord(url, 1, "1", "plain", (("lang", "en"),)),
        RawRecord(url, 2, "2", "quoted, with\nnewline", (("lang", "fr"),)),
        RawRecord(url, 3, "3", "short row", (("lang", None),)),
    ]


def test_byte_order_mark_is_not_part_of_the_first_csv_column_or_a_text(memory_root: str) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{memory_root}/excel.csv", b"\xef\xbb\xbfid,text\n1,a\n")
    fs.pipe(f"{memory_root}/notepad.txt", b"\xef\xbb\xbfhello")

    assert [(r.doc_id, r.text) for r in records(read_all(memory_root))] == [
        ("1", "a"),
        ("notepad.txt", "hello"),
    ]


def test_csv_is_read_through_compression(memory_root: str) -> None:
    fsspec.filesystem("memory").pipe(f"{memory_root}/a.csv.gz", gzip.compress(b"id,text\n7,x\n"))

    assert [(r.doc_id, r.text) for r in records(read_all(memory_root))] == [("7", "x")]


def test_csv_invalid_utf8_rejects_only_its_row(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.csv",
        b"id,text,ignored\n1,caf\xe9,\n2,fine,\xff\n3,ok,\n",
    )

    items = read_all(path)

    assert items[0] == read_reject(
        f"{path.as_uri()}:1", INVALID_UTF8, "not valid UTF-8 in field(s) text", "1"
    )
    # A bad byte in a column the pipeline never reads costs nothing.
    assert [r.doc_id for r in records(items)] == ["2", "3"]


def test_csv_row_with_more_fields_than_the_header_is_malformed(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", b"id,text\n1,a,b\n2,c\n")

    items = read_all(path)

    assert items[0] == read_reject(
        f"{path.as_uri()}:1", MALFORMED_RECORD, "row has 3 fields but the header names 2", "1"
    )
    assert [r.doc_id for r in records(items)] == ["2"]


def test_csv_fields_larger_than_the_csv_module_default_are_read(tmp_path: Path) -> None:
    big = "x" * 300_000
    path = write(tmp_path / "a.csv", f"id,text\n1,{big}\n".encode())

    [record] = read_all(path)

    assert record.text == big


def test_csv_parse_error_rejects_the_row_and_reads_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(read_formats, "_CSV_FIELD_LIMIT", 10)
    path = write(tmp_path / "a.csv", b"id,text\n1,short\n2,much too long\n3,short\n")

    items = read_all(path)

    assert items[1] == read_reject(
        f"{path.as_uri()}:2",
        MALFORMED_RECORD,
        "row is not valid CSV: field larger than field limit (10)",
    )
    assert [(r.doc_id, r.position) for r in records(items)] == [("1", 1), ("3", 3)]


# --- Parquet -----------------------------------------------------------------------------------


def test_parquet_rows_are_numbered_across_batches(memory_root: str) -> None:
    n = 2500  # more than two read batches
    table = pa.table(
        {
            "id": list(range(n)),
            "text": [f"t{i}" for i in range(n)],
            "lang": ["en"] * n,
            "unused": [b"\x00"] * n,
        }
    )
    fsspec.filesystem("memory").pipe(f"{memory_root}/a.parquet", parquet(table))
    url = f"{memory_root}/a.parquet"

    items = read_all(memory_root, metadata_fields=["lang"])

    assert len(items) == n
    assert items[0] == RawRecord(url, 1, 0, "t0", (("lang", "en"),))
    assert items[-1] == RawRecord(url, n, n - 1, f"t{n - 1}", (("lang", "en"),))
    assert [r.position for r in items] == list(range(1, n + 1))


def test_parquet_missing_column_reads_as_none_so_no_row_is_dropped(tmp_path: Path) -> None:
    # A missing metadata column reads as None; a missing id or text column is one reject for
    # the file (issue 11 item 10, tests/test_read_accounting.py), not a reject per row.
    path = write(tmp_path / "a.pq", parquet(pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]})))

    items = read_all(path, metadata_fields=["lang"])

    assert items == [
        RawRecord(path.as_uri(), i, i, t, (("lang", None),)) for i, t in ((1, "a"), (2, "b"), (3, "c"))
    ]


def test_truncated_parquet_is_unreadable(tmp_path: Path) -> None:
    whole = parquet(pa.table({"id": [1, 2], "text": ["a", "b"]}))
    path = write(tmp_path / "a.parquet", whole[:-20])

    [reject] = read_all(path)

    assert (reject.source, reject.reason) == (path.as_uri(), UNREADABLE_FILE)
    assert reject.detail.startswith("ArrowInvalid: ")


# --- Text --------------------------------------------------------------------------------------


def test_text_files_are_documents_identified_by_their_path_below_the_root(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write(corpus / "guide/intro/start.md", b"# Start\n")
    write(corpus / "guide/faq.txt.gz", gzip.compress(b"Qu'est-ce que c'est ?"))
    write(corpus / "readme.rst", b"About")

    by_directory = read_all(corpus, metadata_fields=["lang"])
    by_glob = read_all(f"{corpus}/guide/**/*.md")
    by_file = read_all(corpus / "readme.rst")

    assert by_directory == [
        RawRecord(
            (corpus / "guide/faq.txt.gz").as_uri(),
            None,
            "guide/faq.txt.gz",
            "Qu'est-ce que c'est ?",
            (("lang", None),),
        ),
        RawRecord(
            (corpus / "guide/intro/start.md").as_uri(),
            None,
            "guide/intro/start.md",
            "# Start\n",
            (("lang", None),),
        ),
        RawRecord((corpus / "readme.rst").as_uri(), None, "readme.rst", "About", (("lang", None),)),
    ]
    assert [r.doc_id for r in records(by_glob)] == ["intro/start.md"]
    assert [r.doc_id for r in records(by_file)] == ["readme.rst"]


def test_text_file_that_is_not_utf8_is_rejected_by_url(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.txt", "déjà vu".encode("latin-1"))

    [reject] = read_all(path)

    assert reject == read_reject(
        path.as_uri(),
        INVALID_UTF8,
        "file is not valid UTF-8: invalid continuation byte at byte 1",
        "latin1.txt",
    )


# --- Beam --------------------------------------------------------------------------------------


def test_read_corpus_reads_a_list_of_patterns_in_a_pipeline(tmp_path: Path) -> None:
    write(tmp_path / "jsonl/a.jsonl", jsonl({"id": "a1", "text": "x"}) + b"\xff\n")
    write(tmp_path / "jsonl/b.jsonl.gz", gzip.compress(jsonl({"id": "b1", "text": "y"})))
    write(tmp_path / "rows.csv", b"id,text\nc1,z\n")
    write(tmp_path / "docs/d.txt", b"w")
    missing = f"{tmp_path}/nothing/*.parquet"
    patterns = [f"{tmp_path}/jsonl/*.jsonl*", f"{tmp_path}/rows.csv", f"{tmp_path}/docs", missing]
    cfg = InputConfig(path=patterns)

    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        read_out = p | "ReadCorpus" >> ReadCorpus(cfg)
        assert_that(
            read_out["records"],
            equal_to(
                [
                    RawRecord((tmp_path / "jsonl/a.jsonl").as_uri(), 1, "a1", "x"),
                    RawRecord((tmp_path / "jsonl/b.jsonl.gz").as_uri(), 1, "b1", "y"),
                    RawRecord((tmp_path / "rows.csv").as_uri(), 1, "c1", "z"),
                    RawRecord((tmp_path / "docs/d.txt").as_uri(), None, "d.txt", "w"),
                ]
            ),
            label="CheckRecords",
        )
        assert_that(
            read_out["rejects"],
            equal_to(
                [
                    read_reject(
                        f"{(tmp_path / 'jsonl/a.jsonl').as_uri()}:2",
                        INVALID_UTF8,
                        "line is not valid UTF-8: invalid start byte at byte 0",
                    ),
                    read_reject(
                        missing,
                        NO_FILES_MATCHED,
                        "no file matches this pattern; check input.path and input.storage_options",
                    ),
                ]
            ),
            label="CheckRejects",
        )


# --- S3 ----------------------------------------------------------------------------------------


def test_reads_from_s3(s3_options: dict[str, Any]) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_options["client_kwargs"]["endpoint_url"])
    s3.put_object(Bucket="corpus", Key="2024/a.jsonl.gz", Body=gzip.compress(jsonl({"id": 1})))
    s3.put_object(Bucket="corpus", Key="2024/b.parquet",
                  Body=parquet(pa.table({"id": [2], "text": ["b"]})))
    s3.put_object(Bucket="corpus", Key="2024/sub/c.txt", Body=b"hello")
    s3.put_object(Bucket="corpus", Key="2024/folder/", Body=b"")  # a console-made "folder"

    by_directory = read_all("s3://corpus/2024", storage_options=s3_options)
    by_glob = read_all("s3://corpus/*/*.parquet", storage_options=s3_options)

    assert by_directory == [
        RawRecord("s3://corpus/2024/a.jsonl.gz", 1, 1, None),
        RawRecord("s3://corpus/2024/b.parquet", 1, 2, "b"),
        RawRecord("s3://corpus/2024/sub/c.txt", None, "sub/c.txt", "hello"),
    ]
    assert by_glob == [RawRecord("s3://corpus/2024/b.parquet", 1, 2, "b")]

