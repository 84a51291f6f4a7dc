"""Duplicate ids without a shuffle: the first tier while streaming, the exact tier at commit."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from transforms.dedup import drop_rows, find_duplicates
from transforms.errors import AccountingError
from transforms.manifest import check_accounting
from transforms.types import (
    DUPLICATE_ID,
    FINGERPRINT_MODULUS,
    Chunk,
    Document,
    DocumentId,
    DocumentIds,
    EmbeddedBatch,
    Reject,
    WrittenFile,
    fingerprint,
)
from transforms.validate import SeenIds, id_key
from transforms.write import IDS, REJECTS, VECTORS, OutputSpec, write_rows


def doc(doc_id: str, url: str, line: int | None) -> Document:
    return Document(doc_id=doc_id, text=f"text of {doc_id} at {url}:{line}", source_url=url,
                    position=line)


def kinds(items: list) -> list[str]:
    return ["doc" if isinstance(i, Document) else i.reason for i in items]


# -- the first tier: SeenIds ---------------------------------------------------------------------


def test_a_later_version_is_rejected_at_once_naming_the_earlier() -> None:
    seen = SeenIds()
    assert kinds(seen.admit([doc("a", "f1", 1), doc("b", "f1", 2)])) == ["doc", "doc"]
    out = seen.admit([doc("a", "f1", 9), doc("c", "f1", 10)])
    assert kinds(out) == [DUPLICATE_ID, "doc"]
    assert out[0].source == "f1:9" and "f1:1" in out[0].detail


def test_within_one_batch_the_earlier_source_wins() -> None:
    out = SeenIds().admit([doc("a", "f2", 1), doc("a", "f1", 5), doc("a", "f1", 7)])
    # f2:1 came first but is later than f1:5: both go on (the commit tier settles f2:1);
    # f1:7 is later than f1:5, which was let through: rejected here.
    assert kinds(out) == ["doc", "doc", DUPLICATE_ID]


def test_an_earlier_version_read_late_goes_through_for_the_commit_to_settle() -> None:
    seen = SeenIds()
    seen.admit([doc("a", "f2", 3)])
    assert kinds(seen.admit([doc("a", "f1", 3)])) == ["doc"]


def test_the_same_record_read_again_goes_through() -> None:
    """A retried Beam bundle reads its records again: that is not a duplicate."""
    seen = SeenIds()
    seen.admit([doc("a", "f1", 1), doc("t", "dir/x.txt", None)])
    assert kinds(seen.admit([doc("a", "f1", 1), doc("t", "dir/x.txt", None)])) == ["doc", "doc"]


def test_many_ids_few_bytes() -> None:
    seen = SeenIds()
    for start in range(0, 100_000, 256):
        out = seen.admit([doc(f"id-{i}", "big.jsonl", i + 1) for i in range(start, start + 256)])
        assert all(isinstance(o, Document) for o in out)
    assert kinds(seen.admit([doc("id-99", "big.jsonl", 200_000)])) == [DUPLICATE_ID]


# -- the exact tier: at commit -------------------------------------------------------------------


def spec(tmp_path: Path) -> OutputSpec:
    return OutputSpec(path=str(tmp_path / "out"), storage_options=(), run_id="r",
                      rows_per_file=1000, include_text=False, metadata_fields=())


def chunk_of(d: DocumentId) -> Chunk:
    return Chunk(chunk_id=f"{d.doc_id}#0", doc_id=d.doc_id, chunk_index=0, char_start=0,
                 char_end=1, n_tokens=1, content_sha256="0" * 64, text="x", source=d.source)


def test_commit_finds_every_loser_across_files_and_rewrites_only_their_files(
        tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    s = spec(tmp_path)
    versions = [DocumentId(d, f, n, id_key(d)) for d, f, n in [
        ("a", "f2.jsonl", 4), ("a", "f1.jsonl", 8), ("b", "f1.jsonl", 1), ("a", "f3.jsonl", 1),
        ("c", "f3.jsonl", 2)]]
    id_files = [write_rows(IDS, [DocumentIds(tuple(versions[:2]))], s, name="ids-1.parquet").path,
                write_rows(IDS, [DocumentIds(tuple(versions[2:]))], s, name="ids-2.parquet").path]
    duplicates = find_duplicates(fs, id_files)
    assert duplicates.losers == {("a", "f2.jsonl:4"), ("a", "f3.jsonl:1")}
    assert sorted(r.source for r in duplicates.rejects) == ["f2.jsonl:4", "f3.jsonl:1"]
    assert all(r.reason == DUPLICATE_ID and "f1.jsonl:8" in r.detail
               for r in duplicates.rejects)

    chunks = [chunk_of(v) for v in versions]
    clean = write_rows(VECTORS, [EmbeddedBatch(tuple(chunks[2:3]), "m", np.ones((1, 4), "f4"))],
                       s, name="clean.parquet")
    mixed = write_rows(VECTORS, [EmbeddedBatch((chunks[0], chunks[1], chunks[4]), "m",
                                               np.arange(12, dtype="f4").reshape(3, 4) + 1)],
                       s, name="mixed.parquet")
    before = (tmp_path / "out" / "vectors" / "clean.parquet").stat().st_mtime_ns
    kept, removed = drop_rows(fs, clean, duplicates, VECTORS.stats)
    assert kept == clean and removed is None
    assert (tmp_path / "out" / "vectors" / "clean.parquet").stat().st_mtime_ns == before

    kept, removed = drop_rows(fs, mixed, duplicates, VECTORS.stats)
    assert kept.rows == 2 and removed is not None and removed.num_rows == 1
    table = pq.read_table(mixed.path)
    assert table.column("source").to_pylist() == ["f1.jsonl:8", "f3.jsonl:2"]
    assert table.column("embedding").to_pylist()[0] == [5.0, 6.0, 7.0, 8.0]
    assert dict(kept.stats)["fingerprint"] == (fingerprint("a#0", "f1.jsonl:8")
                                               + fingerprint("c#0", "f3.jsonl:2")
                                               ) % FINGERPRINT_MODULUS

    rejects = write_rows(REJECTS, [Reject(id="a#0", doc_id="a", source="f3.jsonl:1",
                                          stage="embed", reason="provider_rejected")],
                         s, name="rejects.parquet")
    kept, removed = drop_rows(fs, rejects, duplicates, REJECTS.stats)
    assert kept.rows == 0 and removed is not None and removed.num_rows == 1


def test_no_duplicates_reads_only_the_id_column(tmp_path: Path) -> None:
    s = spec(tmp_path)
    path = write_rows(IDS, [DocumentIds(tuple(DocumentId(str(i), "f", i, id_key(str(i)))
                                              for i in range(1000)))], s,
                      name="ids.parquet").path
    assert not find_duplicates(fsspec.filesystem("file"), [path]).losers


def test_ids_that_share_a_key_are_told_apart_by_the_id(tmp_path: Path) -> None:
    """A 64-bit collision between two different ids is no duplicate."""
    s = spec(tmp_path)
    path = write_rows(IDS, [DocumentIds((DocumentId("x", "f", 1, 7), DocumentId("y", "f", 2, 7),
                                         DocumentId("y", "g", 1, 7)))], s,
                      name="ids.parquet").path
    found = find_duplicates(fsspec.filesystem("file"), [path])
    assert found.losers == {("y", "g:1")}


def written(kind: str, rows: int, stats: dict) -> WrittenFile:
    return WrittenFile(kind=kind, path=f"/x/{kind}", rows=rows,
                       stats=tuple(sorted(Counter(stats).items())))


def test_accounting_refuses_lost_or_replaced_chunks() -> None:
    ids = [(f"d{i}#0", f"f:{i}") for i in range(5)]
    total = sum(fingerprint(*i) for i in ids) % FINGERPRINT_MODULUS
    ok = [written("vectors", 4, {"fingerprint": sum(fingerprint(*i) for i in ids[:4])}),
          written("rejects", 2, {"stage:embed": 1, "stage:validate": 1,
                                 "fingerprint": fingerprint(*ids[4])})]
    check_accounting(ok, 5, total)
    with pytest.raises(AccountingError, match="made 6 chunks but wrote 5"):
        check_accounting(ok, 6, total)
    swapped = [ok[0], written("rejects", 1, {"stage:embed": 1,
                                             "fingerprint": fingerprint("other#0", "f:9")})]
    with pytest.raises(AccountingError, match="checksums differ"):
        check_accounting(swapped, 5, total)
