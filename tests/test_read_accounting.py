"""Every matched path, file and field is accounted for, and ``plan`` counts as ``run`` does.

Issue 11 items 9, 10, 11 and part of 14: paths that are not plain files (symlinks, FIFOs,
unlistable folders), whole-file mistakes (a missing or mistyped field: one reject for the file,
not one per row), dotted fields, a JSONL byte-order mark, and the read counts of ``plan``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.local_server import EmbeddingServer
from pipeline.plan import make_plan
from pipeline.run import RunRequest, execute
from tests.support.harness import MODEL, make_config, read_output
from transforms.read import MatchFilesFn, expand_pattern, read_records
from transforms.sections import InputConfig
from transforms.types import RawRecord, Reject

REPO = Path(__file__).resolve().parents[1]


def jsonl(*rows: Any) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=4)
    return sink.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run(tmp_path: Path, paths: list[str], **input_options: Any) -> tuple[int, dict, list[dict], Any]:
    """A real run over ``paths``: exit code, manifest, reject rows and the vectors table."""
    out = str(tmp_path / "out")
    with EmbeddingServer(dim=8, model=MODEL) as server:
        cfg = make_config(paths, out, server.base_url,
                          input={"metadata_fields": [], **input_options})
        code = execute(RunRequest(cfg, quiet=True))
    manifest, tables = read_output(out)
    return code, manifest, tables["rejects"].to_pylist(), tables["vectors"]


def rejects_of(items: list[RawRecord | Reject]) -> list[Reject]:
    return [item for item in items if isinstance(item, Reject)]


def read_all(pattern: str, **input_options: Any) -> list[RawRecord | Reject]:
    cfg = InputConfig(path=pattern, **input_options)
    out: list[RawRecord | Reject] = []
    for item in expand_pattern(pattern, cfg.storage_options, cfg.format):
        out.extend([item] if isinstance(item, Reject) else read_records(item, cfg))
    return out


def match(pattern: str, **input_options: Any) -> list[Any]:
    """What the match step outputs for one pattern: files, and rejects unwrapped."""
    fn = MatchFilesFn(InputConfig(path=pattern, **input_options))
    return [getattr(item, "value", item) for item in fn.process(pattern)]


# --- Item 9: every matched path ends as documents or as a reject with its path ---------------


def test_symlinks_fifos_and_dangling_links_are_read_or_rejected_by_path(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write(corpus / "real.jsonl", jsonl({"id": "r", "text": "real file"}))
    target = write(tmp_path / "elsewhere" / "target.jsonl", jsonl({"id": "l", "text": "linked"}))
    (corpus / "link.jsonl").symlink_to(target)
    (corpus / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    (corpus / "folder-link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    os.mkfifo(corpus / "fifo.jsonl")

    # A FIFO opened for reading blocks until a writer comes: a watchdog fails the test instead.
    watchdog = threading.Timer(120, lambda: os.open(corpus / "fifo.jsonl", os.O_WRONLY))
    watchdog.daemon = True
    watchdog.start()
    try:
        code, manifest, rejects, vectors = run(tmp_path, [str(corpus)])
    finally:
        watchdog.cancel()

    assert sorted(vectors.column("doc_id").to_pylist()) == ["l", "r"]  # the link read as its file
    by_source = {r["source"]: r for r in rejects}
    assert set(by_source) == {(corpus / name).as_uri()
                              for name in ("dangling.jsonl", "folder-link", "fifo.jsonl")}
    for source, row in by_source.items():
        assert (row["reason"], row["id"], row["doc_id"]) == ("unreadable_file", source, source)
    assert "does not exist" in by_source[(corpus / "dangling.jsonl").as_uri()]["detail"]
    assert "FIFO" in by_source[(corpus / "fifo.jsonl").as_uri()]["detail"]
    assert "directory" in by_source[(corpus / "folder-link").as_uri()]["detail"]
    assert code == 1 and manifest["counts"]["files_failed"] == 3


def test_a_folder_that_cannot_be_listed_is_a_reject_naming_it() -> None:
    # Root lists any folder whatever its mode, so the listing runs as nobody, in a child.
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    root = Path(tempfile.mkdtemp(prefix="embedpipe-locked-"))
    try:
        root.chmod(0o755)
        write(root / "open" / "a.jsonl", jsonl({"id": "a", "text": "x"}))
        write(root / "locked" / "b.jsonl", jsonl({"id": "b", "text": "y"}))
        (root / "open").chmod(0o755)
        (root / "open" / "a.jsonl").chmod(0o644)
        (root / "locked").chmod(0o700)  # root's own: nobody may not list it
        # Imports as root (the checkout need not be readable by nobody), then the listing as
        # nobody: a warm-up listing loads the local filesystem's modules first.
        script = ("import json, os, sys; from transforms.read import expand_pattern; "
                  "expand_pattern(sys.argv[1], {}, 'auto'); os.setgid(65534); os.setuid(65534); "
                  "print(json.dumps([[type(x).__name__, getattr(x, 'url', None) or x.source, "
                  "getattr(x, 'reason', None)] for x in expand_pattern(sys.argv[1], {}, 'auto')]))")
        for pattern in (str(root), f"{root}/**/*.jsonl"):
            done = subprocess.run([sys.executable, "-c", script, pattern], cwd=REPO,
                                  capture_output=True, text=True, check=True, timeout=60)
            listed = json.loads(done.stdout)
            assert ["SourceFile", (root / "open" / "a.jsonl").as_uri(), None] in listed, pattern
            assert ["Reject", (root / "locked").as_uri(), "unreadable_file"] in listed, pattern
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)


# --- Item 10: whole-file mistakes are one file-level reject --------------------------------------


def test_csv_without_the_text_column_is_one_missing_field_reject_and_exit_1(tmp_path: Path) -> None:
    rows = b"".join(b"%d,some words here %d\n" % (i, i) for i in range(200))
    bad = write(tmp_path / "c" / "bad.csv", b"id,body\n" + rows)
    write(tmp_path / "c" / "good.csv", b"id,text\n" + rows.replace(b",", b"x,"))
    # Small ranges: the bad file is read by several workers, and is still one reject.
    code, manifest, rejects, _ = run(tmp_path, [str(tmp_path / "c")], range_bytes=1024)
    assert [(r["reason"], r["source"], r["id"]) for r in rejects] == [
        ("missing_field", bad.as_uri(), bad.as_uri())]
    assert "'text'" in rejects[0]["detail"] and "id, body" in rejects[0]["detail"]
    assert code == 1
    counts = manifest["counts"]
    assert (counts["files_failed"], counts["documents_read"], counts["documents_valid"],
            counts["documents_rejected"]) == (1, 200, 200, 0)


def test_parquet_without_the_field_or_with_a_non_string_text_is_one_reject(
        tmp_path: Path) -> None:
    lacking = write(tmp_path / "p" / "lacking.parquet",
                    parquet(pa.table({"id": ["a", "b"], "body": ["x", "y"]})))
    numbers = write(tmp_path / "p" / "numbers.parquet",
                    parquet(pa.table({"id": [f"n{i}" for i in range(20)], "text": list(range(20))})))
    code, manifest, rejects, _ = run(tmp_path, [str(tmp_path / "p")], range_bytes=64)
    by_source = {r["source"]: r for r in rejects}
    assert len(rejects) == 2
    assert by_source[lacking.as_uri()]["reason"] == "missing_field"
    assert "id, body" in by_source[lacking.as_uri()]["detail"]
    assert by_source[numbers.as_uri()]["reason"] == "missing_field"
    assert "int64" in by_source[numbers.as_uri()]["detail"]
    assert code == 1 and manifest["counts"]["files_failed"] == 2


def test_dotted_text_field_reads_nested_jsonl_and_parquet_fields(tmp_path: Path) -> None:
    write(tmp_path / "n" / "a.jsonl", jsonl(
        {"id": "j1", "doc": {"body": "nested text"}},
        {"id": "j2", "doc": {"body": "slow path", "score": float("nan")}},  # json, not orjson
        {"id": "j3", "doc.body": "a literal dotted key"},
    ))
    write(tmp_path / "n" / "b.parquet", parquet(pa.table({
        "id": ["p1", "p2"],
        "doc": pa.array([{"body": "struct text", "n": 1}, {"body": "more", "n": 2}]),
    })))
    code, _, rejects, vectors = run(tmp_path, [str(tmp_path / "n")], text_field="doc.body")
    assert rejects == [] and code == 0
    assert sorted(vectors.column("doc_id").to_pylist()) == ["j1", "j2", "j3", "p1", "p2"]


def test_jsonl_byte_order_mark_is_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + jsonl({"id": "a", "text": "x"}))
    assert read_all(str(path)) == [RawRecord(path.as_uri(), 1, "a", "x")]


# --- Item 11: plan and run count alike ------------------------------------------------------------


def test_plan_counts_are_the_run_manifest_counts(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write(corpus / "a.jsonl", jsonl(*({"id": f"a{i}", "text": f"text {i}"} for i in range(20)),
                                    {"id": "a0", "text": "duplicate"}) + b"{oops\n")
    whole = gzip.compress(jsonl(*({"id": f"g{i}", "text": f"gz {i} " * 30} for i in range(300))))
    write(corpus / "truncated.jsonl.gz", whole[: len(whole) // 2])
    write(corpus / "fake.jsonl.gz", jsonl({"id": "f", "text": "not gzip"}))
    write(corpus / "README", b"no extension")
    write(corpus / "no-text.csv", b"id,body\n1,x\n2,y\n")
    write(corpus / "empty.csv", b"id,text\n3,\n")
    write(corpus / "notes.txt", b"a text document")
    out = str(tmp_path / "out")
    with EmbeddingServer(dim=8, model=MODEL) as server:
        cfg = make_config([str(corpus)], out, server.base_url, input={"metadata_fields": []})
        plan = make_plan(cfg, [])
        assert execute(RunRequest(cfg, quiet=True)) == 1
    manifest, _ = read_output(out)
    counts = manifest["counts"]
    assert plan["rejects_by_reason"] == manifest["rejects_by_reason"]
    for name in ("documents_read", "documents_valid", "documents_rejected", "files_failed"):
        assert plan[name] == counts[name], name
    assert manifest["rejects_by_reason"]["unreadable_file"] == 3
    assert manifest["rejects_by_reason"]["missing_field"] == 1


# --- Item 14: a missing bucket, file rejects' ids, blank texts, ids -----------------------------


@pytest.mark.parametrize("pattern", ["s3://no-such-bucket/corpus", "s3://no-such-bucket/*.jsonl",
                                     "s3://no-such-bucket/a.jsonl"])
def test_a_missing_bucket_is_unreadable_not_an_empty_match(
        s3_options: dict[str, Any], pattern: str) -> None:
    [reject] = match(pattern, storage_options=s3_options)
    assert (reject.reason, reject.source, reject.id) == ("unreadable_file", pattern, pattern)
    assert "no-such-bucket" in reject.detail and "does not exist" in reject.detail


def test_a_pattern_in_an_existing_bucket_that_matches_nothing_is_no_files_matched(
        s3_options: dict[str, Any]) -> None:
    [reject] = match("s3://corpus/nothing/*.jsonl", storage_options=s3_options)
    assert reject.reason == "no_files_matched"


def test_texts_of_nul_bytes_or_zero_width_characters_are_empty_text(tmp_path: Path) -> None:
    blank = ["\x00\x00\x00", "\u200b\u200c\u200d", " \u2060\ufeff\x00 ", "\u200b\n\t"]
    write(tmp_path / "b" / "a.jsonl", jsonl(
        *({"id": f"b{i}", "text": text} for i, text in enumerate(blank)),
        {"id": "ok", "text": "\u200bvisible\x00"}))
    code, _, rejects, vectors = run(tmp_path, [str(tmp_path / "b")])
    assert sorted((r["id"], r["reason"]) for r in rejects) == [
        (f"b{i}", "empty_text") for i in range(len(blank))]
    assert vectors.column("doc_id").to_pylist() == ["ok"] and code == 0


def test_ids_equal_once_normalized_are_duplicates_naming_both_sources(tmp_path: Path) -> None:
    path = write(tmp_path / "i" / "a.jsonl", jsonl(
        {"id": "padded", "text": "first"}, {"id": " padded ", "text": "second"},
        {"id": 1, "text": "third"}, {"id": "1", "text": "fourth"}))
    code, _, rejects, vectors = run(tmp_path, [str(tmp_path / "i")])
    assert sorted(vectors.column("doc_id").to_pylist()) == ["1", "padded"]
    by_id = {r["id"]: r for r in rejects}
    assert set(by_id) == {"1", "padded"} and {r["reason"] for r in rejects} == {"duplicate_id"}
    for doc_id, (winner, loser) in {"padded": (1, 2), "1": (3, 4)}.items():
        detail = by_id[doc_id]["detail"]
        assert by_id[doc_id]["source"] == f"{path.as_uri()}:{loser}"
        assert f"{path.as_uri()}:{winner}" in detail and f"{path.as_uri()}:{loser}" in detail
    assert code == 0
