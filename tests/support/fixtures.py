"""The loopback servers as pytest fixtures; ``tests/conftest.py`` registers them for the suite.

Every server is started for the test that asks for it and stopped when it ends, whatever the
outcome: :func:`serve` starts any server class (a test's own subclass included), and the named
fixtures are the common ones, as factories where tests configure them::

    def test_poison_is_isolated(fault_server, tmp_path):
        server = fault_server(FaultPlan(p_500=0.1), dim=32, poison="XPOISONX")
        ...  # point the config at server.base_url

    def test_ark_quota(ark_server):
        server = ark_server(models={"ep-test": 32})
        server.fail_always(Fault(429, "QuotaExceeded"))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol, TypeVar

import pytest

from pipeline.local_server import EmbeddingServer, LoopbackServer
from tests.support.ark_server import ArkServer
from tests.support.envelope_server import EnvelopeServer
from tests.support.fault_server import FaultServer
from tests.support.harness import MODEL

__all__ = ["ark_server", "embedding_server", "envelope_server", "fault_server", "serve"]

S = TypeVar("S", bound=LoopbackServer)


class Serve(Protocol):
    """``serve(ServerClass, *args, **kwargs)``: the server built, started, and stopped at teardown."""

    def __call__(self, factory: Callable[..., S], /, *args: Any, **kwargs: Any) -> S: ...


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start loopback servers for one test; all of them stop when it ends (last started first)."""
    started: list[LoopbackServer] = []

    def start(factory: Callable[..., S], /, *args: Any, **kwargs: Any) -> S:
        server = factory(*args, **kwargs)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture
def embedding_server(serve: Serve) -> EmbeddingServer:
    """The OpenAI-dialect local server at dim 64, serving the harness's model."""
    return serve(EmbeddingServer, dim=64, model=MODEL)


@pytest.fixture
def fault_server(serve: Serve) -> Callable[..., FaultServer]:
    """Start a :class:`FaultServer`: ``fault_server(plan, dim=32, poison=..., faults=...)``."""
    return partial(serve, FaultServer)


@pytest.fixture
def ark_server(serve: Serve) -> Callable[..., ArkServer]:
    """Start an :class:`ArkServer`: ``ark_server(models=..., api_key=..., poison=...)``."""
    return partial(serve, ArkServer)


@pytest.fixture
def envelope_server(serve: Serve) -> Callable[..., EnvelopeServer]:
    """Start an :class:`EnvelopeServer`: ``envelope_server(dim=64, polls=2, faults=...)``."""
    return partial(serve, EnvelopeServer)
