"""The OpenAI-compatible family end to end: TEI batch caps, vLLM and HTML errors, no-usage servers.

Each server is the embedded OpenAI-dialect server with one behaviour of a real implementation
grafted on, on loopback; each run goes through the whole pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.local_server import ApiError, EmbeddingServer, HashingEmbedder, Reply
from pipeline.run import RunRequest, execute
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.fixtures import Serve
from tests.support.harness import MODEL, expected_chunks, make_config, read_output


class TeiServer(EmbeddingServer):
    """text-embeddings-inference with ``--max-client-batch-size 8``: larger requests get a 413."""

    MAX_BATCH = 8

    def handle_embeddings(self, payload: dict[str, Any], headers) -> Reply:
        n = len(payload.get("input") or [])
        if n > self.MAX_BATCH:
            message = f"batch size {n} > maximum allowed batch size {self.MAX_BATCH}"
            return Reply(413, {"error": message, "error_type": "Validation"})
        return super().handle_embeddings(payload, headers)


def run(tmp_path: Path, server: EmbeddingServer, **sections: dict) -> tuple[int, dict, Any]:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    output = str(tmp_path / "out")
    cfg = make_config(corpus_patterns(root), output, server.base_url, **sections)
    code = execute(RunRequest(cfg, quiet=True))
    manifest, tables = read_output(output)
    return code, manifest, (tables, expected)


def test_tei_batch_cap_is_learned_and_the_run_succeeds(tmp_path: Path) -> None:
    with TeiServer(dim=32, model=MODEL) as server:
        code, manifest, (t, expected) = run(
            tmp_path, server, provider={"max_inputs_per_request": 64, "max_tokens_per_request": 50_000}
        )
    assert code == 0
    assert manifest["counts"]["chunks_embedded"] == len(expected_chunks(expected.documents))
    usage = t["usage"].to_pylist()
    too_large = [u for u in usage if u["http_status"] == 413]
    assert 1 <= len(too_large) <= 2  # learned once (per request batch in flight), not per request
    assert all(u["n_inputs"] <= TeiServer.MAX_BATCH for u in usage if u["outcome"] == "ok")


class VllmServer(EmbeddingServer):
    """vLLM's error shape (integer ``code``) for poisoned inputs (the base's :attr:`poison`, as
    an over-long input would be); no usage block."""

    def poison_reply(self, index: int, marker: str) -> Reply:
        return Reply(400, {"object": "error", "message": "This model's maximum context "
                           "length is 512 tokens", "type": "BadRequestError",
                           "param": None, "code": 400})

    def handle_embeddings(self, payload: dict[str, Any], headers) -> Reply:
        reply = super().handle_embeddings(payload, headers)
        if reply.status != 200:
            return reply
        body = {k: v for k, v in reply.body.items() if k != "usage"}
        return Reply(reply.status, body, reply.headers)


def test_vllm_poison_input_is_isolated_and_missing_usage_is_estimated(tmp_path: Path,
                                                                     serve: Serve) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    with open(f"{root}/docs.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "poisoned", "text": "a POISON pill in a short document"}\n')
    output = str(tmp_path / "out")
    server = serve(VllmServer, dim=32, model=MODEL, poison="POISON")
    cfg = make_config(corpus_patterns(root), output, server.base_url,
                      output={"include_text": True})
    code = execute(RunRequest(cfg, quiet=True))
    requests = server.stats.requests
    server.stop()
    manifest, t = read_output(output)
    assert code == 1
    rejects = [r for r in t["rejects"].to_pylist() if r["stage"] == "embed"]
    assert [(r["id"], r["reason"]) for r in rejects] == [("poisoned#0", "provider_rejected")]
    assert "maximum context length" in rejects[0]["detail"]
    ids = set(t["vectors"].column("id").to_pylist())
    assert ids == set(expected_chunks(expected.documents))  # every sibling embedded
    ok = [u for u in t["usage"].to_pylist() if u["outcome"] == "ok"]
    assert all(u["tokens_estimated"] for u in ok)
    # Estimated from the local count of each distinct text sent, + the preflight's 2 tokens.
    per_text = dict(zip(t["vectors"].column("content_sha256").to_pylist(),
                        t["vectors"].column("n_tokens").to_pylist(), strict=True))
    assert sum(u["prompt_tokens"] for u in ok) == sum(per_text.values()) + 2
    assert manifest["counts"]["requests"] == requests
    # Bisection: about log2(8) extra requests for the one poison chunk, not one per sibling.
    failed = [u for u in t["usage"].to_pylist() if u["http_status"] == 400]
    assert 1 <= len(failed) <= 4


def html_outage() -> Reply:
    """What a proxy in front of the API answers during an outage: an HTML 503 page."""
    return Reply(503, b"<html><body><h1>503 Service Temporarily Unavailable</h1>"
                      b"<hr><center>nginx</center></body></html>",
                 {"content-type": "text/html"})


def test_html_error_pages_are_retried(tmp_path: Path, serve: Serve) -> None:
    server = serve(EmbeddingServer, dim=32, model=MODEL)
    server.schedule(html_outage, html_outage)  # the first two embedding requests
    code, _manifest, (t, _expected) = run(tmp_path, server, output={"include_text": True})
    server.stop()
    assert code == 0
    errors = [u["error"] for u in t["usage"].to_pylist() if u["http_status"] == 503]
    assert len(errors) == 2
    assert all("503 Service Temporarily Unavailable" in e and "<h1>" not in e for e in errors)
    texts = t["vectors"].column("text").to_pylist()
    got = np.asarray(t["vectors"].column("embedding").combine_chunks().flatten()).reshape(len(texts), -1)
    np.testing.assert_allclose(got, HashingEmbedder(dim=32).embed(texts), atol=1e-6)


class AzureServer(EmbeddingServer):
    """Azure OpenAI: the deployment in the path, ``api-key`` header, ``api-version`` required."""

    DEPLOYMENT = "embed-small"
    KEY = "azure-key-0123456789abcdef"

    def authorize(self, method: str, path: str, headers) -> None:
        if headers.get("api-key") != self.KEY or "authorization" in headers:
            raise ApiError(401, "Access denied due to invalid subscription key.", code="401")

    def route(self, method: str, path: str, payload: Any, headers) -> Reply:
        if path != f"/openai/deployments/{self.DEPLOYMENT}/embeddings":
            raise ApiError(404, "The API deployment for this resource does not exist.",
                           code="DeploymentNotFound")
        if self.request_query().get("api-version") != "2024-10-21":
            raise ApiError(400, "Missing or unsupported api-version", code="BadRequest")
        return self.handle_embeddings(payload, headers)


def test_azure_deployment_path_api_key_and_version(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", AzureServer.KEY)
    with AzureServer(dim=32, model=MODEL) as server:
        base = server.base_url.removesuffix("/v1")
        azure = {"base_url": f"{base}/openai/deployments/{AzureServer.DEPLOYMENT}",
                 "api_key_env": "AZURE_OPENAI_API_KEY", "auth_header": "api-key",
                 "auth_scheme": None, "api_version": "2024-10-21"}
        code, manifest, (_t, expected) = run(tmp_path, server, provider=azure)
        assert code == 0
        assert manifest["counts"]["chunks_embedded"] == len(expected_chunks(expected.documents))
        assert manifest["config"]["provider"]["api_key_env"] == "AZURE_OPENAI_API_KEY"
        assert AzureServer.KEY not in json.dumps(manifest)
        # Without the api-version the same deployment refuses: the preflight stops the run.
        broken = {**azure, "api_version": None}
        code, manifest, _ = run(tmp_path / "again", server, provider=broken)
        assert code == 3 and manifest["status"] == "aborted"
