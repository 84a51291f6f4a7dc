"""Every wait is bounded, against servers that ask for an hour, never answer, or point elsewhere.

The whole pipeline on loopback (issue 12, items 1-3). Each test asserts the outcome, a bound on
the wall time, that nothing is lost or misaligned, and that the API key went nowhere but the
configured host (no output row or log line holds it; a redirect's target sees no request).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.local_server import EmbeddingServer, Reply, error_reply
from pipeline.run import RunRequest, execute
from tests.support.checks import assert_run_complete
from tests.support.fakes import make_chunk
from tests.support.fixtures import Serve
from tests.support.harness import MODEL, make_config, read_output
from tests.support.quirks import (
    QuirkServer,
    SilentServer,
    assert_key_kept,
    short_documents,
    with_headers,
    with_usage,
)
from transforms.embed_session import EmbedSession, EmbedSettings
from transforms.limits import RateLimits
from transforms.pack import make_request_batch
from transforms.providers.openai import OpenAIConfig
from transforms.retry import RetryPolicy

KEY = "sk-bounded-0123456789abcdefghijklmnop"
KEY_ENV = "EMBEDPIPE_BOUNDED_KEY"
HOUR_S = 3600


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(KEY_ENV, KEY)
    yield KEY


def rate_limited(**headers: str) -> Reply:
    return error_reply(429, "Rate limit reached for requests", error_type="requests",
                       code="rate_limit_exceeded", headers=headers)


def config(tmp_path: Path, base_url: str, **sections: dict):
    provider = {"api_key_env": KEY_ENV, **sections.pop("provider", {})}
    return make_config([str(tmp_path / "corpus" / "docs.jsonl")], str(tmp_path / "out"),
                       base_url, provider=provider, **sections)


# -- item 1: pauses ----------------------------------------------------------------------------


def test_hour_long_pauses_are_capped_by_max_wait_and_counted_as_throttling(
    tmp_path: Path, serve: Serve, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 429 asking for an hour at the preflight and mid-run, a 200 whose rate headers say the
    window is empty for an hour, and a 200 whose usage claims 10^12 tokens: each froze a run for
    the whole period. Each pause is now at most ``retry.max_wait_s`` and each is counted."""
    expected = short_documents(tmp_path / "corpus", 40)
    server = serve(
        QuirkServer, dim=32, model=MODEL, api_key=KEY,
        faults={1: rate_limited(**{"retry-after": str(HOUR_S)}),            # the preflight
                3: rate_limited(**{"retry-after-ms": str(HOUR_S * 1000)})},  # mid-run
        edits={5: with_headers(x_ratelimit_remaining_requests="0",
                               x_ratelimit_reset_requests="1h"),
               7: with_usage(10**12)},
    )
    cfg = config(tmp_path, server.base_url, provider={"max_inputs_per_request": 4},
                 limits={"tokens_per_minute": 1_000_000, "max_concurrency": 2},
                 retry={"max_attempts": 4, "max_wait_s": 1.0, "initial_wait_s": 0.05})
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO):
        code = execute(RunRequest(cfg))
    elapsed = time.monotonic() - t0
    summary = capsys.readouterr().out

    assert code == 0
    # The preflight's pause is its own short policy's (2 s); the pipeline's three at most 1 s.
    assert elapsed < 30, elapsed
    run = assert_run_complete(str(tmp_path / "out"), expected, dim=32)
    assert run.manifest["counts"]["throttled"] == 2  # the two 429 answers
    # The summary counts throttling whatever its source: two 429s and one header pause.
    assert "3 throttled" in summary, summary
    assert "1 paused by rate headers" in summary, summary
    # The implausible usage was not trusted, and said so once.
    untrusted = [r for r in caplog.records if "not trusted" in r.getMessage()]
    assert len(untrusted) == 1, [r.getMessage() for r in untrusted]
    # The pipeline's progress line counts the 429 and the header pause it met.
    done = [r.getMessage() for r in caplog.records
            if r.name == "embedpipe.progress" and "done" in r.getMessage()]
    assert done and "2 throttled" in done[-1], done
    assert_key_kept(str(tmp_path / "out"), KEY, caplog.text, summary)


# -- item 2: a server that never answers -------------------------------------------------------


def test_a_server_that_never_answers_ends_the_run_at_the_preflight(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    short_documents(tmp_path / "corpus", 40)
    timeout_s = 1.0
    with SilentServer() as server:
        cfg = config(tmp_path, server.base_url, provider={"timeout_s": timeout_s})
        t0 = time.monotonic()
        with caplog.at_level(logging.INFO):
            code = execute(RunRequest(cfg, quiet=True))
        elapsed = time.monotonic() - t0
        requests = server.requests
        heads = list(server.heads)

    assert code == 3
    # The preflight's three attempts of timeout_s each, its two short waits (< 2 s), slack.
    assert elapsed < 3 * timeout_s + 2 * 2.0 + 3.0, elapsed
    assert requests == 3  # the preflight's attempts; the pipeline never started
    manifest, tables = read_output(str(tmp_path / "out"))
    assert manifest["status"] == "aborted"
    assert "no answer within provider.timeout_s=1s" in manifest["error"], manifest["error"]
    assert "3 attempts" in manifest["error"]
    assert manifest["counts"]["chunks"] == 0 and tables["vectors"] is None
    usage = tables["usage"].to_pylist()
    assert [u["http_status"] for u in usage] == [None, None, None]
    # The key went to the configured host only, and nowhere else.
    assert all(f"Bearer {KEY}".encode() in head for head in heads)
    assert_key_kept(str(tmp_path / "out"), KEY, caplog.text)


def test_progress_shows_requests_in_flight_and_the_age_of_the_oldest() -> None:
    """While a request waits for an answer, the progress line says so and how long it waited."""
    with SilentServer() as server:
        provider = OpenAIConfig(kind="openai", base_url=server.base_url, model=MODEL,
                                api_key_env=KEY_ENV, encoding_format="float", timeout_s=3.0)
        settings = EmbedSettings(
            run_id="in-flight", provider=provider, limits=RateLimits(6e6, 1e12),
            max_concurrency=2, retry=RetryPolicy(max_attempts=1, max_wait_s=0.1),
            progress_interval_s=60.0)
        session = EmbedSession(settings, api_key=KEY)
        try:
            assert session.progress is not None
            before = session.progress.line()
            future = session.submit(make_request_batch((make_chunk("a", 0, "hello there"),)))
            deadline = time.monotonic() + 10
            while server.requests < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.2)
            waiting = session.progress.line()
            outcome = future.result(timeout=30)
        finally:
            session.close()
    assert "0 requests awaiting an answer" in before, before
    assert "1 request awaiting an answer, the oldest for 1s" in waiting, waiting
    assert outcome.rejects and outcome.rejects[0].reason == "retries_exhausted"


# -- item 3: redirects -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 307, 308])
def test_a_redirect_aborts_at_the_preflight_and_the_key_never_leaves(
    tmp_path: Path, serve: Serve, caplog: pytest.LogCaptureFixture, status: int,
) -> None:
    short_documents(tmp_path / "corpus", 20)
    elsewhere = serve(EmbeddingServer, dim=32, model=MODEL)  # where the redirect points
    location = f"{elsewhere.base_url}/embeddings"
    server = serve(EmbeddingServer, dim=32, model=MODEL, api_key=KEY)
    server.fail_always(Reply(status, b"", {"location": location}))
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO):
        code = execute(RunRequest(config(tmp_path, server.base_url), quiet=True))
    elapsed = time.monotonic() - t0

    assert code == 3
    assert elapsed < 10, elapsed
    assert server.stats.requests == 1  # a configuration error: not retried
    assert elsewhere.stats.requests == 0  # never followed: the key stayed home
    manifest, tables = read_output(str(tmp_path / "out"))
    assert manifest["status"] == "aborted"
    assert f"HTTP {status}" in manifest["error"] and location in manifest["error"]
    assert "provider.base_url" in manifest["error"]
    assert manifest["counts"]["chunks"] == 0 and tables["vectors"] is None
    assert_key_kept(str(tmp_path / "out"), KEY, caplog.text)


def test_a_redirect_mid_run_aborts_every_chunk_without_following_it(
    tmp_path: Path, serve: Serve, caplog: pytest.LogCaptureFixture,
) -> None:
    expected = short_documents(tmp_path / "corpus", 40)
    elsewhere = serve(EmbeddingServer, dim=32, model=MODEL)
    server = serve(EmbeddingServer, dim=32, model=MODEL, api_key=KEY)
    server.fail_always(Reply(307, b"", {"location": f"{elsewhere.base_url}/embeddings"}))
    cfg = config(tmp_path, server.base_url, provider={"preflight": False,
                                                      "max_inputs_per_request": 4})
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO):
        code = execute(RunRequest(cfg, quiet=True))
    elapsed = time.monotonic() - t0

    assert code == 3
    assert elapsed < 30, elapsed
    assert 1 <= server.stats.requests <= 4  # the requests in flight when the first answer came
    assert elsewhere.stats.requests == 0
    run = assert_run_complete(str(tmp_path / "out"), expected, dim=32, failed=None,
                              status="aborted")
    assert not run.vectors
    assert {r["reason"] for r in run.embed_rejects.values()} == {"aborted"}
    assert "HTTP 307" in run.manifest["error"]
    assert_key_kept(str(tmp_path / "out"), KEY, caplog.text)
