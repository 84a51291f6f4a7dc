"""The content-addressed embedding cache: never pay twice for the same text.

A vector is determined by (provider kind, endpoint, model, dimensions, normalisation, request
parameters) and the chunk text. The first six name a *namespace*, a folder under ``cache.path``; inside it,
Parquet files hold ``(content_sha256, embedding)`` rows. So:

- **Lookup is a join, not a read per chunk.** ``LookupCache`` reads the namespace's files once,
  in the pipeline, and joins them with the chunks on ``content_sha256`` (CoGroupByKey). Chunks
  whose text is cached get their vector there (*hits*); the others go on to the API (*misses*).
- **Dedup within a run** falls out of the same join: chunks with one text form one group, the
  first (by chunk id) is sent, the others ride along as its ``twins`` and get its vector.
- **Writes happen as bundles complete.** The embed stage writes one small file per finished
  bundle (``run-RUNID-*.parquet``), so a crash, a preemption or a SIGKILL loses at most the
  bundles in flight: re-running the same command finds everything else in the cache. The commit
  step compacts the run's small files into ``part-*.parquet`` files of ``output.rows_per_file``.

The store is append-only and any file in it is valid, so concurrent runs may share a namespace;
a text cached twice is harmless (the join takes one vector).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config
from transforms.types import Chunk, EmbeddedBatch

TAG_MISSES = "misses"
SMALL_FILE_PREFIX = "run-"


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """Where one namespace of the cache lives; picklable, no secrets beyond storage options."""

    url: str  # the namespace folder
    storage_options: tuple[tuple[str, Any], ...]
    run_id: str
    model: str
    key: str  # the namespace description, as JSON

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(self.url, **dict(self.storage_options))
        return fs, root.rstrip("/")


def namespace_key(cfg: Config) -> dict[str, Any]:
    """What a cached vector depends on besides its text.

    The whole endpoint, not only its host: two Azure deployments, or a gateway routing paths to
    different models, share a host but not their vectors. ``parameters`` (envelope APIs) can
    change the vectors too.
    """
    p = cfg.provider
    endpoint = urlsplit(p.base_url)
    return {"kind": p.kind, "endpoint": f"{endpoint.netloc}{endpoint.path}".rstrip("/"),
            "model": p.model, "dimensions": p.dimensions, "normalize": p.normalize,
            "parameters": p.parameters}


def default_cache_root(output_path: str) -> str:
    """Beside the output: ``.../runs/2026-11-22`` → ``.../runs/.embedpipe-cache``."""
    parent = posixpath.dirname(output_path.rstrip("/")) or "."
    return f"{parent}/.embedpipe-cache"


def cache_spec(cfg: Config, run_id: str) -> CacheSpec | None:
    """The namespace of this config, or None with ``cache.enabled: false``."""
    if not cfg.cache.enabled:
        return None
    key = namespace_key(cfg)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = (cfg.cache.path or default_cache_root(cfg.output.path)).rstrip("/")
    return CacheSpec(url=f"{root}/{digest}", storage_options=tuple(
        sorted(cfg.output.storage_options.items())), run_id=run_id, model=cfg.provider.model,
        key=json.dumps(key, sort_keys=True))


# -- writing -----------------------------------------------------------------------------------


def cache_table(shas: list[str], vectors: np.ndarray) -> pa.Table:
    dim = vectors.shape[1]
    return pa.table({
        "content_sha256": pa.array(shas, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)), dim),
    })


def _write_table(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write under a temporary name and move into place: readers never see half a file."""
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.tmp"
    with fs.open(tmp, "wb") as handle:
        pq.write_table(table, handle, compression="zstd")
    fs.mv(tmp, path)


class CacheWriter:
    """Appends finished batches to the namespace, one small file per bundle (thread-safe)."""

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self._fs, self._root = spec.filesystem()
        self._fs.makedirs(self._root, exist_ok=True)
        key_file = f"{self._root}/namespace.json"
        if not self._fs.exists(key_file):
            with self._fs.open(key_file, "w") as handle:
                handle.write(spec.key + "\n")

    def write(self, batches: Iterable[EmbeddedBatch]) -> None:
        batches = [b for b in batches if len(b)]
        if not batches:
            return
        shas = [c.content_sha256 for b in batches for c in b.chunks]
        vectors = np.vstack([b.vectors for b in batches])
        name = f"{SMALL_FILE_PREFIX}{self.spec.run_id}-{uuid.uuid4().hex[:12]}.parquet"
        _write_table(self._fs, f"{self._root}/{name}", cache_table(shas, vectors))


def compact_run_files(spec: CacheSpec, rows_per_file: int) -> int:
    """Merge this run's per-bundle files into a few large ones; returns the rows compacted."""
    fs, root = spec.filesystem()
    small = sorted(fs.glob(f"{root}/{SMALL_FILE_PREFIX}{spec.run_id}-*.parquet"))
    if not small:
        return 0
    tables = []
    for path in small:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    merged = pa.concat_tables(tables)
    for i, start in enumerate(range(0, merged.num_rows, rows_per_file)):
        _write_table(fs, f"{root}/part-{spec.run_id}-{i:05d}.parquet",
                     merged.slice(start, rows_per_file))
    fs.rm(small)
    return merged.num_rows


# -- lookup ------------------------------------------------------------------------------------


def list_cache_files(spec: CacheSpec) -> list[str]:
    fs, root = spec.filesystem()
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(f"{root}/*.parquet"))


def read_cache_file(url: str, spec: CacheSpec) -> Iterator[tuple[str, np.ndarray]]:
    """The entries of one cache file; a file gone since the listing is simply empty.

    Another run sharing the namespace may compact (and delete) its small files between our
    listing and our read: their rows live on in that run's compacted files, so nothing is lost
    but a hit, which costs a request, never correctness.
    """
    try:
        with fsspec.open(url, "rb", **dict(spec.storage_options)) as handle:
            table = pq.read_table(handle)
    except FileNotFoundError:
        return
    if not table.num_rows:
        return
    column = table.column("embedding").combine_chunks()
    matrix = column.flatten().to_numpy().reshape(table.num_rows, column.type.list_size)
    yield from zip(table.column("content_sha256").to_pylist(), matrix)


def resolve_group(item: tuple[str, dict[str, Iterable[Any]]], model: str) -> Iterator[Any]:
    """One text: cached → a batch of all its chunks; not cached → one chunk with its twins."""
    _, group = item
    chunks = sorted(group["chunks"], key=lambda c: c.chunk_id)
    vector = next(iter(group["cached"]), None)
    if not chunks:
        pass  # cached text that this corpus no longer has
    elif vector is not None:
        yield EmbeddedBatch(chunks=tuple(chunks), model=model,
                            vectors=np.tile(vector, (len(chunks), 1)))
    else:
        yield beam.pvalue.TaggedOutput(TAG_MISSES, replace(chunks[0], twins=tuple(chunks[1:])))


class LookupCache(beam.PTransform):
    """``Chunk`` → ``{"hits": EmbeddedBatch, "misses": Chunk with twins}``."""

    def __init__(self, spec: CacheSpec) -> None:
        super().__init__()
        self.spec = spec

    def expand(self, chunks: beam.PCollection) -> dict[str, beam.PCollection]:
        spec = self.spec
        cached = (
            chunks.pipeline
            | "CacheNamespace" >> beam.Create([spec.url])
            | "ListCacheFiles" >> beam.FlatMap(lambda _: list_cache_files(spec))
            | "SpreadCacheFiles" >> beam.Reshuffle()
            | "ReadCacheFiles" >> beam.FlatMap(read_cache_file, spec)
        )
        keyed = chunks | "KeyByText" >> beam.Map(lambda c: (c.content_sha256, c))
        resolved = (
            {"chunks": keyed, "cached": cached}
            | "JoinCache" >> beam.CoGroupByKey()
            | "Resolve" >> beam.FlatMap(resolve_group, spec.model).with_outputs(
                TAG_MISSES, main="hits")
        )
        return {"hits": resolved.hits, "misses": resolved[TAG_MISSES]}


def _sum_rows(rows: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(sum(column) for column in zip(*rows, strict=True)) or (0, 0, 0, 0)


def count_cache_outcomes(cached: list[beam.PCollection], to_embed: beam.PCollection) -> beam.PCollection:
    """``(hits, misses, duplicates, tokens_saved)``: chunks served from the cache, texts sent,
    chunks that rode along with an identical text, and the tokens those two groups did not cost.
    """
    def sent(chunk: Chunk) -> tuple[int, ...]:
        return (0, 1, len(chunk.twins), sum(t.n_tokens for t in chunk.twins))

    def hit(batch: EmbeddedBatch) -> tuple[int, ...]:
        return (len(batch), 0, 0, sum(c.n_tokens for c in batch.chunks))

    rows = [to_embed | "CountSent" >> beam.Map(sent)]
    rows += [pcoll | "CountHits" >> beam.Map(hit) for pcoll in cached]
    return tuple(rows) | "FlattenCacheCounts" >> beam.Flatten() | "SumCacheCounts" >> (
        beam.CombineGlobally(_sum_rows))
