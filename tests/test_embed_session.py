"""The embed session without Beam: ``httpx.MockTransport`` for the provider, a fake clock for
every wait, so nothing here sleeps.

Session cases: poison in a batch of 64, a learned request cap, an abort while requests are in
flight, retries exhausted, an envelope job polled on the session's clock. Then the parts alone:
:func:`~transforms.bisection.bisect` (example and property tests),
:class:`~transforms.bisection.RequestCap`, :class:`~transforms.abort.AbortFlag`,
:class:`~transforms.usage.UsageRows` and :class:`~transforms.metered.MeteredCall`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fakes import FakeClock, make_chunk
from transforms.abort import AbortFlag
from transforms.bisection import Refused, RequestCap, bisect, spans
from transforms.embed_session import BatchOutcome, EmbedSession, EmbedSettings
from transforms.errors import (
    FatalProviderError,
    InputRejectedError,
    RateLimitedError,
    RequestTooLargeError,
    RetryableError,
)
from transforms.limits import RateLimiter, RateLimits
from transforms.metered import MeteredCall
from transforms.pack import make_request_batch
from transforms.providers.base import EmbeddingResult
from transforms.providers.envelope import EnvelopeConfig
from transforms.providers.openai import OpenAIConfig
from transforms.retry import RetryPolicy
from transforms.types import (
    ABORTED,
    OUTCOME_FAILED,
    OUTCOME_OK,
    OUTCOME_RETRY,
    PROVIDER_REJECTED,
    RETRIES_EXHAUSTED,
    STAGE_EMBED,
    Chunk,
    RequestBatch,
)
from transforms.usage import Attempt, UsageRows

BASE_URL = "http://embed.test/v1"
MODEL = "embed-test"
KEY = "sk-test-0123456789abcdefghij"
DIM = 8
#: Budgets no test comes near, so the limiter never waits unless a test makes it.
UNLIMITED = RateLimits(requests_per_minute=6e6, tokens_per_minute=1e12)

Rule = Callable[[list[str]], "httpx.Response | None"]


def vector_of(text: str) -> list[float]:
    """The fake model: a vector only ``text`` maps to, so misalignment cannot go unseen."""
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 255.0 for b in digest[:DIM]]


def error(status: int, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


class FakeEmbeddings:
    """An OpenAI-style ``/embeddings`` behind ``httpx.MockTransport``; records what it was sent.

    ``rule`` sees each request's inputs and may answer instead of the model (an error); it runs
    on the session's threads, so the record is kept under a lock.
    """

    def __init__(self, rule: Rule | None = None, clock: FakeClock | None = None) -> None:
        self.rule = rule
        self.clock = clock
        self.requests: list[list[str]] = []
        self.times: list[float] = []  # the fake clock at each request
        self.statuses: list[int] = []
        self._lock = threading.Lock()

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        inputs = json.loads(request.content)["input"]
        with self._lock:
            self.requests.append(inputs)
            if self.clock is not None:
                self.times.append(self.clock.now())
        response = self.rule(inputs) if self.rule is not None else None
        if response is None:
            response = httpx.Response(200, json={
                "data": [{"index": i, "embedding": vector_of(t)} for i, t in enumerate(inputs)],
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            })
        with self._lock:
            self.statuses.append(response.status_code)
        return response

    @property
    def sizes(self) -> list[int]:
        return [len(r) for r in self.requests]


def make_settings(
    *, retry: RetryPolicy | None = None, max_concurrency: int = 4, provider: Any = None,
    **provider_keys: Any,
) -> EmbedSettings:
    cfg = provider or OpenAIConfig(
        kind="openai", base_url=BASE_URL, model=MODEL, api_key_env="EMBED_TEST_KEY",
        encoding_format="float", **provider_keys,
    )
    return EmbedSettings(
        run_id="test-run", provider=cfg, limits=UNLIMITED, max_concurrency=max_concurrency,
        retry=retry or RetryPolicy(max_attempts=3, max_wait_s=10.0, initial_wait_s=1.0),
        progress_interval_s=None,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def open_session(clock: FakeClock) -> Iterator[Callable[..., EmbedSession]]:
    """``open_session(server, **settings)``: a session on ``server``'s transport and the clock."""
    sessions: list[EmbedSession] = []

    def make(server: FakeEmbeddings, **settings: Any) -> EmbedSession:
        session = EmbedSession(make_settings(**settings), api_key=KEY, clock=clock,
                               transport=server.transport())
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        session.close()


def batch_of(n: int, prefix: str = "d") -> RequestBatch:
    chunks = tuple(make_chunk(f"{prefix}{i}", 0, f"{prefix} text {i}") for i in range(n))
    return make_request_batch(chunks)


def embedded(outcome: BatchOutcome) -> dict[str, np.ndarray]:
    """Chunk id → vector over every batch, checking each row belongs to its chunk's text."""
    out: dict[str, np.ndarray] = {}
    for batch in outcome.batches:
        assert batch.model == MODEL
        assert batch.vectors.shape == (len(batch.chunks), DIM)
        for chunk, row in zip(batch.chunks, batch.vectors, strict=True):
            np.testing.assert_allclose(row, vector_of(chunk.text), rtol=1e-6)
            assert chunk.chunk_id not in out
            out[chunk.chunk_id] = row
    return out


def assert_accounted(batch: RequestBatch, outcome: BatchOutcome) -> None:
    """Every chunk of ``batch`` is embedded or rejected, exactly once."""
    done = list(embedded(outcome)) + [r.id for r in outcome.rejects]
    assert sorted(done) == sorted(c.chunk_id for c in batch.chunks)


# -- the session -------------------------------------------------------------------------------


def test_one_poisoned_input_in_64_is_rejected_alone(
    open_session: Callable[..., EmbedSession], clock: FakeClock,
) -> None:
    batch = batch_of(64)
    poison = batch.chunks[37]

    def refuse_poison(inputs: list[str]) -> httpx.Response | None:
        if poison.text in inputs:
            return error(400, {"error": {"message": "input contains unsafe content",
                                         "code": "content_filter"}})
        return None

    server = FakeEmbeddings(refuse_poison)
    outcome = open_session(server).embed_batch(batch)

    assert [(r.id, r.reason, r.attempts, r.stage) for r in outcome.rejects] == [
        (poison.chunk_id, PROVIDER_REJECTED, 1, STAGE_EMBED)]
    assert outcome.rejects[0].detail == "HTTP 400 content_filter: input contains unsafe content"
    assert set(embedded(outcome)) == {c.chunk_id for c in batch.chunks} - {poison.chunk_id}
    assert_accounted(batch, outcome)
    # 64, then both halves at each of six levels: 2·log2(64) + 1 requests, none retried.
    assert len(server.requests) == 2 * int(math.log2(64)) + 1 == 13
    # the halves of a failed request may go in either order; the poison ends up sent alone
    assert server.sizes[0] == 64 and [poison.text] in server.requests
    assert [u.outcome for u in outcome.usage].count(OUTCOME_FAILED) == 7  # 64, 32, ... 1
    assert [u.outcome for u in outcome.usage].count(OUTCOME_OK) == 6
    assert len({u.request_id for u in outcome.usage}) == 13
    assert outcome.fatal is None
    assert clock.sleeps == []


def test_a_stated_cap_is_learned_once_and_obeyed_by_later_bundles(
    open_session: Callable[..., EmbedSession], caplog: pytest.LogCaptureFixture,
) -> None:
    def tei_cap(inputs: list[str]) -> httpx.Response | None:  # text-embeddings-inference's 413
        if len(inputs) > 8:
            return error(413, {"error": f"batch size {len(inputs)} > maximum allowed batch "
                                        "size 8", "error_type": "Validation"})
        return None

    server = FakeEmbeddings(tei_cap)
    session = open_session(server)
    first, second = batch_of(64, "a"), batch_of(64, "b")
    with caplog.at_level(logging.WARNING):
        outcomes = [session.embed_batch(first), session.embed_batch(second)]

    assert session.cap.value == 8
    assert server.statuses.count(413) == 1
    assert server.sizes == [64] + [8] * 8 + [8] * 8
    assert sum("caps requests at 8 inputs" in r.getMessage() for r in caplog.records) == 1
    for batch, outcome in zip((first, second), outcomes, strict=True):
        assert outcome.rejects == []
        assert len(embedded(outcome)) == 64
        assert_accounted(batch, outcome)


def test_an_oversized_request_without_a_stated_cap_is_only_bisected(
    open_session: Callable[..., EmbedSession],
) -> None:
    server = FakeEmbeddings(lambda inputs: error(413, {"error": {"message": "payload too large"}})
                            if len(inputs) > 20 else None)
    session = open_session(server)
    outcome = session.embed_batch(batch_of(64))
    assert server.sizes == [64, 32, 16, 16, 32, 16, 16]
    assert len(embedded(outcome)) == 64
    assert session.cap.value == 256  # the configured cap: nothing was stated to learn


def test_a_fatal_answer_aborts_the_session_while_others_are_in_flight(
    open_session: Callable[..., EmbedSession],
) -> None:
    in_flight, release = threading.Event(), threading.Event()
    slow, refused, late = batch_of(64, "slow"), batch_of(4, "refused"), batch_of(5, "late")

    def rule(inputs: list[str]) -> httpx.Response | None:
        if inputs[0].startswith("refused"):  # the key was revoked: the API echoes part of it
            return error(401, {"error": {"message": f"Incorrect API key provided: {KEY}",
                                         "code": "invalid_api_key"}})
        if inputs[0] == slow.chunks[0].text:
            in_flight.set()
            if not release.wait(timeout=30):  # a hang guard, not a wait the test relies on
                return error(500, {"error": {"message": "the test never released"}})
        return None

    server = FakeEmbeddings(rule)
    session = open_session(server, max_inputs_per_request=8)
    # A session's first request goes alone (the RequestCap gate): answered, the two below
    # are sent side by side.
    assert len(embedded(session.embed_batch(batch_of(8, "warm")))) == 8
    pending = session.submit(slow)  # 8 requests of 8, one at a time; the first one hangs
    assert in_flight.wait(timeout=30)
    aborting = session.submit(refused).result(timeout=30)
    release.set()
    finished = pending.result(timeout=30)
    after = session.embed_batch(late)

    message = session.abort.message
    assert message is not None and message.startswith(
        "the provider refused the run: HTTP 401 invalid_api_key: Incorrect API key provided:")
    assert KEY not in message and "[REDACTED]" in message
    # The refused request's chunks: aborted after one attempt; the run's one fatal line.
    assert {(r.reason, r.attempts, r.detail) for r in aborting.rejects} == {(ABORTED, 1, message)}
    assert aborting.fatal == message
    # The request in flight finishes; the seven not yet sent never are.
    assert set(embedded(finished)) == {c.chunk_id for c in slow.chunks[:8]}
    assert len(finished.rejects) == 56
    assert {(r.reason, r.attempts, r.detail) for r in finished.rejects} == {(ABORTED, 0, message)}
    assert_accounted(slow, finished)
    assert finished.fatal is None  # reported once, by the first outcome after the abort
    # A batch after the abort sends nothing at all.
    assert after.batches == [] and after.usage == [] and after.fatal is None
    assert {(r.reason, r.attempts) for r in after.rejects} == {(ABORTED, 0)}
    assert_accounted(late, after)
    assert len(server.requests) == 3  # the warm-up, the slow one and the refused one
    assert [(u.outcome, u.http_status) for u in aborting.usage] == [(OUTCOME_FAILED, 401)]
    assert [u.outcome for u in finished.usage] == [OUTCOME_OK]


def test_a_missing_key_aborts_before_anything_is_sent(clock: FakeClock) -> None:
    server = FakeEmbeddings()
    session = EmbedSession(make_settings(), api_key=None, clock=clock,
                           transport=server.transport())
    try:
        outcome = session.embed_batch(batch_of(3))
    finally:
        session.close()
    assert server.requests == []
    assert outcome.fatal is not None and "EMBED_TEST_KEY is not set" in outcome.fatal
    assert {(r.reason, r.attempts) for r in outcome.rejects} == {(ABORTED, 0)}


@pytest.mark.parametrize("retry_after", [None, "2"])
def test_a_persistent_503_exhausts_the_retries_on_the_fake_clock(
    open_session: Callable[..., EmbedSession], clock: FakeClock, retry_after: str | None,
) -> None:
    headers = {"Retry-After": retry_after} if retry_after else {}
    server = FakeEmbeddings(lambda inputs: error(503, {"error": {"message": "overloaded"}},
                                                 **headers), clock=clock)
    policy = RetryPolicy(max_attempts=4, max_wait_s=30.0, initial_wait_s=1.0)
    batch = batch_of(5)
    start = clock.now()
    outcome = open_session(server, retry=policy).embed_batch(batch)

    assert len(server.requests) == 4
    assert {(r.reason, r.attempts, r.detail) for r in outcome.rejects} == {
        (RETRIES_EXHAUSTED, 4, "gave up after 4 attempts: HTTP 503: overloaded")}
    assert_accounted(batch, outcome)
    assert [(u.attempt, u.outcome, u.http_status) for u in outcome.usage] == [
        (1, OUTCOME_RETRY, 503), (2, OUTCOME_RETRY, 503), (3, OUTCOME_RETRY, 503),
        (4, OUTCOME_FAILED, 503)]
    assert outcome.fatal is None
    # Three waits, one before each retry; the clock moved by exactly those and nothing else.
    assert len(clock.sleeps) == 3
    assert clock.now() - start == pytest.approx(sum(clock.sleeps))
    assert np.diff(server.times) == pytest.approx(clock.sleeps)
    if retry_after is None:  # full-jitter exponential backoff: wait k is within [0, 2^(k-1)]
        assert all(0 <= s <= 2 ** k for k, s in enumerate(clock.sleeps))
    else:  # the server's Retry-After, plus at most a quarter second of jitter
        assert all(2.0 <= s <= 2.25 for s in clock.sleeps)
        assert clock.now() - start >= 6.0


def test_the_session_clock_times_an_envelope_job_without_a_monkeypatch(clock: FakeClock) -> None:
    polls: list[float] = []
    texts: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            texts.extend(json.loads(request.content)["input"])
            return httpx.Response(200, json={"success": True, "code": "200", "message": "queued",
                                             "data": {"id": "job-1", "status": "PENDING"}})
        assert request.url.path == "/api/v1/embeddings/job-1"
        polls.append(clock.now())
        if len(polls) < 3:
            return httpx.Response(200, json={"success": True, "code": "200", "message": "",
                                             "data": {"id": "job-1", "status": "RUNNING"}})
        return httpx.Response(200, json={"success": True, "code": "200", "message": "", "data": {
            "id": "job-1", "status": "COMPLETED",
            "data": [{"index": i, "embedding": vector_of(t)} for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": 7, "total_tokens": 7}}})

    cfg = EnvelopeConfig(kind="envelope", base_url="http://envelope.test", model=MODEL,
                         api_key_env=None, encoding_format="float")
    session = EmbedSession(make_settings(provider=cfg), api_key=None, clock=clock,
                           transport=httpx.MockTransport(handle))
    try:
        batch = batch_of(3)
        outcome = session.embed_batch(batch)
    finally:
        session.close()
    assert session.provider.clock is clock
    assert clock.sleeps == pytest.approx([0.2, 0.3, 0.45])  # PollBackoff's defaults
    assert len(embedded(outcome)) == 3 and outcome.rejects == []
    [row] = outcome.usage  # submission and polls are one attempt, timed on the same clock
    assert row.outcome == OUTCOME_OK and row.provider_request_id == "job-1"
    assert row.latency_ms == pytest.approx(950.0)


# -- bisection ---------------------------------------------------------------------------------


class Recorder:
    """A ``call`` for :func:`bisect` over strings: refuses spans holding a bad item."""

    def __init__(self, bad: set[int] = frozenset(), cap: int | None = None,  # type: ignore[assignment]
                 stated: bool = True) -> None:
        self.bad, self.cap, self.stated = bad, cap, stated
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def __call__(self, offset: int, span: Sequence[int]) -> tuple[int, ...]:
        self.calls.append((offset, tuple(span)))
        if self.cap is not None and len(span) > self.cap:
            raise RequestTooLargeError("too many", max_inputs=self.cap if self.stated else None)
        if self.bad & set(span):
            raise InputRejectedError("bad item")
        return tuple(span)


def test_bisect_calls_once_when_nothing_is_refused() -> None:
    call = Recorder()
    assert list(bisect(range(10), call)) == [tuple(range(10))]
    assert call.calls == [(0, tuple(range(10)))]


def test_bisect_isolates_each_bad_item_and_keeps_order_and_offsets() -> None:
    call = Recorder(bad={3, 4, 9})
    answers = list(bisect(list(range(10)), call, offset=100))
    refused = [a for a in answers if isinstance(a, Refused)]
    assert [(r.offset, list(r.items)) for r in refused] == [(103, [3]), (104, [4]), (109, [9])]
    assert all(isinstance(r.error, InputRejectedError) for r in refused)
    flat = [x for a in answers for x in (a.items if isinstance(a, Refused) else a)]
    assert flat == list(range(10))
    assert all(offset == 100 + span[0] for offset, span in call.calls)


def test_bisect_obeys_a_stated_cap_and_reports_it_first() -> None:
    learned: list[int] = []
    call = Recorder(cap=3)
    answers = list(bisect(list(range(10)), call, on_cap=learned.append))
    assert learned == [3]
    assert answers == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9,)]
    assert [len(s) for _, s in call.calls] == [10, 3, 3, 3, 1]


def test_bisect_halves_without_a_stated_cap_and_learns_nothing() -> None:
    learned: list[int] = []
    call = Recorder(cap=3, stated=False)
    answers = list(bisect(list(range(8)), call, on_cap=learned.append))
    assert learned == []
    assert [len(s) for _, s in call.calls] == [8, 4, 2, 2, 4, 2, 2]
    assert [x for a in answers for x in a] == list(range(8))  # type: ignore[union-attr]


def test_bisect_refuses_a_lone_item_over_the_cap_without_learning() -> None:
    learned: list[int] = []
    [answer] = bisect([7], Recorder(cap=0), on_cap=learned.append)
    assert isinstance(answer, Refused) and isinstance(answer.error, RequestTooLargeError)
    assert learned == []


@pytest.mark.parametrize("error", [RetryableError("busy"), FatalProviderError("bad key"),
                                   ValueError("a bug")])
def test_bisect_splits_on_per_input_errors_only(error: Exception) -> None:
    def call(offset: int, span: Sequence[int]) -> None:
        raise error

    with pytest.raises(type(error)):
        list(bisect([1, 2, 3], call))


def test_spans_cut_in_order() -> None:
    assert list(spans([1, 2, 3, 4, 5], 2, offset=10)) == [(10, [1, 2]), (12, [3, 4]), (14, [5])]
    assert list(spans([], 4)) == []


@given(n=st.integers(1, 300), data=st.data())
def test_bisect_isolates_one_poison_in_logarithmic_calls(n: int, data: st.DataObject) -> None:
    poison = data.draw(st.integers(0, n - 1))
    call = Recorder(bad={poison})
    answers = list(bisect(list(range(n)), call))
    assert [a.items for a in answers if isinstance(a, Refused)] == [[poison]]
    kept = [x for a in answers if not isinstance(a, Refused) for x in a]
    assert kept == [i for i in range(n) if i != poison]
    assert len(call.calls) <= 2 * math.ceil(math.log2(n)) + 1


@given(n=st.integers(1, 200), bad=st.sets(st.integers(0, 199)), cap=st.none() | st.integers(1, 50))
def test_bisect_answers_every_item_exactly_once(n: int, bad: set[int], cap: int | None) -> None:
    bad = {b for b in bad if b < n}
    call = Recorder(bad=bad, cap=cap)
    answers = list(bisect(list(range(n)), call))
    refused = sorted(x for a in answers if isinstance(a, Refused) for x in a.items)
    kept = [x for a in answers if not isinstance(a, Refused) for x in a]
    assert refused == sorted(bad)
    assert sorted(kept + refused) == list(range(n))
    assert all(len(a) <= (cap or n) for a in answers if not isinstance(a, Refused))


# -- the small parts ---------------------------------------------------------------------------


def test_request_cap_only_shrinks() -> None:
    cap = RequestCap(64)
    assert cap.value == 64
    assert cap.learn(100) is False and cap.value == 64
    assert cap.learn(8) is True and cap.value == 8
    assert cap.learn(8) is False and cap.learn(0) is True and cap.value == 1


def test_abort_flag_keeps_the_first_reason_and_reports_it_once() -> None:
    flag = AbortFlag()
    assert flag.message is None and not flag.is_set and flag.report_once() is None
    assert flag.set("HTTP 401: bad key") == "HTTP 401: bad key"
    assert flag.set("HTTP 403: another thread") == "HTTP 401: bad key"
    assert flag.is_set and flag.message == "HTTP 401: bad key"
    assert flag.report_once() == "HTTP 401: bad key"
    assert flag.report_once() is None


STARTED = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def attempt(number: int = 1) -> Attempt:
    return Attempt(request_id=f"b1:0+4:{number}", n_inputs=4, number=number, started_at=STARTED,
                   latency_ms=12.5)


def test_usage_rows_of_an_answer() -> None:
    rows = UsageRows(model=MODEL, worker="host:1")
    result = EmbeddingResult(vectors=np.zeros((4, DIM), np.float32), prompt_tokens=40,
                             total_tokens=41, tokens_estimated=False, http_status=200,
                             provider_request_id="req-9", served_model="served-model")
    row = rows.answered(attempt(), result)
    assert dataclasses.asdict(row) == {
        "request_id": "b1:0+4:1", "provider_request_id": "req-9", "model": MODEL, "n_inputs": 4,
        "prompt_tokens": 40, "total_tokens": 41, "tokens_estimated": False, "attempt": 1,
        "http_status": 200, "outcome": OUTCOME_OK, "error": None, "latency_ms": 12.5,
        "started_at": STARTED, "worker": "host:1", "served_model": "served-model",
        "mode": "online", "batch_id": None,  # batch mode's columns (issue 13)
        # Issue 14: a multimodal answer's tokens by kind; a text answer states none.
        "text_tokens": None, "image_tokens": None,
    }


@pytest.mark.parametrize(("will_retry", "outcome"), [(True, OUTCOME_RETRY),
                                                     (False, OUTCOME_FAILED)])
def test_usage_rows_of_an_error(will_retry: bool, outcome: str) -> None:
    rows = UsageRows(model=MODEL, worker="host:1")
    exc = RateLimitedError("slow down", http_status=429, provider_request_id="req-3")
    row = rows.failed(attempt(2), exc, detail="HTTP 429: slow down", will_retry=will_retry)
    assert (row.outcome, row.error, row.http_status, row.provider_request_id) == (
        outcome, "HTTP 429: slow down", 429, "req-3")
    assert (row.prompt_tokens, row.total_tokens, row.tokens_estimated) == (0, 0, True)
    assert (row.attempt, row.request_id, row.model, row.worker) == (2, "b1:0+4:2", MODEL, "host:1")


def test_usage_rows_and_attempts_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        UsageRows(model=MODEL, worker="w").model = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        attempt().number = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        UsageRows(MODEL, "w")  # type: ignore[misc]  # keyword fields only


def test_metered_call_slows_down_on_a_429_and_accounts_every_attempt(clock: FakeClock) -> None:
    limiter = RateLimiter(UNLIMITED, clock=clock)
    metered = MeteredCall(limiter=limiter, retry=RetryPolicy(max_attempts=3), clock=clock,
                          rows=UsageRows(model=MODEL, worker="w"))
    answers: list[Exception | EmbeddingResult] = [
        RateLimitedError("slow down", http_status=429, retry_after_s=1.5),
        EmbeddingResult(vectors=np.ones((2, DIM), np.float32), prompt_tokens=30,
                        total_tokens=30, tokens_estimated=False, http_status=200),
    ]

    def send() -> EmbeddingResult:
        clock.sleep(0.25)  # the provider takes a quarter second to answer
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    usage: list[Any] = []
    result = metered(send, request_id="b:0+2", n_inputs=2, est_tokens=20, usage=usage)
    assert result.prompt_tokens == 30
    assert [(u.request_id, u.outcome, u.latency_ms) for u in usage] == [
        ("b:0+2:1", OUTCOME_RETRY, 250.0), ("b:0+2:2", OUTCOME_OK, 250.0)]
    assert limiter.factor == pytest.approx(0.5 + RateLimiter.INCREASE)  # halved, then one success
    assert limiter.calibration > 1.0  # the provider counted more tokens than estimated
    assert sum(clock.sleeps) >= 0.25 + 1.5 + 0.25  # two answers and the Retry-After


def test_chunk_helper_is_what_the_session_sees() -> None:  # guards the fixtures above
    chunk: Chunk = batch_of(1).chunks[0]
    assert (chunk.chunk_id, chunk.text, chunk.n_tokens) == ("d0#0", "d text 0", 1)
