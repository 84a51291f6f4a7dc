"""The pipeline graph: wiring only. Each stage lives in its own module under ``transforms/``.

::

    ReadCorpus ─► ValidateDocuments ─► SplitChunks ─► PackBundles ─► EmbedBundles
        │               │                  │                          │ vectors ─► WriteVectors
        └── rejects ────┴──────────────────┴──────── rejects ─────────┤ usage ───► WriteUsage
                                                                      └ rejects ─► WriteRejects
    committed files + counts (side inputs) ─► CommitManifest (a singleton, runs last)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.pvalue import AsList, AsSingleton

from pipeline.config import Config
from transforms.bundle import BundleCaps, PackBundles
from transforms.cache import CacheSpec, LookupCache, cache_spec, compact_run_files
from transforms.embed import EmbedBundles, EmbedSettings
from transforms.limits import RateLimits
from transforms.manifest import RunInfo, build_manifest, manifest_url, write_json_atomically
from transforms.read import ReadCorpus
from transforms.retry import RetryPolicy
from transforms.split import SplitChunks
from transforms.types import Chunk, EmbeddedBatch, WrittenFile
from transforms.validate import ValidateDocuments
from transforms.write import (
    REJECTS,
    USAGE,
    VECTORS,
    OutputSpec,
    WriteShards,
    write_rows,
)


@dataclass(frozen=True, slots=True)
class RunContext:
    """What the launcher decided for this run, beyond the config."""

    run_id: str
    started_at: str
    workers: int  # worker processes sharing the rate budget
    progress_interval_s: float | None = 5.0  # None: no progress lines
    extra_files: tuple[WrittenFile, ...] = ()  # committed by the launcher (the preflight's usage)


def output_spec(cfg: Config, ctx: RunContext) -> OutputSpec:
    return OutputSpec(
        path=cfg.output.path,
        storage_options=tuple(sorted(cfg.output.storage_options.items())),
        run_id=ctx.run_id,
        rows_per_file=cfg.output.rows_per_file,
        include_text=cfg.output.include_text,
        metadata_fields=tuple(cfg.input.metadata_fields),
    )


def run_info(cfg: Config, ctx: RunContext) -> RunInfo:
    return RunInfo(
        run_id=ctx.run_id,
        started_at=ctx.started_at,
        output_path=cfg.output.path,
        storage_options=tuple(sorted(cfg.output.storage_options.items())),
        config=json.dumps(cfg.public_dict(), sort_keys=True),
        provider=cfg.provider.kind,
        model=cfg.provider.model,
        dimensions=cfg.provider.dimensions,
    )


def embed_settings(cfg: Config, ctx: RunContext, cache: CacheSpec | None = None) -> EmbedSettings:
    limits = RateLimits(cfg.limits.requests_per_minute, cfg.limits.tokens_per_minute)
    return EmbedSettings(
        run_id=ctx.run_id,
        provider=cfg.provider,
        limits=limits.share(ctx.workers),
        max_concurrency=cfg.limits.max_concurrency,
        retry=RetryPolicy(cfg.retry.max_attempts, cfg.retry.max_wait_s, cfg.retry.initial_wait_s),
        progress_interval_s=ctx.progress_interval_s,
        cache=cache,
    )


def bundle_caps(cfg: Config) -> BundleCaps:
    return BundleCaps(
        max_inputs=cfg.provider.max_inputs_per_request,
        max_tokens=cfg.provider.max_tokens_per_request,
        max_bytes=cfg.provider.max_bytes_per_request,
    )


class _CommitFn(beam.DoFn):
    """Writes the manifest once every shard is committed (side inputs are complete by then)."""

    def __init__(self, info: RunInfo, spec: OutputSpec, cache: CacheSpec | None) -> None:
        self.info = info
        self.spec = spec
        self.cache = cache

    def process(self, _: object, files, records_read, documents_valid, chunks, fatal,
                cache_counts):
        files = list(files)
        kinds = {f.kind for f in files}
        # Always leave a readable file per table, so `KIND/*.parquet` globs never come up empty.
        for kind in (REJECTS, USAGE):
            if kind.name not in kinds:
                files.append(write_rows(kind, [], self.spec, name="part-empty.parquet"))
        cache = None
        if self.cache is not None:
            compact_run_files(self.cache, self.spec.rows_per_file)
            cache = {"enabled": True, "path": self.cache.url,
                     **dict(zip(("hits", "misses", "duplicates", "tokens_saved"), cache_counts))}
        manifest = build_manifest(
            self.info, files, records_read=records_read, documents_valid=documents_valid,
            chunks=chunks, fatal=sorted(set(fatal)), cache=cache,
        )
        storage = dict(self.spec.storage_options)
        fs, root = self.spec.filesystem()
        if fs.exists(f"{root}/_temporary"):
            fs.rm(f"{root}/_temporary", recursive=True)
        write_json_atomically(manifest_url(self.spec.path), manifest, storage)
        yield manifest


def build_pipeline(p: beam.Pipeline, cfg: Config, ctx: RunContext) -> None:
    """Wire the whole job onto ``p``; no I/O happens here."""
    spec = output_spec(cfg, ctx)
    read = p | "ReadCorpus" >> ReadCorpus(cfg.input)
    valid = read["records"] | "ValidateDocuments" >> ValidateDocuments(cfg.validate_)
    split = valid["documents"] | "SplitChunks" >> SplitChunks(cfg.split)
    cache = cache_spec(cfg, ctx.run_id)
    if cache is not None:
        looked_up = split["chunks"] | "LookupCache" >> LookupCache(cache)
        cached, to_embed = [looked_up["hits"]], looked_up["misses"]
    else:
        cached, to_embed = [], split["chunks"]
    bundles = to_embed | "PackBundles" >> PackBundles(bundle_caps(cfg))
    embedded = bundles | "EmbedBundles" >> EmbedBundles(embed_settings(cfg, ctx, cache))
    vectors = (embedded["vectors"], *cached) | "CollectVectors" >> beam.Flatten()

    rejects = (
        read["rejects"], valid["rejects"], split["rejects"], embedded["rejects"]
    ) | "CollectRejects" >> beam.Flatten()
    files = (
        p | "LauncherFiles" >> beam.Create(list(ctx.extra_files)),
        vectors | "WriteVectors" >> WriteShards(VECTORS, spec),
        embedded["usage"] | "WriteUsage" >> WriteShards(USAGE, spec),
        rejects | "WriteRejects" >> WriteShards(REJECTS, spec),
    ) | "CollectFiles" >> beam.Flatten()

    def count(pcoll: beam.PCollection, label: str) -> AsSingleton:
        return AsSingleton(pcoll | label >> beam.combiners.Count.Globally())

    _ = (
        p
        | "StartCommit" >> beam.Create([None])
        | "CommitManifest" >> beam.ParDo(
            _CommitFn(run_info(cfg, ctx), spec, cache),
            files=AsList(files),
            records_read=count(read["records"], "CountRecords"),
            documents_valid=count(valid["documents"], "CountDocuments"),
            chunks=count(split["chunks"], "CountChunks"),
            fatal=AsList(embedded["fatal"]),
            cache_counts=AsSingleton(cache_counts(cached, to_embed)),
        )
    )


def _sum_rows(rows: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(sum(column) for column in zip(*rows, strict=True)) or (0, 0, 0, 0)


def cache_counts(cached: list[beam.PCollection], to_embed: beam.PCollection) -> beam.PCollection:
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
