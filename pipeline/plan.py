"""``embedpipe plan``: what a run would do and cost, without a single API call.

Runs the read, validate, split and pack stages exactly as ``run`` does (the same transforms, so
the same documents, chunks and requests), then prints the documents, rejects by reason, chunks,
tokens, requests, the estimated cost (``provider.price_per_million_tokens``) and the ideal wall
time at the configured limits: ``max(tokens / TPM, requests / RPM)``. The token count is the
splitter's tokenizer's, which for OpenAI models is what the API bills.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.pvalue import AsList, AsSingleton

from pipeline.config import Config
from pipeline.graph import batch_caps, chunk_stage, validate_stage
from transforms import tags
from transforms.manifest import document_counts
from transforms.pack import PackRequests
from transforms.read import ReadCorpus
from transforms.types import DUPLICATE_ID, STAGE_READ, STAGE_VALIDATE, Document
from transforms.validate import pick_winner


class _DropLosersFn(beam.DoFn):
    def start_bundle(self) -> None:
        self._losers: set[tuple[str, str]] | None = None

    def process(self, doc: Document, losers: list) -> Iterator[Document]:
        if self._losers is None:
            self._losers = set(losers)
        if (doc.doc_id, doc.source) not in self._losers:
            yield doc


class _SummarizeFn(beam.DoFn):
    def __init__(self, path: str) -> None:
        self.path = path

    def process(self, _: object, records: int, documents: int, reasons: list,
                bundle_stats: list, duplicates: int) -> None:
        by_reason = Counter(dict(reasons))
        if duplicates:
            by_reason[(STAGE_VALIDATE, DUPLICATE_ID)] += duplicates
        read_rejects = sum(n for (stage, _), n in by_reason.items() if stage == STAGE_READ)
        rejects_by_reason: Counter[str] = Counter()
        for (_, reason), n in by_reason.items():
            rejects_by_reason[reason] += n
        summary = {
            # Counted as the run's manifest counts them: one definition, one count.
            **document_counts(records, rejects_by_reason, read_rejects, chunk_rejects=0),
            "documents_valid": documents - duplicates,
            "rejects_by_reason": dict(sorted(rejects_by_reason.items())),
            "chunks": sum(s[0] for s in bundle_stats),
            "tokens": sum(s[1] for s in bundle_stats),
            "images": sum(s[2] for s in bundle_stats),
            "image_tokens": sum(s[3] for s in bundle_stats),
            "requests": len(bundle_stats),
        }
        with open(self.path, "w", encoding="utf-8") as handle:
            json.dump(summary, handle)


def build_plan_pipeline(p: beam.Pipeline, cfg: Config, summary_path: str) -> None:
    read = p | "ReadCorpus" >> ReadCorpus(cfg.input, range_bytes=cfg.input.range_bytes)
    valid = read[tags.RECORDS] | "ValidateDocuments" >> validate_stage(cfg)
    # Every version of an id but the earliest is a duplicate_id reject in the run, settled at
    # its commit; here the losers are found first (from ids alone) and left out of the figures.
    losers = (
        valid[tags.IDS]
        | "KeyIds" >> beam.FlatMap(lambda batch: [(i.doc_id, i) for i in batch.ids])
        | "GroupIds" >> beam.GroupByKey()
        | "Losers" >> beam.FlatMap(lambda kv: [(r.doc_id, r.source)
                                               for r in pick_winner(kv[1])[1]])
    )
    winners = valid[tags.DOCUMENTS] | "DropLosers" >> beam.ParDo(_DropLosersFn(),
                                                              losers=AsList(losers))
    split = winners | "SplitChunks" >> chunk_stage(cfg)  # CheckImages in a multimodal run
    batches = split[tags.CHUNKS] | "PackRequests" >> PackRequests(batch_caps(cfg))
    reasons = (
        (read[tags.REJECTS], valid[tags.REJECTS], split[tags.REJECTS])
        | "CollectRejects" >> beam.Flatten()
        | "Reasons" >> beam.Map(lambda r: (r.stage, r.reason))
        | "CountReasons" >> beam.combiners.Count.PerElement()
    )
    # (chunks, tokens, images, image tokens) per request; images only in a multimodal run,
    # their tokens estimated from their headers (transforms.images.image_tokens).
    stats = batches | "BatchSizes" >> beam.Map(lambda b: (
        len(b), b.n_tokens, sum(1 for c in b.chunks if c.image is not None),
        sum(c.image.est_tokens for c in b.chunks if c.image is not None)))
    def count(pcoll: beam.PCollection, label: str) -> AsSingleton:
        return AsSingleton(pcoll | label >> beam.combiners.Count.Globally())

    _ = (
        p
        | "Start" >> beam.Create([None])
        | "Summarize" >> beam.ParDo(
            _SummarizeFn(summary_path),
            records=count(read[tags.RECORDS], "CountRecords"),
            documents=count(valid[tags.DOCUMENTS], "CountDocuments"),
            reasons=AsList(reasons),
            bundle_stats=AsList(stats),
            duplicates=count(losers, "CountDuplicates"),
        )
    )


def make_plan(cfg: Config, beam_args: list[str]) -> dict[str, Any]:
    """Run the planning pipeline and return its figures (plus cost and ideal time)."""
    from pipeline.checks import check_filesystems, input_locations
    from pipeline.run import beam_options

    check_filesystems(input_locations(cfg))  # s3:// without s3fs: exit 2 naming the extra
    handle, path = tempfile.mkstemp(prefix="embedpipe-plan-", suffix=".json")
    os.close(handle)
    t0 = time.monotonic()
    try:
        with beam.Pipeline(options=beam_options(beam_args)) as p:
            build_plan_pipeline(p, cfg, path)
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
    finally:
        os.unlink(path)
    tokens, requests = plan["tokens"], plan["requests"]
    limits = cfg.limits
    price = cfg.provider.price_per_million_tokens
    discount = getattr(cfg.provider, "batch_discount", 0.5)  # kind openai's key
    plan.update(
        provider=cfg.provider.kind,
        model=cfg.provider.model,
        tokenizer=cfg.split.tokenizer,
        estimated_cost=None if price is None else tokens / 1e6 * price,
        price_per_million_tokens=price,
        mode=cfg.provider.mode,
        # Batch mode: the same tokens at the discount, in batches of batch_max_inputs inputs.
        estimated_batch_cost=(None if price is None
                              else tokens / 1e6 * price * discount),
        batch_discount=discount,
        batches=-(-plan["chunks"] // getattr(cfg.provider, "batch_max_inputs", 50_000)),
        ideal_wall_s=round(60.0 * max(tokens / limits.tokens_per_minute,
                                      requests / limits.requests_per_minute), 3),
        planning_s=round(time.monotonic() - t0, 3),
    )
    return plan


def plan_lines(plan: dict[str, Any]) -> list[str]:
    cost = (f"${plan['estimated_cost']:.4f} at ${plan['price_per_million_tokens']}/M tokens"
            if plan["estimated_cost"] is not None
            else "unknown (set provider.price_per_million_tokens)")
    if plan["estimated_batch_cost"] is not None:
        cost += (f" online; ${plan['estimated_batch_cost']:.4f} in batch mode "
                 f"({plan['batch_discount']}x the price)")
    reasons = ", ".join(f"{k}={v}" for k, v in plan["rejects_by_reason"].items()) or "none"
    return [
        f"plan for {plan['provider']} {plan['model']} (tokens by {plan['tokenizer']}):",
        (f"  documents  {plan['documents_read']} read, {plan['documents_valid']} valid, "
         f"{plan['documents_rejected']} rejected; {plan['files_failed']} file(s) failed"),
        f"  rejects    {reasons}",
        f"  chunks     {plan['chunks']}",
        f"  tokens     {plan['tokens']}"
        + (f" ({plan['image_tokens']} of them for {plan['images']} image(s), estimated)"
           if plan.get("images") else ""),
        f"  requests   {plan['requests']}",
        f"  cost       {cost}",
        (f"  ideal time {plan['ideal_wall_s']:.1f}s at the configured limits"
         if plan["mode"] == "online" else
         f"  batches    {plan['batches']} (mode: batch), answered within the completion window"),
    ]
