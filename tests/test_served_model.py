"""The model the server says it served, recorded and checked against ``provider.model``.

A server that serves one model answers any ``model`` name (infinity, TEI, many gateways): a
config naming the wrong model still gets vectors, from another model. embedpipe records the
model each answer names (``usage.served_model``, the manifest's ``served_model``) and warns once
per worker session when it is not the configured one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.local_server import EmbeddingServer, Reply
from pipeline.run import RunRequest, execute
from tests.support.checks import assert_run_complete
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.fixtures import Serve
from tests.support.harness import MODEL, make_config
from transforms.manifest import build_manifest
from transforms.providers.openai import OpenAIConfig, OpenAIProvider
from transforms.write import USAGE_SCHEMA

SERVED = "sentence-transformers/all-MiniLM-L6-v2"


class OneModelServer(EmbeddingServer):
    """Serves its one model whatever ``model`` the request names, and says which (infinity)."""

    def handle_embeddings(self, payload: dict[str, Any], headers) -> Reply:
        reply = super().handle_embeddings({**payload, "model": self.model}, headers)
        return reply


def run(tmp_path: Path, serve: Serve, *, served: str, configured: str,
        caplog: pytest.LogCaptureFixture):
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    output = str(tmp_path / "out")
    server = serve(OneModelServer, dim=32, model=served)
    cfg = make_config(corpus_patterns(root), output, server.base_url,
                      provider={"model": configured})
    with caplog.at_level(logging.WARNING):
        assert execute(RunRequest(cfg, quiet=True)) == 0
    return assert_run_complete(output, expected, dim=32)


def served_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "provider.model" in r.getMessage()
            and "answered with model" in r.getMessage()]


def test_another_served_model_is_recorded_and_warned_once(tmp_path: Path, serve: Serve,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    run_ = run(tmp_path, serve, served=SERVED, configured="text-embedding-3-small", caplog=caplog)
    usage = run_.tables["usage"].to_pylist()
    assert len(usage) > 5
    assert {u["model"] for u in usage} == {"text-embedding-3-small"}  # the configured model
    assert {u["served_model"] for u in usage} == {SERVED}
    assert run_.manifest["model"] == "text-embedding-3-small"
    assert run_.manifest["served_model"] == SERVED
    warnings = served_warnings(caplog)
    # Once per session: the preflight's (in the launcher) and the worker's; never per request.
    assert 1 <= len(warnings) <= 2, warnings
    assert SERVED in warnings[0] and "'text-embedding-3-small'" in warnings[0]


def test_the_configured_model_served_is_not_warned(tmp_path: Path, serve: Serve,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    run_ = run(tmp_path, serve, served=MODEL, configured=MODEL, caplog=caplog)
    assert {u["served_model"] for u in run_.tables["usage"].to_pylist()} == {MODEL}
    assert run_.manifest["served_model"] == MODEL
    assert served_warnings(caplog) == []


def test_an_answer_without_a_model_records_none() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"index": 0, "embedding": [1.0, 0.0]}]})

    provider = OpenAIProvider(OpenAIConfig(api_key_env=None))
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        result = provider.embed(client, ["a"], None, 1)
    assert result.served_model is None


def test_the_usage_schema_extends_the_contract_at_its_end() -> None:
    # served_model came after the contract's columns; batch mode's two (issue 13) after it.
    assert USAGE_SCHEMA.names[-3:] == ["served_model", "mode", "batch_id"]
    assert USAGE_SCHEMA.names[:3] == ["request_id", "provider_request_id", "model"]


def test_the_manifest_lists_several_served_models() -> None:
    from transforms.manifest import RunInfo
    from transforms.types import WrittenFile

    info = RunInfo("r", "t", "o", (), "{}", "openai", "m", None)
    files = [WrittenFile("usage", "a", 3, (("served_model:x", 2), ("served_model:y", 1))),
             WrittenFile("usage", "b", 1, ())]
    manifest = build_manifest(info, files, records_read=0, documents_valid=0, chunks=0, fatal=[])
    assert manifest["served_model"] == ["x", "y"]
    manifest = build_manifest(info, files[1:], records_read=0, documents_valid=0, chunks=0,
                              fatal=[])
    assert manifest["served_model"] is None
