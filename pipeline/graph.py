"""The pipeline graph: wiring only. Each stage lives in its own module under ``transforms/``.

::

    ReadCorpus ─► ValidateDocuments ─► SplitChunks ─► EmbedChunks ─┬ vectors ─► WriteVectors
        │               │  └ ids ─► WriteIds  │                    ├ usage ───► WriteUsage
        └ rejects ►     └ rejects ►           └ rejects ►          └ rejects ─► WriteEmbedRejects
    committed files + counts (side inputs) ─► CommitManifest (a singleton, runs last)

A multimodal run (``provider.multimodal``) has CheckImages in place of SplitChunks: one chunk
per record, its image checked (:mod:`transforms.images`).

The rule that keeps memory flat and the first request seconds away: from reading to writing,
nothing crosses a barrier. There is no GroupByKey, no side input and no Flatten on that path
(each is a point where the in-process runner holds a whole PCollection in memory), so the
runner fuses it into one stage that streams: each writer reads straight from the stage that
makes its rows. What is global is small and goes only to the commit step: the list of files
written, counts and checksums (combined where they are made), and the ids of the documents.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import apache_beam as beam
from apache_beam.pvalue import AsList, AsSingleton

from pipeline.config import Config, EnvelopeConfig
from transforms import tags
from transforms.cache import CacheSpec, default_cache_root
from transforms.embed import EmbedChunks, EmbedSettings
from transforms.images import CheckImages, ImageLoader
from transforms.limits import RateLimits
from transforms.manifest import CommitManifestFn, RunInfo
from transforms.pack import BatchCaps
from transforms.providers import get_provider_class
from transforms.read import ReadCorpus
from transforms.retry import RetryPolicy
from transforms.split import SplitChunks
from transforms.types import FINGERPRINT_MODULUS, WrittenFile
from transforms.validate import ValidateDocuments
from transforms.write import IDS, REJECTS, USAGE, VECTORS, OutputSpec, WriteShards


@dataclass(frozen=True, slots=True)
class RunContext:
    """What the launcher decided for this run, beyond the config."""

    run_id: str
    started_at: str
    workers: int  # worker processes sharing the rate budget
    progress_interval_s: float | None = 5.0  # None: no progress lines
    extra_files: tuple[WrittenFile, ...] = ()  # committed by the launcher (the preflight's usage)
    served_dim: int | None = None  # the dimension the preflight's answer had
    leased: bool = False  # the launcher holds the output's lease; the commit step checks it


def namespace_key(cfg: Config, served_dim: int | None = None) -> dict[str, Any]:
    """What a cached vector depends on besides its text.

    With ``provider.dimensions`` unset, the dimension the server was seen to serve is part of
    the key (``served_dimensions``): a server restarted with another model under the same name
    gets a namespace of its own instead of mixing dimensions into the old one. Configs that set
    ``dimensions`` keep their digest.

    The whole endpoint, not only its host: two Azure deployments, or a gateway routing paths to
    different models, share a host but not their vectors. ``normalize`` and ``parameters``
    (envelope APIs) change the vectors too. A kind without ``parameters`` keys it as its old
    default ({}), and a config that does not set ``normalize`` as false (its default), so
    namespaces keep the digests they had when every kind had every key.
    """
    p = cfg.provider
    endpoint = urlsplit(p.base_url)
    host = endpoint.netloc.rsplit("@", 1)[-1]  # never the user and password of the URL
    key = {"kind": p.kind, "endpoint": f"{host}{endpoint.path}".rstrip("/"),
           "model": p.model, "dimensions": p.dimensions, "normalize": p.normalize,
           "parameters": p.parameters if isinstance(p, EnvelopeConfig) else {}}
    if getattr(p, "multimodal", False):  # only then: text configs keep their digests
        key.update(multimodal=True, sparse=getattr(p, "sparse", False))
    if p.dimensions is None and served_dim is not None:
        key["served_dimensions"] = served_dim
    return key


def cache_spec(cfg: Config, run_id: str, served_dim: int | None = None) -> CacheSpec | None:
    """The namespace of this config, or None with ``cache.enabled: false``."""
    if not cfg.cache.enabled:
        return None
    key = namespace_key(cfg, served_dim)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = (cfg.cache.path or default_cache_root(cfg.output.path)).rstrip("/")
    return CacheSpec(url=f"{root}/{digest}", storage_options=tuple(
        sorted(cfg.output.storage_options.items())), run_id=run_id, model=cfg.provider.model,
        key=json.dumps(key, sort_keys=True), dim=cfg.provider.dimensions or served_dim,
        sparse=bool(getattr(cfg.provider, "sparse", False)))


def output_spec(cfg: Config, ctx: RunContext) -> OutputSpec:
    return OutputSpec(
        path=cfg.output.path,
        storage_options=tuple(sorted(cfg.output.storage_options.items())),
        run_id=ctx.run_id,
        rows_per_file=cfg.output.rows_per_file,
        include_text=cfg.output.include_text,
        metadata_fields=tuple(cfg.input.metadata_fields),
        multimodal=is_multimodal(cfg),
        sparse=getattr(cfg.provider, "sparse", False),
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
        leased=ctx.leased,
    )


def embed_settings(cfg: Config, ctx: RunContext, cache: CacheSpec | None = None,
                   output: OutputSpec | None = None) -> EmbedSettings:
    """The embed stage's settings; with ``output``, the stage watches that the output store can
    still be written (the preflight, which writes nothing, passes none)."""
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
        served_dim=ctx.served_dim,
        output=(output.path, output.storage_options, output.run_id) if output else None,
        batch_key=batch_key(cfg, ctx.served_dim) if cfg.provider.mode == "batch" else None,
        images=image_loader(cfg) if is_multimodal(cfg) else None,
    )


def batch_key(cfg: Config, served_dim: int | None = None) -> str:
    """What batch mode's ``metadata`` names a batch by: this output and these vectors.

    A re-run of the same command finds its batches by it; a run into another output, or with
    another model or dimension, never takes a batch that is not its own.
    """
    key = {"output": cfg.output.path.rstrip("/"), "namespace": namespace_key(cfg, served_dim)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def batch_caps(cfg: Config) -> BatchCaps:
    """The request caps; one record a request in a multimodal run (the API fuses a request)."""
    return BatchCaps(
        max_inputs=1 if is_multimodal(cfg) else cfg.provider.max_inputs_per_request,
        max_tokens=cfg.provider.max_tokens_per_request,
        max_bytes=cfg.provider.max_bytes_per_request,
    )


def is_multimodal(cfg: Config) -> bool:
    return bool(getattr(cfg.provider, "multimodal", False))


def image_loader(cfg: Config) -> ImageLoader:
    return ImageLoader(storage_options=tuple(sorted(cfg.input.storage_options.items())))


def chunk_stage(cfg: Config) -> beam.PTransform:
    """Documents → chunks: the splitter, or in a multimodal run the image stage (one chunk a
    record, its image checked; see :mod:`transforms.images`)."""
    if not is_multimodal(cfg):
        return SplitChunks(cfg.split)
    limit = (cfg.provider.max_input_tokens
             or get_provider_class(cfg.provider.kind).default_max_input_tokens
             or cfg.split.max_tokens)
    return CheckImages(cfg.split.tokenizer, limit, image_loader(cfg))


def validate_stage(cfg: Config) -> ValidateDocuments:
    return ValidateDocuments(cfg.validate_, images=is_multimodal(cfg))


def _sum_columns(rows: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(sum(column) for column in zip(*rows, strict=True))


def _chunk_totals(rows: Iterable[tuple[int, int]]) -> tuple[int, int]:
    count, checksum = _sum_columns(rows) or (0, 0)
    return (count, checksum % FINGERPRINT_MODULUS)


def build_pipeline(p: beam.Pipeline, cfg: Config, ctx: RunContext) -> None:
    """Wire the whole job onto ``p``; no I/O happens here."""
    spec = output_spec(cfg, ctx)
    cache = cache_spec(cfg, ctx.run_id, ctx.served_dim)
    read = p | "ReadCorpus" >> ReadCorpus(cfg.input, range_bytes=cfg.input.range_bytes)
    valid = read[tags.RECORDS] | "ValidateDocuments" >> validate_stage(cfg)
    split = valid[tags.DOCUMENTS] | (
        "CheckImages" if is_multimodal(cfg) else "SplitChunks") >> chunk_stage(cfg)
    embedded = split[tags.CHUNKS] | "EmbedChunks" >> EmbedChunks(
        embed_settings(cfg, ctx, cache, spec), batch_caps(cfg))

    written = [
        p | "LauncherFiles" >> beam.Create(list(ctx.extra_files)),
        embedded[tags.VECTORS] | "WriteVectors" >> WriteShards(VECTORS, spec),
        embedded[tags.USAGE] | "WriteUsage" >> WriteShards(USAGE, spec),
        valid[tags.IDS] | "WriteIds" >> WriteShards(IDS, spec),
    ]
    for name, stage in (("Read", read), ("Validate", valid), ("Split", split),
                        ("Embed", embedded)):
        written.append(stage[tags.REJECTS] | f"Write{name}Rejects" >> WriteShards(REJECTS, spec))
    files = tuple(written) | "CollectFiles" >> beam.Flatten()

    def count(pcoll: beam.PCollection, label: str) -> AsSingleton:
        return AsSingleton(pcoll | label >> beam.combiners.Count.Globally())

    chunks = split[tags.TOTALS] | "CountChunks" >> beam.CombineGlobally(_chunk_totals)
    cache_counts = embedded[tags.CACHE] | "SumCacheCounts" >> beam.CombineGlobally(
        lambda rows: _sum_columns(rows) or (0, 0, 0, 0))
    _ = (
        p
        | "StartCommit" >> beam.Create([None])
        | "CommitManifest" >> beam.ParDo(
            CommitManifestFn(run_info(cfg, ctx), spec, cache),
            files=AsList(files),
            records_read=count(read[tags.RECORDS], "CountRecords"),
            documents_valid=count(valid[tags.DOCUMENTS], "CountDocuments"),
            chunks=AsSingleton(chunks),
            fatal=AsList(embedded[tags.FATAL]),
            cache_counts=AsSingleton(cache_counts),
        )
    )
