"""Beam metrics in namespace ``embedpipe`` are readable from the pipeline result."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import apache_beam as beam

from pipeline.graph import RunContext, build_pipeline
from pipeline.local_server import EmbeddingServer
from pipeline.run import beam_options, pipeline_metrics
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.harness import MODEL, make_config, read_output


def test_metrics_match_the_written_output(tmp_path: Path) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    with EmbeddingServer(dim=16, model=MODEL) as server:
        cfg = make_config(corpus_patterns(root), str(tmp_path / "out"), server.base_url)
        pipeline = beam.Pipeline(options=beam_options([]))
        build_pipeline(pipeline, cfg, RunContext("metrics-run", "2026-01-01T00:00:00Z", 1, None))
        result = pipeline.run()
        result.wait_until_finish()
    metrics = pipeline_metrics(result)
    manifest, t = read_output(str(tmp_path / "out"))
    usage = t["usage"].to_pylist()
    assert metrics["requests"] == len(usage) == manifest["counts"]["requests"]
    assert metrics["prompt_tokens"] == manifest["usage"]["prompt_tokens"]
    assert metrics["chunks"] == manifest["counts"]["chunks"]
    assert metrics["chunks_embedded"] == manifest["counts"]["chunks_embedded"]
    assert metrics["records_read"] == manifest["counts"]["documents_read"] - sum(
        1 for r in t["rejects"].to_pylist() if r["stage"] == "read")
    reasons = Counter(expected.rejects.values())
    assert {k.removeprefix("rejects."): v for k, v in metrics.items()
            if k.startswith("rejects.")} == dict(reasons)
    latency = metrics["request_latency_ms"]
    assert latency["count"] == len(usage) and latency["max"] >= latency["mean"] >= 0
