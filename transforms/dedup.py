"""Duplicate ids, settled at commit: which version of an id stays, and the rows of the others.

The validate stage lets every valid document through at once and writes a
:class:`~transforms.types.DocumentId` per document beside the run (the ``ids`` files); see
:mod:`transforms.validate` for why. Once every shard is written, the commit step calls:

1. :func:`find_duplicates` — reads the ``doc_id`` column of the ids files (a few bytes per
   document, grouped by Arrow in C++), keeps the ids seen more than once, reads the versions of
   those alone and picks each winner with :func:`~transforms.validate.pick_winner` (the earliest
   file, then line). Memory: the ``doc_id`` column of the run, once, at commit.
2. :func:`drop_rows` — rewrites the few output files that hold rows of a losing version
   (vectors, chunk rejects), row group by row group, so memory is one row group, not one file.

A version is known by ``(doc_id, source)``: vector rows carry their ``source`` for that (and for
provenance). The same file matched twice by overlapping patterns is read once
(:mod:`transforms.read` drops repeated URLs), so two versions never share a source.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transforms.types import DocumentId, Reject, WrittenFile
from transforms.validate import pick_winner
from transforms.write import parquet_options


@dataclass(frozen=True, slots=True)
class Duplicates:
    """The losing versions of every repeated id, and a ``duplicate_id`` reject for each."""

    losers: frozenset[tuple[str, str]]  # (doc_id, source)
    rejects: tuple[Reject, ...]

    @property
    def doc_ids(self) -> frozenset[str]:
        return frozenset(doc_id for doc_id, _ in self.losers)


NO_DUPLICATES = Duplicates(frozenset(), ())


def _read(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def find_duplicates(fs: fsspec.AbstractFileSystem, id_files: Sequence[str]) -> Duplicates:
    """Group the run's document ids; every version but the earliest of an id loses.

    Two passes over the ids files: the 64-bit ``key`` column alone (8 bytes a document, sorted
    in numpy) finds the keys seen more than once; then the ids and sources of those rows alone
    are read and grouped by the id itself, so a hash collision only costs a look.
    """
    if not id_files:
        return NO_DUPLICATES
    keys = np.concatenate([_read(fs, p, ["key"]).column("key").to_numpy()
                           for p in id_files] or [np.zeros(0, np.uint64)])
    keys.sort()
    repeated = np.unique(keys[1:][keys[1:] == keys[:-1]])
    del keys
    if not len(repeated):
        return NO_DUPLICATES
    versions: dict[str, list[DocumentId]] = {}
    for path in id_files:
        table = _read(fs, path)
        table = table.filter(pa.array(np.isin(table.column("key").to_numpy(), repeated)))
        for row in table.to_pylist():
            versions.setdefault(row["doc_id"], []).append(
                DocumentId(row["doc_id"], row["source_url"], row["position"], row["key"]))
    losers: set[tuple[str, str]] = set()
    rejects: list[Reject] = []
    for doc_id in sorted(versions):
        if len(versions[doc_id]) < 2:
            continue  # another id with the same key
        _, lost = pick_winner(versions[doc_id])
        rejects.extend(lost)
        losers.update((r.doc_id or "", r.source) for r in lost)
    return Duplicates(frozenset(losers), tuple(rejects))


def drop_rows(
    fs: fsspec.AbstractFileSystem,
    written: WrittenFile,
    duplicates: Duplicates,
    stats: Callable[[pa.Table], Counter[str]],
    scratch: str | None = None,
) -> tuple[WrittenFile, pa.Table | None]:
    """``written`` without the rows of losing versions; also returns the rows removed.

    A file with no such row is left as it is (only its ``doc_id`` column is read). The new
    version is written in ``scratch`` (the run's ``_temporary/`` folder; beside the file when
    None) and moved over the old one, so a commit killed mid-way leaves no stray file in the
    output's table folders.
    """
    if not written.rows or not duplicates.losers:
        return written, None
    if not pc.any(pc.is_in(_read(fs, written.path, ["doc_id"]).column("doc_id"),
                           value_set=pa.array(sorted(duplicates.doc_ids), pa.string()))).as_py():
        return written, None
    folder, name = written.path.rsplit("/", 1)
    if scratch is not None:
        fs.makedirs(scratch, exist_ok=True)
    tmp = f"{scratch}/{name}.dedup" if scratch is not None else f"{folder}/.{name}.dedup"
    kept_stats: Counter[str] = Counter()
    removed: list[pa.Table] = []
    rows = 0
    with fs.open(written.path, "rb") as source, fs.open(tmp, "wb") as sink:
        reader = pq.ParquetFile(source)
        writer: pq.ParquetWriter | None = None

        for group in range(reader.num_row_groups):
            table = reader.read_row_group(group)
            lost = pa.array([(d, s) in duplicates.losers for d, s in zip(
                table.column("doc_id").to_pylist(), table.column("source").to_pylist(),
                strict=True)], pa.bool_())
            kept = table.filter(pc.invert(lost))
            removed.append(table.filter(lost))
            if writer is None:
                writer = pq.ParquetWriter(sink, table.schema, **parquet_options(table.schema))
            writer.write_table(kept)
            kept_stats.update(stats(kept))
            rows += kept.num_rows
        if writer is not None:
            writer.close()
    fs.mv(tmp, written.path)
    return (replace(written, rows=rows, stats=tuple(sorted(kept_stats.items()))),
            pa.concat_tables(removed) if removed else None)
