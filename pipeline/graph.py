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
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.pvalue import AsList, AsSingleton

from pipeline.config import Config
from transforms.bundle import BundleCaps, PackBundles
from transforms.cache import CacheSpec, LookupCache, cache_spec, count_cache_outcomes
from transforms.embed import EmbedBundles, EmbedSettings
from transforms.limits import RateLimits
from transforms.manifest import CommitManifestFn, RunInfo
from transforms.read import ReadCorpus
from transforms.retry import RetryPolicy
from transforms.split import SplitChunks
from transforms.types import WrittenFile
from transforms.validate import ValidateDocuments
from transforms.write import REJECTS, USAGE, VECTORS, OutputSpec, WriteShards


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
        workers=ctx.workers,
    )


def bundle_caps(cfg: Config) -> BundleCaps:
    return BundleCaps(
        max_inputs=cfg.provider.max_inputs_per_request,
        max_tokens=cfg.provider.max_tokens_per_request,
        max_bytes=cfg.provider.max_bytes_per_request,
    )


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
            CommitManifestFn(run_info(cfg, ctx), spec, cache),
            files=AsList(files),
            records_read=count(read["records"], "CountRecords"),
            documents_valid=count(valid["documents"], "CountDocuments"),
            chunks=count(split["chunks"], "CountChunks"),
            fatal=AsList(embedded["fatal"]),
            cache_counts=AsSingleton(count_cache_outcomes(cached, to_embed)),
        )
    )
