"""The local server's base: one fault schedule and one poison facility, the same in every dialect.

Each dialect (OpenAI's, Ark's, the envelope API's, the fault server's) is an app on
:class:`~pipeline.local_server.LoopbackServer`; these tests hold every one of them to the same
schedule (turn numbers, ``next``, ``always``) and the same poison, over real HTTP on loopback,
and the schedule itself to its rules without a server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from pipeline.local_server import (
    DEFAULT_MODEL,
    EmbeddingServer,
    FaultSchedule,
    LoopbackServer,
    Poison,
    Reply,
    error_reply,
)
from tests.support.ark_server import ArkServer, Fault
from tests.support.envelope_server import SUBMIT_PATH, EnvelopeServer, envelope_error
from tests.support.fault_server import FaultPlan, FaultServer
from tests.support.fixtures import Serve


@dataclass(frozen=True)
class Dialect:
    """How to start one dialect's server, send it one embedding request, and what it refuses."""

    name: str
    start: Callable[..., LoopbackServer]
    path: str  # the embedding path, relative to the host root
    model: str
    fault: Callable[[], Reply]  # an error in this dialect's own shape

    def embed(self, server: LoopbackServer, client: httpx.Client, texts: list[str]) -> Any:
        """(status, whether the answer refused the request) for one embedding request."""
        response = client.post(server.root_url + self.path,
                               json={"model": self.model, "input": texts})
        body = response.json()
        refused = response.status_code != 200 or body.get("success") is False
        return response.status_code, refused


DIALECTS = [
    Dialect("openai", lambda **kw: EmbeddingServer(dim=16, **kw), "/v1/embeddings",
            DEFAULT_MODEL, lambda: error_reply(503, "busy", error_type="server_error")),
    Dialect("faults", lambda **kw: FaultServer(FaultPlan(), dim=16, **kw), "/v1/embeddings",
            DEFAULT_MODEL, lambda: error_reply(503, "busy", error_type="server_error")),
    Dialect("ark", lambda **kw: ArkServer(models={"ep-test": 16}, **kw), "/api/v3/embeddings",
            "ep-test", Fault(503, "ServerOverloaded")),
    Dialect("envelope", lambda **kw: EnvelopeServer(dim=16, **kw), SUBMIT_PATH, DEFAULT_MODEL,
            lambda: envelope_error("503", "busy")),
]


@pytest.fixture(params=DIALECTS, ids=[d.name for d in DIALECTS])
def dialect(request: pytest.FixtureRequest) -> Dialect:
    return request.param


def test_every_dialect_answers_scheduled_turns_with_the_scripted_reply(
        dialect: Dialect, serve: Serve) -> None:
    server = serve(dialect.start, faults={2: dialect.fault})
    server.schedule(None, None, dialect.fault)  # turn 3, after the two queued before it
    with httpx.Client(timeout=5) as client:
        refused = [dialect.embed(server, client, [f"text {n}"])[1] for n in range(5)]
        server.fail_always(dialect.fault)
        assert dialect.embed(server, client, ["late"])[1]
        server.fail_always(None)
        assert not dialect.embed(server, client, ["later"])[1]
    assert refused == [False, True, True, False, False]
    assert server.faults.taken == 7
    assert server.stats.texts == ("text 0", "text 3", "text 4", "later")  # none faulted served


def test_every_dialect_refuses_a_poisoned_request_and_serves_the_rest(
        dialect: Dialect, serve: Serve) -> None:
    server = serve(dialect.start, poison=("<<a>>", "<<b>>"))
    with httpx.Client(timeout=5) as client:
        poisoned = dialect.embed(server, client, ["fine", "bad <<b>> text"])
        clean = dialect.embed(server, client, ["fine", "also fine"])
    assert poisoned[1] and not clean[1]
    assert server.stats.texts == ("fine", "also fine")


def test_the_schedule_numbers_turns_and_queues_after_what_is_queued() -> None:
    schedule = FaultSchedule({4: Reply(504)})
    schedule.next(Reply(500), None)  # turns 1 and 2
    schedule.next(Reply(502))  # turn 3: after the two queued before
    built: list[int] = []

    def fresh() -> Reply:  # a callable is built at its turn, not when scheduled
        built.append(schedule.taken)
        return Reply(501)

    schedule.at(6, fresh)
    statuses = [r and r.status for r in (schedule.take() for _ in range(7))]
    assert statuses == [500, None, 502, 504, None, 501, None]
    assert schedule.taken == 7 and built == [6]
    schedule.always(Reply(429))
    schedule.at(9, Reply(400))
    assert [r and r.status for r in (schedule.take(), schedule.take())] == [429, 400]
    schedule.next(Reply(418))  # queued from the turns not yet taken
    assert schedule.take().status == 418  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="numbered from 1"):
        schedule.at(0, Reply(500))


def test_poison_finds_the_first_input_holding_any_marker() -> None:
    poison = Poison.of(["<<a>>", "<<b>>"])
    assert poison.find(["x", "y <<b>>", "<<a>>"]) == (1, "<<b>>")
    assert poison.find(["clean"]) is None
    assert Poison.of("m") == Poison(("m",)) and not Poison.of(None)
    with pytest.raises(ValueError, match="must not be empty"):
        Poison.of(["ok", ""])
