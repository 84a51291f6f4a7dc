"""``embedpipe plan``: no requests, and the same chunks and tokens as the real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.local_server import EmbeddingServer
from pipeline.run import RunRequest, execute
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.harness import MODEL, make_config, read_output


def test_plan_matches_the_run_and_sends_nothing(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    with EmbeddingServer(dim=16, model=MODEL) as server:
        cfg = make_config(corpus_patterns(root), str(tmp_path / "out"), server.base_url,
                          provider={"price_per_million_tokens": 0.02})
        config = tmp_path / "config.json"
        config.write_text(json.dumps(cfg.model_dump(by_alias=True, mode="json")))
        assert main(["plan", "--config", str(config), "--json"]) == 0
        assert server.stats.requests == 0
        plan = json.loads(capsys.readouterr().out)
        assert execute(RunRequest(cfg, quiet=True)) == 0
    manifest, t = read_output(str(tmp_path / "out"))
    assert plan["documents_read"] == manifest["counts"]["documents_read"] == expected.records
    assert plan["documents_valid"] == len(expected.documents)
    assert plan["chunks"] == t["vectors"].num_rows
    assert plan["tokens"] == sum(t["vectors"].column("n_tokens").to_pylist())
    assert sum(plan["rejects_by_reason"].values()) == len(expected.rejects)
    assert plan["estimated_cost"] == pytest.approx(plan["tokens"] / 1e6 * 0.02)
    ok_requests = [u for u in t["usage"].to_pylist() if u["outcome"] == "ok"]
    assert plan["requests"] == len(ok_requests) - 1  # the run's preflight is not in the plan
    assert plan["ideal_wall_s"] > 0
