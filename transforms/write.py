"""The write stage: vectors, usage and rejects to Parquet shards, each committed atomically.

Each writer DoFn streams rows into a ``pyarrow.parquet.ParquetWriter`` on a temporary file under
``OUTPUT/_temporary/RUN_ID/``, in row groups of at most :data:`ROW_GROUP_ROWS`, so memory is
bounded by one row group and not by ``output.rows_per_file``. When a file reaches
``rows_per_file`` (or the Beam bundle ends) it is closed and moved to its final name
``OUTPUT/KIND/part-RUN_ID-*.parquet``, and a :class:`~transforms.types.WrittenFile` with its row count
and per-file aggregates goes to the manifest step. No file appears under its final name before
it is whole; on object stores the manifest, written last, is the commit marker.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from transforms.types import (
    FINGERPRINT_MODULUS,
    OUTCOME_OK,
    OUTCOME_RETRY,
    STAGE_EMBED,
    DocumentIds,
    EmbeddedBatch,
    Reject,
    UsageRecord,
    WrittenFile,
    fingerprint,
)

ROW_GROUP_ROWS = 8192
#: Columns named ``__*`` travel with a table to the stats and are never written.
FINGERPRINT_COLUMN = "__fingerprint"
#: Vector bytes buffered before a row group is written: at dimension 1536, ~5,400 rows.
ROW_GROUP_BYTES = 32 * 1024 * 1024

KIND_VECTORS = "vectors"
KIND_USAGE = "usage"
KIND_REJECTS = "rejects"
KIND_IDS = "ids"  # document ids and sources, for the commit step; never part of the output

IDS_SCHEMA = pa.schema([
    ("key", pa.uint64()),
    ("doc_id", pa.string()),
    ("source_url", pa.string()),
    ("position", pa.int64()),
])

REJECTS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("doc_id", pa.string()),
    ("source", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("attempts", pa.int32()),
])

USAGE_SCHEMA = pa.schema([
    ("request_id", pa.string()),
    ("provider_request_id", pa.string()),
    ("model", pa.string()),
    ("n_inputs", pa.int32()),
    ("prompt_tokens", pa.int64()),
    ("total_tokens", pa.int64()),
    ("tokens_estimated", pa.bool_()),
    ("attempt", pa.int32()),
    ("http_status", pa.int32()),
    ("outcome", pa.string()),
    ("error", pa.string()),
    ("latency_ms", pa.float64()),
    ("started_at", pa.timestamp("us", tz="UTC")),
    ("worker", pa.string()),
    # An extension of the contract, last so positional readers keep working: the model the
    # answer named (``model`` is the configured one).
    ("served_model", pa.string()),
    # Batch mode (provider.mode: batch): "batch" and the batch that answered the line.
    ("mode", pa.string()),
    ("batch_id", pa.string()),
])


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """Where and how a run writes; picklable, shipped to the writer DoFns."""

    path: str
    storage_options: tuple[tuple[str, Any], ...]
    run_id: str
    rows_per_file: int
    include_text: bool
    metadata_fields: tuple[str, ...]
    #: A multimodal run: vectors gain ``image`` and ``image_sha256``, usage ``text_tokens``
    #: and ``image_tokens``; with ``sparse``, vectors gain ``sparse_embedding``.
    multimodal: bool = False
    sparse: bool = False

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(self.path, **dict(self.storage_options))
        return fs, root.rstrip("/")


# -- rows → Arrow ------------------------------------------------------------------------------


def vectors_table(batches: Sequence[EmbeddedBatch], spec: OutputSpec) -> pa.Table:
    """One row per chunk; the embedding column is ``fixed_size_list<float32>[dim]``."""
    chunks = [c for b in batches for c in b.chunks]
    dim = batches[0].vectors.shape[1]
    if any(b.vectors.shape[1] != dim for b in batches):
        raise ValueError(f"vectors of several dimensions in one file: "
                         f"{sorted({b.vectors.shape[1] for b in batches})}")
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "id": pa.array([c.chunk_id for c in chunks], pa.string()),
        "doc_id": pa.array([c.doc_id for c in chunks], pa.string()),
        "chunk_index": pa.array([c.chunk_index for c in chunks], pa.int32()),
        "char_start": pa.array([c.char_start for c in chunks], pa.int64()),
        "char_end": pa.array([c.char_end for c in chunks], pa.int64()),
        "n_tokens": pa.array([c.n_tokens for c in chunks], pa.int32()),
        "content_sha256": pa.array([c.content_sha256 for c in chunks], pa.string()),
        "source": pa.array([c.source for c in chunks], pa.string()),
    }
    if spec.include_text:
        columns["text"] = pa.array([c.text for c in chunks], pa.string())
    columns["model"] = pa.array([b.model for b in batches for _ in b.chunks], pa.string())
    columns[FINGERPRINT_COLUMN] = pa.array(
        np.fromiter((c.fingerprint for c in chunks), dtype=np.uint64, count=len(chunks)))
    # One Arrow chunk per request, no copy into one matrix: the writer takes chunked columns.
    columns["embedding"] = pa.chunked_array([pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(b.vectors, dtype=np.float32).reshape(-1), pa.float32()),
        dim) for b in batches], pa.list_(pa.float32(), dim))
    if spec.multimodal:
        columns.update(image_columns(batches, chunks, spec.sparse))
    for position, name in enumerate(spec.metadata_fields):
        if name in columns:
            continue  # a metadata field never shadows a contract column
        columns[name] = metadata_array([c.metadata[position][1] for c in chunks])
    return pa.table(columns)


#: ``sparse_embedding``: the provider's indices and values, sorted by index.
SPARSE_TYPE = pa.list_(pa.struct([("index", pa.int32()), ("value", pa.float32())]))


def image_columns(batches: Sequence[EmbeddedBatch], chunks: Sequence[Any],
                  sparse: bool) -> dict[str, pa.Array]:
    """A multimodal run's columns: the image as given, its bytes' sha256, the sparse vector."""
    images = [c.image for c in chunks]
    columns = {
        "image": pa.array([i.reference if i else None for i in images], pa.string()),
        "image_sha256": pa.array([i.sha256 if i else None for i in images], pa.string()),
    }
    if sparse:
        rows = [row for b in batches
                for row in (b.sparse if b.sparse is not None else (None,) * len(b))]
        lengths = np.fromiter((0 if r is None else len(r[0]) for r in rows), np.int32, len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        present = [r for r in rows if r is not None]
        indices = np.concatenate([r[0] for r in present]) if present else np.zeros(0, np.int32)
        values = np.concatenate([r[1] for r in present]) if present else np.zeros(0, np.float32)
        items = pa.StructArray.from_arrays(
            [pa.array(indices.astype(np.int32)), pa.array(values.astype(np.float32))],
            fields=list(SPARSE_TYPE.value_type))
        mask = pa.array([r is None for r in rows])
        columns["sparse_embedding"] = pa.ListArray.from_arrays(
            pa.array(offsets), items, type=SPARSE_TYPE, mask=mask)
    return columns


def metadata_array(values: list[Any]) -> pa.Array:
    """Metadata "as read"; a column whose values Arrow cannot unify is written as JSON text."""
    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values],
                        pa.string())
    return arr.cast(pa.string()) if pa.types.is_null(arr.type) else arr


def ids_table(batches: Sequence[DocumentIds], spec: OutputSpec) -> pa.Table:
    """Document ids arrive in batches, as the validate stage emits them."""
    ids = [i for batch in batches for i in batch.ids]
    return pa.table({
        "key": pa.array(np.fromiter((i.key for i in ids), dtype=np.uint64, count=len(ids))),
        "doc_id": pa.array([i.doc_id for i in ids], pa.string()),
        "source_url": pa.array([i.source_url for i in ids], pa.string()),
        "position": pa.array([i.position for i in ids], pa.int64()),
    }, schema=IDS_SCHEMA)


def rejects_table(rejects: Sequence[Reject], spec: OutputSpec) -> pa.Table:
    return pa.Table.from_pylist(
        [{f.name: getattr(r, f.name) for f in REJECTS_SCHEMA} for r in rejects], REJECTS_SCHEMA
    )


#: A multimodal run's usage: the answer's ``prompt_tokens_details``, last.
MULTIMODAL_USAGE_SCHEMA = USAGE_SCHEMA.append(pa.field("text_tokens", pa.int64())).append(
    pa.field("image_tokens", pa.int64()))


def usage_table(rows: Sequence[UsageRecord], spec: OutputSpec) -> pa.Table:
    schema = MULTIMODAL_USAGE_SCHEMA if spec.multimodal else USAGE_SCHEMA
    return pa.Table.from_pylist(
        [{f.name: getattr(u, f.name) for f in schema} for u in rows], schema
    )


# -- per-file aggregates for the manifest -------------------------------------------------------


def fingerprint_sum(ids: Sequence[str | None], sources: Sequence[str]) -> int:
    """The accounting checksum of these rows (see :func:`transforms.types.fingerprint`)."""
    return sum(fingerprint(i or "", s) for i, s in zip(ids, sources, strict=True)) % (
        FINGERPRINT_MODULUS)


def vectors_stats(table: pa.Table) -> Counter[str]:
    if FINGERPRINT_COLUMN in table.column_names:  # carried from the splitter: no rehashing
        total = int(np.sum(table.column(FINGERPRINT_COLUMN).to_numpy(), dtype=np.uint64))
    else:
        total = fingerprint_sum(table.column("id").to_pylist(), table.column("source").to_pylist())
    return Counter({f"dim:{table.schema.field('embedding').type.list_size}": 1,
                    "fingerprint": total})


def rejects_stats(table: pa.Table) -> Counter[str]:
    stats: Counter[str] = Counter()
    for column in ("reason", "stage"):
        for value, count in Counter(table.column(column).to_pylist()).items():
            stats[f"{column}:{value}"] += count
    chunk_rows = table.filter(pc.equal(table.column("stage"), STAGE_EMBED))
    if chunk_rows.num_rows:
        stats["fingerprint"] = fingerprint_sum(chunk_rows.column("id").to_pylist(),
                                               chunk_rows.column("source").to_pylist())
    return stats


def ids_stats(table: pa.Table) -> Counter[str]:
    return Counter()


def usage_stats(table: pa.Table) -> Counter[str]:
    ok = pc.equal(table.column("outcome"), OUTCOME_OK)
    served = pc.filter(table.column("served_model"), ok).drop_null()
    return Counter({
        **{f"served_model:{name}": n for name, n in Counter(served.to_pylist()).items()},
        "requests": table.num_rows,
        "ok": int(pc.sum(ok).as_py() or 0),
        "retries": int(pc.sum(pc.equal(table.column("outcome"), OUTCOME_RETRY)).as_py() or 0),
        "throttled": int(pc.sum(pc.equal(table.column("http_status"), 429)).as_py() or 0),
        "prompt_tokens": int(pc.sum(pc.filter(table.column("prompt_tokens"), ok)).as_py() or 0),
        "total_tokens": int(pc.sum(pc.filter(table.column("total_tokens"), ok)).as_py() or 0),
        **{name: int(pc.sum(pc.filter(table.column(name), ok)).as_py() or 0)
           for name in ("text_tokens", "image_tokens") if name in table.column_names},
        **batch_usage_stats(table, ok),
    })


def batch_usage_stats(table: pa.Table, ok: pa.ChunkedArray) -> Counter[str]:
    """Batch mode's share of a usage file: lines, ``ok`` lines' tokens, and each batch id."""
    lines = pc.equal(table.column("mode"), "batch")
    if not pc.any(lines).as_py():
        return Counter()
    ids = pc.filter(table.column("batch_id"), lines).drop_null().unique().to_pylist()
    return Counter({
        "batch_lines": int(pc.sum(lines).as_py() or 0),
        "batch_prompt_tokens": int(pc.sum(pc.filter(
            table.column("prompt_tokens"), pc.and_(ok, lines))).as_py() or 0),
        **{f"batch_id:{batch}": 1 for batch in ids},
    })


def _one(_: Any) -> int:
    return 1


def _no_bytes(_: Any) -> int:
    return 0


def _vector_bytes(batch: EmbeddedBatch) -> int:
    return int(batch.vectors.nbytes)


@dataclass(frozen=True, slots=True)
class ShardKind:
    """How one output kind turns elements into Arrow and aggregates a file.

    ``temporary`` kinds are written under ``_temporary/RUN_ID/`` for the commit step, and are
    never part of the output.
    """

    name: str
    to_table: Callable[[Sequence[Any], OutputSpec], pa.Table]
    rows_of: Callable[[Any], int]
    stats: Callable[[pa.Table], Counter[str]]
    bytes_of: Callable[[Any], int] = _no_bytes
    temporary: bool = False


VECTORS = ShardKind(KIND_VECTORS, vectors_table, len, vectors_stats, _vector_bytes)
REJECTS = ShardKind(KIND_REJECTS, rejects_table, _one, rejects_stats)
USAGE = ShardKind(KIND_USAGE, usage_table, _one, usage_stats)
IDS = ShardKind(KIND_IDS, ids_table, len, ids_stats, temporary=True)


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """zstd for every column but the vectors, which are written plain.

    Float vectors barely compress (7% with zstd, at a third of the speed of a plain write, and
    dictionary encoding tripled the cost again): at a million vectors of 1536 dimensions that
    was most of the writer's CPU for a few percent of disk. Their column statistics are off too
    (they halved the speed of a plain write).
    """
    names = schema.names
    return {
        "compression": {n: ("none" if n == "embedding" else "zstd") for n in names},
        "use_dictionary": [n for n in names if n not in ("embedding", "id", "content_sha256")],
        # Min/max statistics of the vectors help no reader and cost as much as the write.
        "write_statistics": [n for n in names if n != "embedding"],
    }


# -- the writer ---------------------------------------------------------------------------------


class _OpenShard:
    """A Parquet file being written under its temporary name.

    Row groups are encoded on a thread of the shard's own, one at a time, while the DoFn's thread
    goes on building the next: pyarrow encodes without the GIL, so on a re-run served from the
    cache (no requests to wait for) the writer no longer takes a fifth of the one busy core.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, tmp_path: str, final_path: str,
                 schema: pa.Schema) -> None:
        self.fs = fs
        self.tmp_path = tmp_path
        self.final_path = final_path
        self.schema = schema
        self.rows = 0
        self.stats: Counter[str] = Counter()
        self._handle = fs.open(tmp_path, "wb")
        self._writer = pq.ParquetWriter(self._handle, schema, **parquet_options(schema))
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="embedpipe-write")
        self._pending: Future[None] | None = None

    def write(self, table: pa.Table, stats: Counter[str]) -> None:
        if self._pending is not None:
            self._pending.result()  # at most one row group waits: memory stays one group
        self._pending = self._encoder.submit(self._writer.write_table, table,
                                             row_group_size=ROW_GROUP_ROWS)
        self.rows += table.num_rows
        self.stats.update(stats)

    def commit(self, kind: str) -> WrittenFile:
        try:
            if self._pending is not None:
                self._pending.result()
        finally:
            self._encoder.shutdown()
        self._writer.close()
        self._handle.close()
        self.fs.mv(self.tmp_path, self.final_path)
        return WrittenFile(kind=kind, path=self.final_path, rows=self.rows,
                           stats=tuple(sorted(self.stats.items())))


def _written(table: pa.Table) -> pa.Table:
    """``table`` without its ``__*`` columns, which are for the stats only."""
    hidden = [name for name in table.column_names if name.startswith("__")]
    return table.drop_columns(hidden) if hidden else table


class _WriteShardsFn(beam.DoFn):
    def __init__(self, kind: ShardKind, spec: OutputSpec) -> None:
        self.kind = kind
        self.spec = spec

    def setup(self) -> None:
        self._fs, self._root = self.spec.filesystem()

    def _count(self, stats: Counter[str]) -> None:
        """Reject reasons as Beam counters (``embedpipe/rejects.REASON``), as they are written."""
        for key, value in stats.items():
            if key.startswith("reason:"):
                Metrics.counter("embedpipe", f"rejects.{key.split(':', 1)[1]}").inc(value)

    def start_bundle(self) -> None:
        self._buffer: list[Any] = []
        self._buffered_rows = self._buffered_bytes = 0
        self._shard: _OpenShard | None = None

    def process(self, element: Any) -> Iterator[WrittenFile]:
        self._buffer.append(element)
        self._buffered_rows += self.kind.rows_of(element)
        self._buffered_bytes += self.kind.bytes_of(element)
        if (self._buffered_rows >= min(ROW_GROUP_ROWS, self.spec.rows_per_file)
                or self._buffered_bytes >= ROW_GROUP_BYTES):
            yield from self._drain()

    def finish_bundle(self) -> Iterator[object]:
        done = list(self._drain())
        if self._shard is not None:
            done.append(self._shard.commit(self.kind.name))
            self._shard = None
        for written in done:
            yield GlobalWindows.windowed_value(written)

    def _drain(self) -> Iterator[WrittenFile]:
        if not self._buffer:
            return
        table = self.kind.to_table(self._buffer, self.spec)
        self._buffer, self._buffered_rows, self._buffered_bytes = [], 0, 0
        while table.num_rows:
            if self._shard is not None and not _written(table).schema.equals(self._shard.schema):
                yield self._shard.commit(self.kind.name)  # metadata types changed: new file
                self._shard = None
            if self._shard is None:
                self._shard = self._open(_written(table).schema)
            room = self.spec.rows_per_file - self._shard.rows
            part, table = table.slice(0, room), table.slice(room)
            stats = self.kind.stats(part)
            self._count(stats)
            self._shard.write(_written(part), stats)
            if self._shard.rows >= self.spec.rows_per_file:
                yield self._shard.commit(self.kind.name)
                self._shard = None

    def _open(self, schema: pa.Schema) -> _OpenShard:
        name = f"part-{self.spec.run_id}-{uuid.uuid4().hex[:12]}.parquet"
        temporary = f"{self._root}/_temporary/{self.spec.run_id}"
        folder = (f"{temporary}/{self.kind.name}" if self.kind.temporary
                  else f"{self._root}/{self.kind.name}")
        self._fs.makedirs(temporary, exist_ok=True)
        self._fs.makedirs(folder, exist_ok=True)
        return _OpenShard(self._fs, f"{temporary}/{self.kind.name}-{name}", f"{folder}/{name}",
                          schema)


class WriteShards(beam.PTransform):
    """Elements of one kind → committed Parquet files (``WrittenFile`` records)."""

    def __init__(self, kind: ShardKind, spec: OutputSpec) -> None:
        super().__init__()
        self.kind = kind
        self.spec = spec

    def expand(self, elements: beam.PCollection) -> beam.PCollection:
        return elements | "WriteParquet" >> beam.ParDo(_WriteShardsFn(self.kind, self.spec))


def write_rows(kind: ShardKind, rows: Sequence[Any], spec: OutputSpec, *, name: str) -> WrittenFile:
    """Write ``rows`` as one file named ``name`` outside the pipeline (launcher, commit step).

    With no rows it writes an empty file with the kind's schema, so that ``KIND/*.parquet``
    always matches at least one file for readers such as DuckDB.
    """
    fs, root = spec.filesystem()
    temporary = f"{root}/_temporary/{spec.run_id}"
    folder = f"{temporary}/{kind.name}" if kind.temporary else f"{root}/{kind.name}"
    fs.makedirs(folder, exist_ok=True)
    fs.makedirs(temporary, exist_ok=True)
    table = kind.to_table(rows, spec)
    shard = _OpenShard(fs, f"{temporary}/{kind.name}-{name}", f"{folder}/{name}",
                       _written(table).schema)
    shard.write(_written(table), kind.stats(table))
    return shard.commit(kind.name)
