"""The fault-injection server over real HTTP on loopback.

The end-to-end fault test and ``make bench`` trust this server as their yardstick, so these tests
hold it to what they rely on: rate limits that answer like OpenAI's and that the client's own
header readers understand, each fault exactly when planned and never counted as served, the same
faults for the same seed, and figures in :meth:`FaultServer.report` that mean what they say.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pipeline.local_server import DEFAULT_MODEL, HashingEmbedder, error_reply
from tests.support.fault_server import (
    QUOTA_MESSAGE,
    FaultPlan,
    FaultServer,
    Outcome,
    format_duration,
)
from transforms.errors import (
    FatalProviderError,
    InputRejectedError,
    ProviderError,
    RateLimitedError,
)
from transforms.providers.base import (
    classify_http_error,
    error_code_and_message,
    parse_duration,
    retry_after_seconds,
)

REPO = Path(__file__).resolve().parents[1]
DIM = 16


@contextmanager
def running(
    plan: FaultPlan, *, timeout: float = 5.0, **server_args: Any
) -> Iterator[tuple[FaultServer, httpx.Client]]:
    """A live server for ``plan`` and a client of it; ``timeout`` is what makes an answer slow.

    ``server_args`` go to the server: ``poison`` and ``faults``, the base's facilities.
    """
    with (
        FaultServer(plan, dim=DIM, **server_args) as server,
        httpx.Client(base_url=server.base_url, timeout=timeout) as client,
    ):
        yield server, client


def embed(client: httpx.Client, texts: Sequence[str]) -> httpx.Response:
    return client.post("/embeddings", json={"model": DEFAULT_MODEL, "input": list(texts)})


def words(n: int, tag: str = "w") -> str:
    """A text of exactly ``n`` server-side tokens."""
    return " ".join(f"{tag}{i}" for i in range(n))


def reset_after(response: httpx.Response, kind: str) -> float:
    """``x-ratelimit-reset-{kind}`` in seconds, read as the client reads it."""
    seconds = parse_duration(response.headers[f"x-ratelimit-reset-{kind}"])
    assert seconds is not None
    return seconds


def retry_after(response: httpx.Response) -> float:
    """The wait a 429 asks for, read as the client reads it (``retry-after-ms`` first)."""
    seconds = retry_after_seconds(response.headers)
    assert seconds is not None
    return seconds


def classify(response: httpx.Response) -> ProviderError:
    """What the client makes of an error answer: proves the server speaks the client's dialect."""
    code, message = error_code_and_message(response)
    return classify_http_error(
        response.status_code, code, message, retry_after_s=retry_after_seconds(response.headers)
    )


# -- rate limits -------------------------------------------------------------------------------


def test_over_rpm_answers_429_with_retry_after_and_passes_after_the_wait() -> None:
    with running(FaultPlan(rpm=120, burst_s=0.5)) as (server, client):  # 2/s, a bucket of 1
        first = embed(client, ["a"])
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "120"
        assert first.headers["x-ratelimit-remaining-requests"] == "0"
        assert 0.25 < reset_after(first, "requests") <= 0.5
        assert "x-ratelimit-limit-tokens" not in first.headers  # no TPM limit configured

        throttled = embed(client, ["b"])
        assert throttled.status_code == 429
        error = throttled.json()["error"]
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
        assert error["message"].startswith("Rate limit reached for requests")
        assert throttled.headers["retry-after"] == "1"  # whole seconds, rounded up
        assert throttled.headers["x-ratelimit-remaining-requests"] == "0"
        wait = retry_after(throttled)
        assert 0.25 < wait <= 0.5
        assert isinstance(classify(throttled), RateLimitedError)  # retried, not fatal

        time.sleep(wait)
        assert embed(client, ["b"]).status_code == 200
        assert server.stats.texts == ("a", "b")
        assert server.fault_stats.counts[Outcome.RATE_LIMITED] == 1


def test_over_tpm_answers_429_and_a_throttled_request_consumes_nothing() -> None:
    with running(FaultPlan(tpm=600, burst_s=1.0)) as (server, client):  # 10 tokens/s, bucket 10
        first = embed(client, [words(8)])
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "600"
        assert first.headers["x-ratelimit-remaining-tokens"] == "2"
        assert "x-ratelimit-limit-requests" not in first.headers

        throttled = embed(client, [words(8)])
        assert throttled.status_code == 429
        assert throttled.json()["error"]["type"] == "tokens"
        assert throttled.json()["error"]["message"].startswith("Rate limit reached for tokens")
        wait = retry_after(throttled)
        assert 0.45 < wait <= 0.6

        # The 429 took nothing: the 2 tokens left still serve a 2-token request.
        assert embed(client, [words(2)]).status_code == 200
        retry = embed(client, [words(8)])
        assert retry.status_code == 429
        time.sleep(retry_after(retry))
        assert embed(client, [words(8)]).status_code == 200
        assert server.stats.tokens == 18


def test_a_request_larger_than_the_bucket_passes_when_full_and_is_paid_back() -> None:
    with running(FaultPlan(tpm=600, burst_s=1.0)) as (_, client):  # a bucket of 10 tokens
        oversized = embed(client, [words(15)])
        assert oversized.status_code == 200
        assert oversized.headers["x-ratelimit-remaining-tokens"] == "0"
        assert 1.4 < reset_after(oversized, "tokens") <= 1.5
        # The bucket is 5 tokens in debt: one more token takes 0.6 s to earn, not 0.1 s.
        assert 0.5 < retry_after(embed(client, [words(1)])) <= 0.6


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0ms"),
        (0.0201, "21ms"),
        (1.5, "1.5s"),
        (59.9989, "59.999s"),
        (59.9991, "1m0s"),
        (360.0, "6m0s"),
    ],
)
def test_reset_durations_are_openais_format_rounded_up(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    parsed = parse_duration(text)  # as the client reads it
    assert parsed is not None and parsed >= seconds


def test_concurrent_clients_never_get_more_than_the_limit() -> None:
    plan = FaultPlan(rpm=1200, burst_s=0.25, latency_s=0.002)  # 20 requests/s, a bucket of 5
    sent: list[int] = []

    def send_for(seconds: float, client: httpx.Client) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            response = embed(client, ["x"])
            sent.append(response.status_code)
            if response.status_code == 429:
                time.sleep(retry_after(response))

    with running(plan) as (server, client):
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: send_for(0.6, client), range(8)))
        elapsed = time.monotonic() - start
        stats = server.fault_stats
    assert stats.requests == len(sent)
    assert stats.served_requests == sent.count(200)
    assert 5 <= stats.served_requests <= 5 + 20 * elapsed
    assert set(sent) == {200, 429}


# -- latency and faults ----------------------------------------------------------------------


def test_latency_and_jitter_delay_every_answer() -> None:
    with running(FaultPlan(latency_s=0.05, jitter_s=0.05)) as (_, client):
        for _ in range(3):
            t0 = time.perf_counter()
            assert embed(client, ["a"]).status_code == 200
            assert 0.05 <= time.perf_counter() - t0 < 0.2


def expect_500(client: httpx.Client, texts: list[str]) -> None:
    response = embed(client, texts)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"


def expect_503_html(client: httpx.Client, texts: list[str]) -> None:
    response = embed(client, texts)
    assert response.status_code == 503
    assert response.headers["content-type"] == "text/html"
    assert b"503 Service Unavailable" in response.content
    assert "503 Service Unavailable" in classify(response).message


def expect_reset(client: httpx.Client, texts: list[str]) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        embed(client, texts)


def expect_slow(client: httpx.Client, texts: list[str]) -> None:
    with pytest.raises(httpx.ReadTimeout):
        embed(client, texts)
    time.sleep(0.3)  # the late answer has been written (to a closed socket) by now


def expect_truncated(client: httpx.Client, texts: list[str]) -> None:
    response = embed(client, texts)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert response.content.startswith(b'{"object": "list", "data": [')


def expect_short(client: httpx.Client, texts: list[str]) -> None:
    response = embed(client, texts)
    assert response.status_code == 200
    assert [item["index"] for item in response.json()["data"]] == list(range(len(texts) - 1))


FAULT_CASES = [
    ("p_500", Outcome.ERROR_500, expect_500),
    ("p_503_html", Outcome.ERROR_503_HTML, expect_503_html),
    ("p_reset", Outcome.RESET, expect_reset),
    ("p_slow", Outcome.SLOW, expect_slow),
    ("p_truncated", Outcome.TRUNCATED, expect_truncated),
    ("p_short", Outcome.SHORT, expect_short),
]


@pytest.mark.parametrize(
    ("field", "outcome", "expect"), FAULT_CASES, ids=[case[0] for case in FAULT_CASES]
)
def test_each_fault_at_probability_one_is_never_counted_as_served(
    field: str, outcome: Outcome, expect: Callable[[httpx.Client, list[str]], None]
) -> None:
    fault: dict[str, Any] = {field: 1.0}
    plan = FaultPlan(**fault, slow_s=0.3, rpm=600)
    with running(plan, timeout=0.1) as (server, client):
        for _ in range(2):
            expect(client, ["one", "two", "three"])
        stats = server.fault_stats
        assert server.stats.inputs == 0 and stats.tokens_served == 0
    assert stats.counts[outcome] == stats.requests == 2
    assert stats.served_requests == 0 and stats.first_ok_at is None


def test_shuffled_answers_keep_each_vector_with_its_index() -> None:
    texts = [f"document {i} about {topic}" for i, topic in enumerate("abcdefgh")]
    with running(FaultPlan(p_shuffle=1.0, seed=3)) as (server, client):
        data = embed(client, texts).json()["data"]
        stats = server.fault_stats
    indices = [item["index"] for item in data]
    assert sorted(indices) == list(range(len(texts))) and indices != sorted(indices)
    expected = HashingEmbedder(DIM).embed(texts)
    for item in data:
        np.testing.assert_allclose(item["embedding"], expected[item["index"]], atol=1e-6)
    assert stats.counts[Outcome.SHUFFLED] == stats.served_requests == 1
    assert stats.served_texts == {text: 1 for text in texts}  # shuffled is intact: served


def test_a_poisoned_input_fails_the_whole_request_naming_its_index() -> None:
    plan = FaultPlan(rpm=600)  # a bucket of 20 requests
    with running(plan, poison="<<poison>>") as (server, client):
        poisoned = embed(client, ["fine", "bad <<poison>> text", "fine too"])
        assert poisoned.status_code == 400
        error = poisoned.json()["error"]
        assert error["code"] == "invalid_request" and error["param"] == "input"
        assert "input[1]" in error["message"]
        assert isinstance(classify(poisoned), InputRejectedError)  # so the client bisects
        assert poisoned.headers["x-ratelimit-remaining-requests"] == "20"  # took no budget

        clean = embed(client, ["fine", "fine too"])
        assert clean.status_code == 200
        assert clean.headers["x-ratelimit-remaining-requests"] == "19"
        assert server.stats.texts == ("fine", "fine too")
        assert server.fault_stats.counts[Outcome.POISONED] == 1


def test_quota_runs_out_after_n_served_requests_and_is_fatal() -> None:
    with running(FaultPlan(quota_after=2)) as (server, client):
        assert [embed(client, ["same"]).status_code for _ in range(2)] == [200, 200]
        for _ in range(2):
            refused = embed(client, ["same"])
            assert refused.status_code == 429
            assert refused.json()["error"] == {
                "message": QUOTA_MESSAGE,
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
            assert isinstance(classify(refused), FatalProviderError)
        stats = server.fault_stats
    assert stats.counts[Outcome.QUOTA_EXHAUSTED] == 2
    assert stats.served_texts == {"same": 2}

    # Faulty answers are not served, so they do not use the quota up.
    with running(FaultPlan(quota_after=1, p_500=1.0)) as (_, client):
        assert [embed(client, ["a"]).status_code for _ in range(3)] == [500, 500, 500]


# -- determinism and the report ----------------------------------------------------------------

MIXED: dict[str, Any] = {
    "p_500": 0.15,
    "p_503_html": 0.1,
    "p_reset": 0.1,
    "p_truncated": 0.1,
    "p_short": 0.1,
    "p_shuffle": 0.2,
}


def observed_faults(seed: int, n_requests: int = 30) -> list[str]:
    """What a client sees of ``n_requests`` sequential requests, one label per request."""
    texts = [words(3, tag) for tag in "abcd"]
    labels = []
    with running(FaultPlan(seed=seed, **MIXED)) as (_, client):
        for _ in range(n_requests):
            try:
                response = embed(client, texts)
            except httpx.RemoteProtocolError:
                labels.append("reset")
                continue
            if response.status_code != 200:
                labels.append(str(response.status_code))
            elif not response.content.endswith(b"}"):
                labels.append("truncated")
            else:
                indices = [item["index"] for item in response.json()["data"]]
                labels.append("short" if len(indices) < 4 else f"ok{indices}")
    return labels


def test_the_same_seed_gives_the_same_faults_in_the_same_order() -> None:
    first = observed_faults(seed=11)
    assert observed_faults(seed=11) == first
    assert observed_faults(seed=12) != first
    kinds = {"ok" if label.startswith("ok") else label for label in first}
    assert kinds == {"ok", "500", "503", "reset", "truncated", "short"}  # every planned fault
    assert any(label.startswith("ok") and label != "ok[0, 1, 2, 3]" for label in first)  # shuffled


def test_report_of_a_client_that_obeys_retry_after_shows_the_limit_saturated() -> None:
    plan = FaultPlan(tpm=6000, burst_s=0.1, latency_s=0.005)  # 100 tokens/s, a bucket of 10
    statuses: list[int] = []
    with running(plan) as (server, client):
        while statuses.count(200) < 12:
            response = embed(client, [words(10, tag=f"r{len(statuses)}x")])
            statuses.append(response.status_code)
            if response.status_code == 429:
                time.sleep(retry_after(response))
        report = server.report()
    assert report["requests"] == len(statuses)
    assert report["outcomes"]["ok"] == report["served_requests"] == 12
    assert report["outcomes"]["rate_limited"] == statuses.count(429) > 0
    assert report["share_429"] == pytest.approx(statuses.count(429) / len(statuses))
    assert report["tokens_served"] == 120
    # 11 answers of 10 tokens after the first one, at the limit of 100 tokens a second.
    assert report["tokens_per_minute"] == pytest.approx(110 * 60 / report["ok_span_s"])
    assert 0.8 < report["efficiency"] <= 1.05
    assert report["requests_per_minute"] == pytest.approx(11 * 60 / report["ok_span_s"])
    assert report["request_efficiency"] is None  # no RPM limit
    assert report["duplicated_texts"] == 0
    json.dumps(report)  # the benchmark reads it over HTTP


def test_runs_in_another_process_and_reports_over_http() -> None:
    command = [sys.executable, "-m", "tests.support.fault_server", "--port", "0", "--rpm", "60",
               "--latency", "0.01", "--p-500", "0"]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            base_url = proc.stdout.readline().strip()
            with httpx.Client(base_url=base_url, timeout=5) as client:
                response = embed(client, ["hello"])
                report = client.get("/fault/report").json()
        finally:
            proc.terminate()
    assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-requests"] == "60"
    assert report["outcomes"]["ok"] == report["requests"] == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"p_500": 0.6, "p_reset": 0.5}, "add up to 1.1"),
        ({"p_short": -0.1}, "p_short"),
        ({"tpm": 0}, "tpm"),
        ({"burst_s": 0.0}, "burst_s"),
        ({"quota_after": -1}, "quota_after"),
    ],
)
def test_inconsistent_plans_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultPlan(**fields)


def test_an_empty_poison_marker_is_refused() -> None:
    with pytest.raises(ValueError, match="poison marker must not be empty"):
        FaultServer(FaultPlan(), poison="")  # every input would contain it


def test_a_scheduled_reply_pre_empts_the_plan_and_is_not_judged() -> None:
    """The base's fault schedule works here as in every dialect: it answers before the plan."""
    teapot = error_reply(418, "scripted", error_type="server_error")
    with running(FaultPlan(rpm=600), faults={2: teapot}) as (server, client):
        statuses = [embed(client, ["a"]).status_code for _ in range(3)]
        stats = server.fault_stats
        assert server.stats.texts == ("a", "a")
    assert statuses == [200, 418, 200]
    assert stats.requests == stats.counts[Outcome.OK] == 2  # the scripted one was not judged


def test_the_poison_flag_of_the_command_line_poisons() -> None:
    command = [sys.executable, "-m", "tests.support.fault_server", "--port", "0",
               "--poison", "<<a>>", "--poison", "<<b>>"]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            with httpx.Client(base_url=proc.stdout.readline().strip(), timeout=5) as client:
                statuses = [embed(client, [text]).status_code
                            for text in ("fine", "x <<b>>", "<<a>> y")]
        finally:
            proc.terminate()
    assert statuses == [200, 400, 400]
