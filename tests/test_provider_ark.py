"""The Ark provider: its error table, client-side dimension reduction, config checks, and whole
runs against :class:`tests.support.ark_server.ArkServer`, one per behaviour a documented code must cause.

End-to-end tests run the real pipeline (``pipeline.run.execute``) and check the committed output
against an oracle computed here, from :class:`~pipeline.local_model.HashingEmbedder` alone: the
native vector of each chunk's text, cut to ``dimensions`` and L2-normalised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import httpx
import numpy as np
import pytest
import yaml

from pipeline.config import ArkConfig, parse_config
from pipeline.local_server import HashingEmbedder
from pipeline.run import RunRequest, execute
from tests.support.ark_server import ArkServer, Fault, ark_error
from tests.support.corpus import corpus_patterns, long_text, write_corpus
from tests.support.harness import expected_chunks, make_config, read_output
from transforms.errors import (
    ConfigError,
    FatalProviderError,
    InputRejectedError,
    RateLimitedError,
    RetryableError,
)
from transforms.providers.ark import ArkProvider

ENDPOINT = "ep-20250101000000-embedpipe"  # an endpoint id: Ark cannot tell us its model
NATIVE = 64
DIMENSIONS = 24
MODELS = {ENDPOINT: NATIVE}
KEY_ENV = "EMBEDPIPE_TEST_ARK_KEY"
KEY = "ark-0123456789abcdef-test-key"


def oracle(texts: list[str], native: int = NATIVE, dimensions: int = DIMENSIONS) -> np.ndarray:
    """Ark's documented reduction, computed independently of the provider's code."""
    prefix = HashingEmbedder(native).embed(texts)[:, :dimensions].astype(np.float64)
    return prefix / np.linalg.norm(prefix, axis=1, keepdims=True)


def provider(**fields: Any) -> ArkProvider:
    return ArkProvider(ArkConfig(kind="ark", model=ENDPOINT, **fields))


# -- the error table --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (429, "RateLimitExceeded.EndpointRPMExceeded", RateLimitedError),
        (429, "RateLimitExceeded.EndpointTPMExceeded", RateLimitedError),
        (429, "ModelAccountRpmRateLimitExceeded", RateLimitedError),
        (429, "ModelAccountTpmRateLimitExceeded", RateLimitedError),
        (429, "ServerOverloaded", RetryableError),  # retried, but does not slow the limiter
        (503, "ServerOverloaded", RetryableError),
        (500, "InternalServiceError", RetryableError),
        (502, "BadGateway", RetryableError),
        (429, "QuotaExceeded", FatalProviderError),
        (429, "SetLimitExceeded", FatalProviderError),
        (403, "AccountOverdueError", FatalProviderError),
        (403, "AccessDenied", FatalProviderError),
        (401, "AuthenticationError", FatalProviderError),
        (401, "InvalidAccountStatus", FatalProviderError),  # any 401
        (404, "InvalidEndpointOrModel.NotFound", FatalProviderError),
        (404, "ModelNotOpen", FatalProviderError),
        (400, "ModelNotOpen", FatalProviderError),  # any status: never an input's fault
        (400, "SensitiveContentDetected", InputRejectedError),
        (400, "SensitiveContentDetected.SevereViolation", InputRejectedError),
        (400, "InvalidParameter", InputRejectedError),
        (400, "OutofContextError", InputRejectedError),
        (429, "ModelAccountIpmRateLimitExceeded", RateLimitedError),  # undocumented: fallback
    ],
)
def test_each_documented_code_becomes_its_class(status: int, code: str, cls: type) -> None:
    reply = ark_error(status, code, "what Ark said", headers={"x-request-id": "req-1"})
    error = provider().classify_error(httpx.Response(status, json=reply.body,
                                                    headers=reply.headers))
    assert type(error) is cls
    assert (error.http_status, error.code, error.provider_request_id) == (status, code, "req-1")
    assert error.message.startswith("what Ark said")


def test_a_rate_limit_carries_the_wait_ark_asked_for() -> None:
    reply = ark_error(429, "RateLimitExceeded.EndpointTPMExceeded", headers={"Retry-After": "7"})
    error = provider().classify_error(httpx.Response(429, json=reply.body,
                                                    headers=reply.headers))
    assert isinstance(error, RateLimitedError) and error.retry_after_s == 7.0


def test_an_html_gateway_page_is_retried() -> None:
    answer = httpx.Response(502, content=b"<html><body>502 Bad Gateway</body></html>")
    assert type(provider().classify_error(answer)) is RetryableError


# -- dimension reduction ----------------------------------------------------------------------

RAW = np.array([[3.0, 4.0, 12.0, 7.0, 7.0], [1.0, 2.0, 2.0, -5.0, 9.0]], np.float32)


def test_reduction_keeps_the_prefix_and_renormalises_it() -> None:
    out = provider(dimensions=3).finalize_vectors(RAW)
    np.testing.assert_allclose(out, [[3 / 13, 4 / 13, 12 / 13], [1 / 3, 2 / 3, 2 / 3]], rtol=1e-6)
    assert out.dtype == np.float32
    np.testing.assert_allclose(provider(dimensions=3, normalize=True).finish_vectors(RAW), out,
                               rtol=1e-6)


def test_normalize_works_at_the_native_size_and_is_off_by_default() -> None:
    out = provider(normalize=True).finish_vectors(RAW)
    np.testing.assert_allclose(out, RAW / np.linalg.norm(RAW, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(provider().finish_vectors(RAW), RAW)


def test_the_request_never_carries_dimensions() -> None:
    request = provider(base_url="https://ark.example/api/v3", dimensions=16,
                       encoding_format="float").build_request(["a", "b"], "k")
    assert request.url == "https://ark.example/api/v3/embeddings"
    assert request.json == {"model": ENDPOINT, "input": ["a", "b"], "encoding_format": "float"}
    assert request.headers == {"Authorization": "Bearer k"}


# -- the provider against the server, one request at a time -----------------------------------


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_a_real_model_at_its_real_size_is_reduced_as_documented(encoding_format: str) -> None:
    model, native = "doubao-embedding-large-text-250515", 2048
    texts = ["天很蓝", "海很深", "the sky is blue"]
    with ArkServer(models={model: native}, api_key=KEY) as server, httpx.Client() as client:
        ark = ArkProvider(ArkConfig(kind="ark", base_url=server.base_url, model=model,
                                    dimensions=1024, encoding_format=encoding_format))
        result = ark.embed(client, texts, KEY, est_tokens=3)
        # The server refuses the parameter the client must not send.
        refused = client.post(f"{server.base_url}/embeddings",
                              headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": model, "input": texts, "dimensions": 1024})
    np.testing.assert_allclose(result.vectors, oracle(texts, native, 1024), atol=1e-6)
    assert result.prompt_tokens == server.stats.tokens and not result.tokens_estimated
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "InvalidParameter"
    assert refused.json()["error"]["param"] == "dimensions"


def test_the_server_refuses_what_ark_refuses() -> None:
    """The fake is only as useful as it is strict: check the refusals the tests rely on."""
    good = {"model": ENDPOINT, "input": ["hello"]}
    cases = [
        ({"Authorization": "Bearer wrong"}, good, 401, "AuthenticationError"),
        ({}, {**good, "input": []}, 400, "InvalidParameter"),
        ({}, {**good, "input": ["hello", ""]}, 400, "InvalidParameter"),
        ({}, {**good, "model": "ep-unknown"}, 404, "InvalidEndpointOrModel.NotFound"),
    ]
    with ArkServer(models=MODELS, api_key=KEY) as server, httpx.Client() as client:
        for headers, body, status, code in cases:
            answer = client.post(f"{server.base_url}/embeddings", json=body,
                                 headers={"Authorization": f"Bearer {KEY}", **headers})
            assert (answer.status_code, answer.json()["error"]["code"]) == (status, code)
            assert set(answer.json()["error"]) == {"code", "message", "param", "type"}


def test_an_endpoint_too_narrow_for_the_size_is_fatal() -> None:
    with ArkServer(models=MODELS) as server, httpx.Client() as client:
        ark = ArkProvider(ArkConfig(kind="ark", base_url=server.base_url, model=ENDPOINT,
                                    api_key_env=None, dimensions=NATIVE + 1))
        with pytest.raises(FatalProviderError, match=f"provider.dimensions={NATIVE + 1}"):
            ark.embed(client, ["hello"], None, est_tokens=1)


# -- config -----------------------------------------------------------------------------------


def ark_config(**provider_fields: Any) -> dict[str, Any]:
    return {"input": {"path": "corpus/*.jsonl"},
            "provider": {"kind": "ark", "api_key_env": None, **provider_fields}}


@pytest.mark.parametrize(
    ("model", "dimensions", "ok"),
    [
        ("doubao-embedding-text-240715", 300, False),
        ("doubao-embedding-text-240715", 256, False),
        ("doubao-embedding-text-240715", 512, True),
        ("doubao-embedding-text-240715", 2560, True),
        ("doubao-embedding-large-text-250515", 256, True),
        ("doubao-embedding-large-text-250515", 2048, True),
        ("doubao-embedding-large-text-250515", 2560, False),
        (ENDPOINT, 300, True),  # an endpoint hides its model: any size, checked on the answer
    ],
)
def test_dimensions_are_checked_for_documented_models(model: str, dimensions: int,
                                                      ok: bool) -> None:
    data = ark_config(model=model, dimensions=dimensions)
    if ok:
        assert parse_config(data).provider.dimensions == dimensions
    else:
        with pytest.raises(ConfigError, match=r"provider\.dimensions") as info:
            parse_config(data)
        assert info.value.key == "provider.dimensions"


def test_chunks_above_arks_per_input_limit_are_refused() -> None:
    data = {**ark_config(model=ENDPOINT), "split": {"max_tokens": 4097, "overlap_tokens": 0}}
    with pytest.raises(ConfigError, match="4096") as info:
        parse_config(data)
    assert info.value.key == "split.max_tokens"


def test_cli_exits_2_on_an_undocumented_size_before_any_request(tmp_path: Path) -> None:
    with ArkServer(models=MODELS, api_key=KEY) as server:
        config = tmp_path / "ark.yaml"
        config.write_text(yaml.safe_dump({
            "input": {"path": str(tmp_path / "corpus" / "*.jsonl")},
            "output": {"path": str(tmp_path / "out")},
            "provider": {"kind": "ark", "base_url": server.base_url,
                         "model": "doubao-embedding-text-240715", "api_key_env": KEY_ENV,
                         "dimensions": 300},
        }))
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "--config", str(config)],
            env={**os.environ, KEY_ENV: KEY}, capture_output=True, text=True, timeout=60,
            check=False,
            cwd=Path(__file__).parents[1],
        )
        requests = server.stats.requests
    assert proc.returncode == 2, proc.stderr
    assert "provider.dimensions" in proc.stderr and "300" in proc.stderr
    assert requests == 0
    assert not (tmp_path / "out").exists()


# -- whole runs -------------------------------------------------------------------------------


def run_ark(tmp_path: Path, server: ArkServer, documents: dict[str, str] | None = None,
            **provider_fields: Any) -> tuple[int, dict, dict, dict[str, str]]:
    """Embed the test corpus (plus ``documents``) through ``server``; return the exit code, the
    manifest, the committed tables and the expected chunks (id → text)."""
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    if documents:
        with fsspec.open(f"{root}/extra.jsonl", "w") as f:
            f.writelines(json.dumps({"id": doc_id, "text": text, "lang": "en"}) + "\n"
                         for doc_id, text in documents.items())
    output = str(tmp_path / "out")
    cfg = make_config(corpus_patterns(root), output, server.base_url,
                      provider={"kind": "ark", "model": ENDPOINT, "dimensions": DIMENSIONS,
                                "encoding_format": "float", **provider_fields})
    code = execute(RunRequest(cfg, quiet=True))
    manifest, tables = read_output(output)
    return code, manifest, tables, expected_chunks({**expected.documents, **(documents or {})})


def assert_oracle_vectors(vectors: Any, chunks: dict[str, str]) -> list[str]:
    """Every committed vector is the oracle's for its chunk; returns the ids."""
    ids = vectors.column("id").to_pylist()
    assert len(ids) == len(set(ids))
    got = np.asarray(vectors.column("embedding").combine_chunks().flatten()).reshape(len(ids), -1)
    np.testing.assert_allclose(got, oracle([chunks[i] for i in ids]), atol=1e-6)
    return ids


def embed_rejects(rejects: Any) -> dict[str, dict]:
    return {r["id"]: r for r in rejects.to_pylist() if r["stage"] == "embed"}


def test_reduced_vectors_usage_and_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    with ArkServer(models=MODELS, api_key=KEY) as server:
        code, manifest, t, chunks = run_ark(tmp_path, server, api_key_env=KEY_ENV)
    assert code == 0
    assert set(assert_oracle_vectors(t["vectors"], chunks)) == set(chunks)
    ok = [r for r in t["usage"].to_pylist() if r["outcome"] == "ok"]
    assert sum(r["prompt_tokens"] for r in ok) == server.stats.tokens
    assert not any(r["tokens_estimated"] for r in ok)
    counts = manifest["counts"]
    assert manifest["status"] == "complete" and manifest["dimensions"] == DIMENSIONS
    assert counts["chunks"] == counts["chunks_embedded"] == t["vectors"].num_rows
    assert counts["requests"] == t["usage"].num_rows == server.stats.requests
    assert counts["documents_rejected"] == t["rejects"].num_rows
    assert counts["chunks_failed"] == counts["retries"] == 0
    assert manifest["usage"]["prompt_tokens"] == server.stats.tokens


def test_throttling_overload_and_server_errors_are_retried(tmp_path: Path) -> None:
    faults = [Fault(429, "RateLimitExceeded.EndpointRPMExceeded", headers={"Retry-After": "0"}),
              Fault(429, "ServerOverloaded"), Fault(500, "InternalServiceError")]
    with ArkServer(models=MODELS) as server:
        server.schedule(None, *faults)  # the preflight passes; the pipeline meets the faults
        code, manifest, t, chunks = run_ark(tmp_path, server)
    assert code == 0
    assert set(assert_oracle_vectors(t["vectors"], chunks)) == set(chunks)
    retries = [r for r in t["usage"].to_pylist() if r["outcome"] == "retry"]
    assert sorted((r["http_status"], r["error"].split(":")[0]) for r in retries) == [
        (429, "HTTP 429 RateLimitExceeded.EndpointRPMExceeded"),
        (429, "HTTP 429 ServerOverloaded"),
        (500, "HTTP 500 InternalServiceError"),
    ]
    assert manifest["counts"]["retries"] == 3 and manifest["status"] == "complete"


def test_a_flagged_input_is_rejected_alone(tmp_path: Path) -> None:
    marker = "Zorblax-flagged-phrase"
    paragraphs = long_text("cooking", 8, 21).split("\n\n")
    # At a paragraph's start, so that no chunk overlap carries it into a second chunk.
    paragraphs[4] = f"The {marker} was here. {paragraphs[4]}"
    flagged = {"flagged-doc": "\n\n".join(paragraphs)}
    with ArkServer(models=MODELS, poison=(marker,)) as server:
        code, manifest, t, chunks = run_ark(tmp_path, server, flagged)
    poisoned = [cid for cid, text in chunks.items() if marker in text]
    assert len(poisoned) == 1 and poisoned[0].startswith("flagged-doc#")
    assert code == 1
    rejects = embed_rejects(t["rejects"])
    assert list(rejects) == poisoned
    assert rejects[poisoned[0]]["reason"] == "provider_rejected"
    assert "SensitiveContentDetected" in rejects[poisoned[0]]["detail"]
    assert "may contain sensitive information" in rejects[poisoned[0]]["detail"]
    # Every other chunk got its vector, the siblings it was first sent with included.
    assert set(assert_oracle_vectors(t["vectors"], chunks)) == set(chunks) - set(poisoned)
    refused = [r for r in t["usage"].to_pylist() if r["http_status"] == 400]
    assert max(r["n_inputs"] for r in refused) > 1 and min(r["n_inputs"] for r in refused) == 1
    assert manifest["counts"]["chunks_failed"] == 1


@pytest.mark.parametrize(
    ("status", "code", "server_fields", "provider_fields", "fault"),
    [
        (401, "AuthenticationError", {"api_key": KEY}, {"api_key_env": KEY_ENV}, None),
        (404, "InvalidEndpointOrModel.NotFound", {}, {"model": "ep-20240101000000-deleted"},
         None),
        (403, "AccountOverdueError", {}, {}, Fault(403, "AccountOverdueError")),
        (429, "QuotaExceeded", {}, {}, Fault(429, "QuotaExceeded")),
    ],
)
def test_a_fatal_answer_to_the_preflight_aborts_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, code: str,
    server_fields: dict, provider_fields: dict, fault: Fault | None,
) -> None:
    monkeypatch.setenv(KEY_ENV, "ark-a-revoked-key-0000000000")  # the server wants KEY
    with ArkServer(models=MODELS, **server_fields) as server:
        server.fail_always(fault)
        exit_code, manifest, t, _ = run_ark(tmp_path, server, **provider_fields)
    assert exit_code == 3
    assert manifest["status"] == "aborted"
    assert f"HTTP {status} {code}" in manifest["error"]
    assert server.stats.requests == 1  # never retried
    assert t["vectors"] is None


def test_a_fatal_answer_mid_run_keeps_the_finished_work(tmp_path: Path) -> None:
    with ArkServer(models=MODELS) as server:
        server.schedule(None, None, None, Fault(429, "QuotaExceeded"))
        code, manifest, t, chunks = run_ark(tmp_path, server)
    assert code == 3
    assert manifest["status"] == "aborted" and "HTTP 429 QuotaExceeded" in manifest["error"]
    embedded = assert_oracle_vectors(t["vectors"], chunks)
    rejects = embed_rejects(t["rejects"])
    assert len(embedded) >= 2 and rejects
    assert {r["reason"] for r in rejects.values()} == {"aborted"}
    assert set(embedded) | set(rejects) == set(chunks) and not set(embedded) & set(rejects)
    assert manifest["counts"]["chunks_embedded"] == len(embedded)
