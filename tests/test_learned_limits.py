"""Learn what the server states: its cap on inputs per request, and the units it counts in.

The whole pipeline on loopback (issue 12, items 4-5). Each test asserts the outcome, a bound on
the wall time, that nothing is lost or misaligned, and that the API key went nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.run import RunRequest, execute
from tests.support.checks import assert_run_complete
from tests.support.fault_server import FaultPlan, FaultServer, Outcome
from tests.support.fixtures import Serve
from tests.support.harness import MODEL, make_config
from tests.support.quirks import CAP_SHAPES, CappedServer, assert_key_kept, short_documents
from tests.test_embed_session import (
    FakeEmbeddings,
    assert_accounted,
    batch_of,
    embedded,
    make_settings,
)
from transforms.embed_session import EmbedSession

KEY = "sk-learned-0123456789abcdefghijklmnop"
KEY_ENV = "EMBEDPIPE_LEARNED_KEY"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(KEY_ENV, KEY)
    yield KEY


def config(tmp_path: Path, base_url: str, **sections: dict):
    provider = {"api_key_env": KEY_ENV, **sections.pop("provider", {})}
    return make_config([str(tmp_path / "corpus" / "docs.jsonl")], str(tmp_path / "out"),
                       base_url, provider=provider, **sections)


# -- item 4: caps on inputs per request --------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(CAP_SHAPES))
def test_a_stated_cap_is_learned_once_at_the_cost_of_one_request(
    tmp_path: Path, serve: Serve, caplog: pytest.LogCaptureFixture, shape: str,
) -> None:
    """TEI's 413, FastAPI's 422 ``too_long`` (infinity), vLLM's 400, OpenAI's and Azure's 400:
    each states the cap; it is learned once, with a warning, and costs one refused request for
    the worker, however many requests were in flight."""
    expected = short_documents(tmp_path / "corpus", 120)
    server = serve(CappedServer, dim=32, model=MODEL, api_key=KEY, cap=8, shape=shape)
    cfg = config(tmp_path, server.base_url,
                 provider={"max_inputs_per_request": 32, "max_tokens_per_request": 50_000},
                 limits={"max_concurrency": 4})
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO):
        code = execute(RunRequest(cfg, quiet=True))
    elapsed = time.monotonic() - t0

    assert code == 0
    assert elapsed < 60, elapsed
    run = assert_run_complete(str(tmp_path / "out"), expected, dim=32)
    assert server.refused == 1, server.refused  # one worker: one wasted request
    usage = run.tables["usage"].to_pylist()
    assert [u["outcome"] for u in usage].count("ok") == len(usage) - 1
    assert all(u["n_inputs"] <= 8 for u in usage if u["outcome"] == "ok")
    warnings = [r.getMessage() for r in caplog.records if "caps requests at 8" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert_key_kept(str(tmp_path / "out"), KEY, caplog.text)


@pytest.mark.parametrize("shape", sorted(CAP_SHAPES))
def test_a_stated_cap_costs_one_refusal_however_many_requests_are_in_flight(
    shape: str,
) -> None:
    """Four batches of 32 at once against a server capped at 8: before, each thread sent its
    own 32 and each was refused; now the first finds out, the others wait at the gate and are
    cut to 8 without being sent."""
    def capped(inputs: list[str]) -> httpx.Response | None:
        if len(inputs) <= 8:
            return None
        time.sleep(0.3)  # real time, so the other threads reach the server (or the gate)
        reply = CAP_SHAPES[shape](8, len(inputs))
        return httpx.Response(reply.status, json=reply.body)

    server = FakeEmbeddings(capped)
    session = EmbedSession(make_settings(max_concurrency=4), api_key=KEY,
                           transport=server.transport())
    batches = [batch_of(32, prefix) for prefix in "abcd"]
    try:
        outcomes = [f.result(timeout=30) for f in [session.submit(b) for b in batches]]
    finally:
        session.close()

    assert sorted(server.sizes) == [8] * 16 + [32]
    assert session.cap.value == 8
    for batch, outcome in zip(batches, outcomes, strict=True):
        assert outcome.rejects == []
        assert len(embedded(outcome)) == 32
        assert_accounted(batch, outcome)
    assert sum(len(o.usage) for o in outcomes) == 17  # the refusal and 16 answers


# -- item 5: usage in other units ---------------------------------------------------------------

#: The server's limit in its own units: characters per minute (about 4.5 per cl100k token here).
TPM_CHARS = 600_000


def test_a_limit_in_characters_is_reached_without_429s(
    tmp_path: Path, fault_server: Callable[..., FaultServer], caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A server whose usage counts characters (infinity's), its TPM limit in characters: the
    limiter learns the unit from the answers and runs at the limit, not at a quarter of it or
    into it, and the summary says whose counts these are and that they are not ours."""
    # About 40 s of the limit: 30-odd seconds of measured window, under a minute in all.
    expected = short_documents(tmp_path / "corpus", 1150)
    plan = FaultPlan(tpm=TPM_CHARS, latency_s=0.02, count_chars=True)
    server = fault_server(plan, dim=32, model=MODEL, api_key=KEY)
    cfg = config(tmp_path, server.base_url,
                 provider={"max_inputs_per_request": 8, "timeout_s": 30, "preflight": False},
                 limits={"tokens_per_minute": TPM_CHARS, "requests_per_minute": 100_000,
                         "max_concurrency": 16},
                 retry={"max_attempts": 8, "max_wait_s": 10.0, "initial_wait_s": 0.1},
                 cache={"enabled": False})
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        code = execute(RunRequest(cfg))
    elapsed = time.monotonic() - t0
    summary = capsys.readouterr().out
    report = server.report()
    stats = server.fault_stats

    assert code == 0
    assert elapsed < 60, elapsed
    assert report["ok_span_s"] > 25, report  # a window long enough to measure
    assert report["efficiency"] >= 0.95, report
    assert report["share_429"] <= 0.02, report
    run = assert_run_complete(str(tmp_path / "out"), expected, dim=32)
    assert not [t for t, n in stats.served_texts.items() if n > 1]
    assert run.manifest["usage"]["prompt_tokens"] == report["tokens_served"]
    assert stats.counts[Outcome.RATE_LIMITED] == run.manifest["counts"]["throttled"]
    # The summary: the provider's counts, flagged as far from ours.
    assert "by the provider's count" in summary, summary
    assert "far from 1: it counts in other units" in summary, summary
    assert_key_kept(str(tmp_path / "out"), KEY, caplog.text, summary)


def test_requests_waiting_at_the_gate_are_not_sent_after_a_fatal_answer() -> None:
    """The first request goes alone and is refused for good: those that waited are aborted,
    unsent."""
    def revoked(inputs: list[str]) -> httpx.Response | None:
        time.sleep(0.3)  # real time, so the other batches reach the gate
        return httpx.Response(401, json={"error": {"message": "bad key", "code": "invalid_api_key"}})

    server = FakeEmbeddings(revoked)
    session = EmbedSession(make_settings(max_concurrency=4), api_key=KEY,
                           transport=server.transport())
    batches = [batch_of(8, prefix) for prefix in "abcd"]
    try:
        outcomes = [f.result(timeout=30) for f in [session.submit(b) for b in batches]]
    finally:
        session.close()
    assert len(server.requests) == 1
    for batch, outcome in zip(batches, outcomes, strict=True):
        assert {r.reason for r in outcome.rejects} == {"aborted"}
        assert_accounted(batch, outcome)
