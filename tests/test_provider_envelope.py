"""The envelope provider: its request, both vector layouts, every error code, the polling state
machine, and whole runs of the pipeline against an envelope server on loopback.

Unit tests drive :meth:`EnvelopeProvider.embed` through ``httpx.MockTransport`` on a fake clock,
so polling never sleeps. End-to-end tests run ``pipeline.run.execute`` against
:class:`tests.support.envelope_server.EnvelopeServer` and check the committed output against the
server's embedder and its own count of what it served.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import Config, EnvelopeConfig, load_config
from pipeline.local_server import HashingEmbedder, Reply, truncate_dimensions
from pipeline.run import RunRequest, execute
from tests.support.corpus import ExpectedCorpus, corpus_patterns, write_corpus
from tests.support.envelope_server import EnvelopeServer, envelope_error, html_error
from tests.support.fakes import FakeClock
from tests.support.harness import MODEL, expected_chunks, make_config, read_output
from transforms.errors import (
    ConfigError,
    FatalProviderError,
    InputRejectedError,
    MalformedResponseError,
    ProviderError,
    RateLimitedError,
    RequestTooLargeError,
    RetryableError,
)
from transforms.providers.base import EmbeddingResult
from transforms.providers.envelope import EnvelopeProvider, PollBackoff

KEY = "sk-envelope-test-0123456789abcdef"
KEY_ENV = "EMBEDPIPE_ENVELOPE_TEST_KEY"
ROOT = "https://api.example.com"
#: ``pipeline.run.preflight`` sends one input, estimated at 2 tokens.
PREFLIGHT_EST_TOKENS = 2

Handler = Callable[[httpx.Request], httpx.Response]


# -- unit: helpers ------------------------------------------------------------------------------


def make_provider(clock: FakeClock | None = None, **overrides: Any) -> EnvelopeProvider:
    cfg = EnvelopeConfig(kind="envelope", base_url=ROOT, model="embed-v1",
                         api_key_env=KEY_ENV, **overrides)
    return EnvelopeProvider(cfg, clock=clock or FakeClock())


def answer(data: dict[str, Any] | None = None, *, status: int = 200, success: bool = True,
           code: str = "200", message: str = "success",
           headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"success": success, "code": code, "message": message, "data": data}
    return httpx.Response(status, json=body, headers=headers)


def embed(provider: EnvelopeProvider, handler: Handler, texts: list[str] | None = None,
          est_tokens: int = 7) -> EmbeddingResult:
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        return provider.embed(client, texts or ["a", "b"], KEY, est_tokens)


def failing(handler: Handler, provider: EnvelopeProvider | None = None) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        embed(provider or make_provider(), handler)
    return info.value


def failing_with(response: httpx.Response, provider: EnvelopeProvider | None = None
                 ) -> ProviderError:
    return failing(lambda request: response, provider)


def b64(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode()


def scripted(*responses: httpx.Response) -> tuple[Handler, list[httpx.Request]]:
    """A handler answering ``responses`` in order, and the list of requests it saw."""
    seen: list[httpx.Request] = []
    queue = iter(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(queue)

    return handler, seen


#: Two vectors, out of order, with usage: ``data`` of a completed answer for inputs ["a", "b"].
VECTORS_AB = {
    "data": [{"index": 1, "embedding": [0.0, 2.0]}, {"index": 0, "embedding": [1.0, 0.0]}],
    "usage": {"prompt_tokens": 3, "total_tokens": 3},
}


# -- unit: the request --------------------------------------------------------------------------


def sent_body(provider: EnvelopeProvider) -> tuple[httpx.Request, dict[str, Any]]:
    """The request ``provider`` puts on the wire for inputs ["x", "y"], and its JSON body."""
    handler, seen = scripted(answer({"embeddings": [[1.0], [2.0]]}))
    embed(provider, handler, ["x", "y"])
    return seen[0], json.loads(seen[0].content)


def test_request_sends_only_what_is_set() -> None:
    request, body = sent_body(make_provider())
    assert (request.method, str(request.url)) == ("POST", f"{ROOT}/api/v1/embeddings")
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert body == {"model": "embed-v1", "input": ["x", "y"], "encoding_format": "base64"}

    parameters = {"instruction": "passage", "truncate": "END"}
    _, body = sent_body(make_provider(dimensions=1, encoding_format="float",
                                      parameters=parameters))
    assert body == {"model": "embed-v1", "input": ["x", "y"], "encoding_format": "float",
                    "dimensions": 1, "parameters": parameters}
    _, body = sent_body(make_provider(dimensions=1, send_dimensions=False))
    assert "dimensions" not in body


@pytest.mark.parametrize("poll_path", ["/api/v1/jobs", "api/v1/embeddings/{id}"])
def test_poll_path_must_be_a_path_naming_the_job(poll_path: str) -> None:
    with pytest.raises(ConfigError, match=r"provider\.poll_path"):
        make_config(["in/*.jsonl"], "out", ROOT, provider={"kind": "envelope",
                                                           "poll_path": poll_path})


def test_the_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parents[1] / "configs" / "envelope.yaml")
    assert (cfg.provider.kind, cfg.provider.api_key_env) == ("envelope", "ENVELOPE_API_KEY")
    _, body = sent_body(EnvelopeProvider(cfg.provider, clock=FakeClock()))
    assert body["parameters"] == cfg.provider.parameters and "dimensions" not in body


# -- unit: the answer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"data": [{"object": "embedding", "index": 1, "embedding": b64([0, 2])},
                               {"object": "embedding", "index": 0, "embedding": b64([1, 0])}]},
                     id="data.data-openai-base64-shuffled"),
        pytest.param({"embeddings": [{"index": 1, "embedding": [0, 2]},
                                     {"index": 0, "embedding": [1, 0]}]},
                     id="embeddings-indexed-float-shuffled"),
        pytest.param({"embeddings": [[1, 0], [0, 2]]}, id="embeddings-bare-float"),
        pytest.param({"embeddings": [b64([1, 0]), b64([0, 2])]}, id="embeddings-bare-base64"),
    ],
)
def test_both_layouts_align_by_index(data: dict[str, Any]) -> None:
    result = embed(make_provider(), lambda request: answer({"id": "r-1", **data}))
    assert result.vectors.dtype == np.float32
    assert result.vectors.tolist() == [[1, 0], [0, 2]]
    assert result.provider_request_id == "r-1"


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 5, "total_tokens": 6}, (5, 6, False)),
        ({"input_tokens": 4}, (4, 4, False)),
        (None, (7, 7, True)),  # the local estimate, marked as such
    ],
)
def test_usage_from_the_answer_else_the_estimate(usage: dict[str, int] | None,
                                                 expected: tuple[int, int, bool]) -> None:
    data = {"embeddings": [[1.0], [2.0]], **({"usage": usage} if usage else {})}
    result = embed(make_provider(), lambda request: answer(
        data, headers={"x-request-id": "hdr-9"}))
    assert (result.prompt_tokens, result.total_tokens, result.tokens_estimated) == expected
    assert result.provider_request_id == "hdr-9"  # no data.id: the request id header


@pytest.mark.parametrize(
    ("response", "cls", "status"),
    [
        # HTTP 200 with success: false, classified by the envelope's code.
        (answer(success=False, code="429", message="slow down"), RateLimitedError, 429),
        (answer(success=False, code="500", message="oops"), RetryableError, 500),
        (answer(success=False, code="503", message="busy"), RetryableError, 503),
        (answer(success=False, code="400", message="input 0 is unsafe"), InputRejectedError, 400),
        (answer(success=False, code="401", message="bad key"), FatalProviderError, 401),
        (answer(success=False, code="403", message="no access"), FatalProviderError, 403),
        (answer(success=False, code="404", message="no such model"), FatalProviderError, 404),
        (answer(success=False, code="413", message="too many inputs"), RequestTooLargeError, 413),
        (answer(success=False, code="429", message="monthly quota exhausted"),
         FatalProviderError, 429),
        (answer(success=False, code="E1001", message="gateway hiccup"), RetryableError, 200),
        # Non-2xx: the envelope's code when the body is one, else the HTTP status.
        (answer(status=429, success=False, code="429", message="slow down"), RateLimitedError, 429),
        (answer(status=500, success=False, code="400", message="input 1 is empty"),
         InputRejectedError, 400),
        (answer(status=502, success=False, code="E_UPSTREAM", message="bad gateway"),
         RetryableError, 502),
        (httpx.Response(503, content=b"<html><body><h1>503 Service Unavailable</h1></body></html>"),
         RetryableError, 503),
        (httpx.Response(401, json={"error": {"message": "bad key", "code": "invalid_api_key"}}),
         FatalProviderError, 401),
    ],
)
def test_error_classification(response: httpx.Response, cls: type[ProviderError],
                              status: int) -> None:
    error = failing_with(response)
    assert type(error) is cls
    assert error.http_status == status
    assert "<h1>" not in error.message and error.message


def test_retry_after_and_request_id_travel_with_the_error() -> None:
    error = failing_with(answer(success=False, code="429", message="slow down",
                                headers={"retry-after": "3", "x-request-id": "hdr-1"}))
    assert isinstance(error, RateLimitedError)
    assert (error.retry_after_s, error.provider_request_id) == (3.0, "hdr-1")
    assert error.describe() == "HTTP 429: slow down"


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, json={"data": [{"index": 0, "embedding": [1.0]}]}),  # not an envelope
        httpx.Response(200, content=b"<html>ok</html>"),
        answer({"id": "r-1"}),                                    # success without vectors
        answer({"status": "COMPLETED"}),                          # done, yet no vectors
        answer({"embeddings": [[1.0]]}),                          # one vector for two inputs
        answer({"embeddings": [[1.0], [1.0, 2.0]]}),              # mixed dimensions
        answer({"status": "PENDING"}),                            # queued, but no id to poll
    ],
)
def test_untrustworthy_answers_are_malformed(response: httpx.Response) -> None:
    assert isinstance(failing_with(response), MalformedResponseError)


def test_dimension_is_checked_against_the_config() -> None:
    error = failing_with(answer({"embeddings": [[1.0, 0.0], [0.0, 1.0]]}),
                         make_provider(dimensions=3))
    assert isinstance(error, MalformedResponseError) and "dimension 2" in error.message


# -- unit: polling ------------------------------------------------------------------------------


def html_response(status: int) -> httpx.Response:
    return httpx.Response(status, content=f"<html><h1>{status} Bad Gateway</h1></html>".encode())


def pending(job_id: str = "job/7", status: str = "PENDING",
            headers: dict[str, str] | None = None) -> httpx.Response:
    return answer({"id": job_id, "status": status}, headers=headers)


def test_polls_until_completed_with_backoff() -> None:
    clock = FakeClock()
    handler, seen = scripted(
        pending(), pending(status="RUNNING"), pending(status="PROCESSING"),
        answer({"id": "job/7", "status": "COMPLETED", **VECTORS_AB}),
    )
    result = embed(make_provider(clock), handler)
    assert result.vectors.tolist() == [[1, 0], [0, 2]]
    assert (result.prompt_tokens, result.tokens_estimated) == (3, False)
    assert result.provider_request_id == "job/7"
    assert clock.sleeps == pytest.approx([0.2, 0.3, 0.45])
    polls = [(r.method, r.url.raw_path) for r in seen[1:]]
    assert polls == [("GET", b"/api/v1/embeddings/job%2F7")] * 3  # the id is quoted
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in seen)


def test_backoff_is_capped_and_retry_after_is_honoured() -> None:
    clock = FakeClock()
    running = [pending(status="RUNNING") for _ in range(8)]
    handler, _ = scripted(
        pending(headers={"retry-after": "2"}), *running,
        answer({"status": "COMPLETED", **VECTORS_AB}),
    )
    provider = make_provider(clock)
    provider.poll_backoff = PollBackoff(initial_s=1.0, factor=2.0, max_s=5.0)
    embed(provider, handler)
    assert clock.sleeps == [2.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]


def test_poll_path_comes_from_the_config() -> None:
    handler, seen = scripted(pending("j1"), answer({"status": "COMPLETED", **VECTORS_AB}))
    embed(make_provider(poll_path="/v2/jobs/{id}/result"), handler)
    assert seen[1].url == f"{ROOT}/v2/jobs/j1/result"


@pytest.mark.parametrize(
    ("ended", "cls"),
    [
        (answer({"id": "job/7", "status": "FAILED"}, message="worker lost the job"),
         RetryableError),
        (answer({"id": "job/7", "status": "ERROR"}), RetryableError),
        (answer({"id": "job/7", "status": "CANCELLED"}, success=False, code="403",
                message="key revoked"), FatalProviderError),
        (answer({"id": "job/7", "status": "FAILED"}, success=False, code="400",
                message="input 1 is unsafe"), InputRejectedError),
    ],
)
def test_a_failed_job_is_classified_by_its_code(ended: httpx.Response,
                                                cls: type[ProviderError]) -> None:
    handler, seen = scripted(pending(), pending(status="RUNNING"), ended)
    error = failing(handler)
    assert type(error) is cls
    assert "job job/7 ended" in error.message and len(seen) == 3


def test_a_job_that_outlasts_poll_timeout_is_retryable() -> None:
    clock = FakeClock()
    provider = make_provider(clock, poll_timeout_s=3)
    error = failing(lambda request: (
        pending() if request.method == "POST" else pending(status="RUNNING")), provider)
    assert type(error) is RetryableError
    assert "poll_timeout_s=3s" in error.message
    assert sum(clock.sleeps) == pytest.approx(3.0)  # the last wait is cut to the deadline


def test_a_failed_poll_does_not_end_the_wait() -> None:
    clock = FakeClock()
    handler, seen = scripted(
        pending(),
        httpx.Response(503, content=b"<html>503 Service Unavailable</html>"),
        answer(success=False, code="429", message="slow down", headers={"retry-after": "4"}),
        answer({"status": "COMPLETED", **VECTORS_AB}),
    )
    result = embed(make_provider(clock), handler)
    assert result.vectors.shape == (2, 2)
    assert [r.method for r in seen] == ["POST", "GET", "GET", "GET"]  # submitted once
    assert clock.sleeps == pytest.approx([0.2, 0.3, 4.0])


def test_a_timeout_names_the_last_poll_failure() -> None:
    provider = make_provider(FakeClock(), poll_timeout_s=1)
    error = failing(lambda request: (
        pending() if request.method == "POST" else html_response(502)), provider)
    assert type(error) is RetryableError and "last poll: HTTP 502" in error.message


def test_a_fatal_poll_answer_aborts() -> None:
    handler, _ = scripted(pending(), answer(success=False, code="401", message="key expired"))
    assert type(failing(handler)) is FatalProviderError


# -- unit: the provider against the envelope server ---------------------------------------------


@pytest.mark.parametrize(
    ("server_args", "encoding"),
    [
        ({"layout": "data", "shuffle": True}, "base64"),
        ({"layout": "embeddings", "shuffle": True, "usage": False}, "float"),
        ({"layout": "bare"}, "base64"),
        ({"layout": "embeddings", "polls": 2}, "float"),
    ],
)
def test_provider_and_server_agree(server_args: dict[str, Any], encoding: str) -> None:
    texts = ["the red planet", "a green salad", "bond yields climbed"]
    with EnvelopeServer(dim=16, model=MODEL, api_key=KEY, **server_args) as server:
        cfg = EnvelopeConfig(kind="envelope", base_url=server.root_url, model=MODEL,
                             encoding_format=encoding, dimensions=8)
        provider = EnvelopeProvider(cfg, clock=FakeClock())  # polls ask again at once
        with httpx.Client(timeout=5) as client:
            result = provider.embed(client, texts, KEY, est_tokens=11)
        assert server.stats.texts == tuple(texts)
    want = truncate_dimensions(HashingEmbedder(dim=16).embed(texts), 8)
    np.testing.assert_allclose(result.vectors, want, atol=1e-6)
    assert result.tokens_estimated == (not server.usage)
    assert result.prompt_tokens == (server.stats.tokens if server.usage else 11)


def test_server_speaks_only_the_envelope_dialect() -> None:
    with (EnvelopeServer(dim=16, api_key=KEY) as server,
          httpx.Client(base_url=server.root_url) as client):
        auth = {"authorization": f"Bearer {KEY}"}
        openai = client.post("/v1/embeddings", json={"model": MODEL, "input": ["x"]}, headers=auth)
        unauthorised = client.post("/api/v1/embeddings", json={"model": MODEL, "input": ["x"]})
        no_job = client.get("/api/v1/embeddings/job-1", headers=auth)
    assert openai.status_code == 200 and openai.json()["code"] == "404"
    assert no_job.json()["code"] == "404"
    assert unauthorised.json()["success"] is False and unauthorised.json()["code"] == "401"


# -- end to end: helpers ------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ExpectedCorpus:
    """The shared test corpus, the API key in the environment, and polls a few ms apart."""
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setattr(EnvelopeProvider, "poll_backoff", PollBackoff(0.005, 1.5, 0.02))
    return write_corpus(str(tmp_path / "corpus"))


def run_config(tmp_path: Path, server: EnvelopeServer, **provider: Any) -> Config:
    return make_config(
        corpus_patterns(str(tmp_path / "corpus")), str(tmp_path / "out"), server.root_url,
        provider={"kind": "envelope", "api_key_env": KEY_ENV, **provider},
        output={"include_text": True},
    )


def oracle(server: EnvelopeServer, texts: list[str], dimensions: int | None) -> np.ndarray:
    vectors = HashingEmbedder(dim=server.dim).embed(texts)
    return vectors if dimensions is None else truncate_dimensions(vectors, dimensions)


def check_embedded(vectors: pa.Table, chunks: dict[str, str], server: EnvelopeServer,
                   dimensions: int | None = None) -> list[str]:
    """Each row is one of ``chunks``, once, and its vector is the server's for its text."""
    ids = vectors.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) <= set(chunks)
    texts = vectors.column("text").to_pylist()
    assert texts == [chunks[i] for i in ids]
    got = vectors.column("embedding").combine_chunks().flatten().to_numpy()
    np.testing.assert_allclose(got.reshape(len(ids), -1), oracle(server, texts, dimensions),
                               atol=1e-6)
    return ids


def check_complete_run(tmp_path: Path, expected: ExpectedCorpus, server: EnvelopeServer,
                       dimensions: int | None = None) -> tuple[dict[str, Any], pa.Table]:
    """Every chunk embedded, usage reconciled with the server, manifest counts = rows."""
    manifest, t = read_output(str(tmp_path / "out"))
    vectors, usage = t["vectors"], t["usage"]
    chunks = expected_chunks(expected.documents)
    assert set(check_embedded(vectors, chunks, server, dimensions)) == set(chunks)
    # The server delivered every distinct chunk text once (and the preflight's input): chunks
    # with identical texts are sent once and share the vector.
    distinct = set(chunks.values())
    assert sorted(server.stats.texts) == sorted([*distinct, "embedpipe preflight"])

    ok = [row for row in usage.to_pylist() if row["outcome"] == "ok"]
    assert sum(row["n_inputs"] for row in ok) == len(distinct) + 1
    prompt = sum(row["prompt_tokens"] for row in ok)
    if server.usage:
        assert prompt == server.stats.tokens
        assert not any(row["tokens_estimated"] for row in ok)
    else:
        assert all(row["tokens_estimated"] for row in ok)
        per_text = dict(zip(vectors.column("content_sha256").to_pylist(),
                            vectors.column("n_tokens").to_pylist(), strict=True))
        assert prompt == sum(per_text.values()) + PREFLIGHT_EST_TOKENS

    counts = manifest["counts"]
    assert manifest["status"] == "complete"
    assert counts["chunks"] == counts["chunks_embedded"] == vectors.num_rows
    assert counts["chunks_failed"] == 0
    assert counts["documents_rejected"] == t["rejects"].num_rows == len(expected.rejects)
    assert counts["requests"] == usage.num_rows
    assert counts["retries"] == sum(row["outcome"] == "retry" for row in usage.to_pylist())
    assert manifest["usage"]["prompt_tokens"] == prompt
    assert manifest["dimensions"] == (dimensions or server.dim)
    return manifest, usage


# -- end to end: success ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_args", "encoding"),
    [
        pytest.param({"layout": "data"}, "base64", id="data.data-base64-usage"),
        pytest.param({"layout": "embeddings", "shuffle": True, "usage": False}, "float",
                     id="embeddings-indexed-shuffled-float-no-usage"),
    ],
)
def test_e2e_synchronous(tmp_path: Path, corpus: ExpectedCorpus, server_args: dict[str, Any],
                         encoding: str) -> None:
    with EnvelopeServer(dim=64, model=MODEL, api_key=KEY, **server_args) as server:
        cfg = run_config(tmp_path, server, encoding_format=encoding)
        assert execute(RunRequest(cfg, quiet=True)) == 0
        _, usage = check_complete_run(tmp_path, corpus, server)
    assert {row["provider_request_id"][:4] for row in usage.to_pylist()} == {"emb-"}


def test_e2e_polling_and_a_failed_job(tmp_path: Path, corpus: ExpectedCorpus) -> None:
    """Every request is queued and collected on its third poll; job 3 fails and is resubmitted."""
    parameters = {"instruction": "passage", "truncate": "END"}
    with EnvelopeServer(dim=64, model=MODEL, api_key=KEY, layout="bare", polls=3,
                        failed_jobs={3}) as server:
        cfg = run_config(tmp_path, server, encoding_format="float", dimensions=32,
                         parameters=parameters)
        assert execute(RunRequest(cfg, quiet=True)) == 0
        _, usage = check_complete_run(tmp_path, corpus, server, dimensions=32)
        assert server.stats.requests == 4 * usage.num_rows  # each: one submission, three polls
        assert all(p["parameters"] == parameters and p["dimensions"] == 32
                   for p in server.payloads)
    rows = usage.to_pylist()
    assert all(row["provider_request_id"].startswith("job-") for row in rows)
    [retried] = [row for row in rows if row["outcome"] == "retry"]
    assert "job job-3 ended FAILED: worker lost the job" in retried["error"]


# -- end to end: each error class, and what it leads to -----------------------------------------


def test_e2e_retried_codes(tmp_path: Path, corpus: ExpectedCorpus) -> None:
    faults: dict[int, Reply] = {
        2: envelope_error("429", "slow down", headers={"retry-after": "0"}),
        3: envelope_error("503", "overloaded, try again"),
        4: html_error(503),
        5: envelope_error("500", "internal error", http_status=500),
    }
    with EnvelopeServer(dim=64, model=MODEL, api_key=KEY, faults=faults) as server:
        assert execute(RunRequest(run_config(tmp_path, server), quiet=True)) == 0
        manifest, usage = check_complete_run(tmp_path, corpus, server)
    retried = [row for row in usage.to_pylist() if row["outcome"] == "retry"]
    assert sorted(row["http_status"] for row in retried) == [429, 500, 503, 503]
    assert any("slow down" in row["error"] for row in retried)
    assert manifest["counts"]["retries"] == 4 and manifest["counts"]["throttled"] == 1


def test_e2e_poisoned_input_is_the_only_reject(tmp_path: Path, corpus: ExpectedCorpus) -> None:
    poison = {"id": "poison-1", "text": "This note carries the FORBIDDEN-MARKER inside it."}
    (tmp_path / "corpus" / "poison.jsonl").write_text(json.dumps(poison) + "\n")
    with EnvelopeServer(dim=64, model=MODEL, api_key=KEY, poison="FORBIDDEN-MARKER") as server:
        assert execute(RunRequest(run_config(tmp_path, server), quiet=True)) == 1
    manifest, t = read_output(str(tmp_path / "out"))
    chunks = expected_chunks({**corpus.documents, poison["id"]: poison["text"]})
    embedded = check_embedded(t["vectors"], chunks, server)
    assert set(chunks) - set(embedded) == {"poison-1#0"}
    [reject] = [r for r in t["rejects"].to_pylist() if r["stage"] == "embed"]
    assert (reject["id"], reject["reason"]) == ("poison-1#0", "provider_rejected")
    assert "input 0 contains forbidden content" in reject["detail"]
    assert manifest["counts"]["chunks_failed"] == 1
    assert manifest["counts"]["chunks_embedded"] == len(chunks) - 1


@pytest.mark.parametrize("code", ["403", "404"])  # "401": the preflight test below
def test_e2e_fatal_code_mid_run_aborts(tmp_path: Path, corpus: ExpectedCorpus,
                                       code: str) -> None:
    faults = {4: envelope_error(code, f"refused with {code}")}
    with EnvelopeServer(dim=64, model=MODEL, api_key=KEY, faults=faults) as server:
        assert execute(RunRequest(run_config(tmp_path, server), quiet=True)) == 3
    manifest, t = read_output(str(tmp_path / "out"))
    assert manifest["status"] == "aborted"
    assert f"refused with {code}" in manifest["error"]
    # What finished is committed and correct; every other chunk is an `aborted` reject.
    chunks = expected_chunks(corpus.documents)
    embedded = check_embedded(t["vectors"], chunks, server)
    aborted = [r["id"] for r in t["rejects"].to_pylist() if r["reason"] == "aborted"]
    assert sorted(embedded + aborted) == sorted(chunks)
    assert len(embedded) >= 2 and aborted


def test_e2e_bad_key_fails_at_the_preflight(tmp_path: Path, corpus: ExpectedCorpus) -> None:
    with EnvelopeServer(dim=64, model=MODEL, api_key="sk-the-right-key-0000000000") as server:
        assert execute(RunRequest(run_config(tmp_path, server), quiet=True)) == 3
        assert server.stats.requests == 1  # nothing was sent after the preflight
    manifest, t = read_output(str(tmp_path / "out"))
    assert manifest["status"] == "aborted" and "401" in manifest["error"]
    assert "check the key" in manifest["error"]  # the hint keys on the envelope's code
    assert t["vectors"] is None
    assert KEY not in json.dumps(manifest)

