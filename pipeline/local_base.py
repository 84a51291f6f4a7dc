"""The dialect-free base of the local embedding server: lifecycle, counters, faults and poison.

Every API the project speaks on loopback (OpenAI's in :mod:`pipeline.local_openai`, and in the
tests Ark's, the envelope API's and a fault-injecting OpenAI) is one app on this base. The base
owns what they share, so that each dialect only says how its requests and answers look:

- **lifecycle**: bind at construction, serve on a daemon thread, stop idempotently;
- **counters**: :class:`ServerStats`, every HTTP request and every input that got a vector;
- **the app protocol**: :meth:`LoopbackServer.authorize` then :meth:`LoopbackServer.route`, with
  an :class:`ApiError` raised at any depth turned into an answer;
- **one fault schedule** (:class:`FaultSchedule`, :attr:`LoopbackServer.faults`): which embedding
  requests get a scripted answer instead of their own. Each dialect's embedding route takes one
  turn per request (:meth:`LoopbackServer.scheduled_fault`) before it looks at the payload;
- **one poison facility** (:class:`Poison`, :attr:`LoopbackServer.poison`): markers that fail the
  whole request of any input holding one, the way moderation or an over-long input does, so the
  client's bisection can isolate that input. Each dialect checks it once its payload is valid
  (:meth:`LoopbackServer.poisoned`) and says, in :meth:`LoopbackServer.poison_reply`, how its
  provider words the refusal.

::

    server = EmbeddingServer(poison="<<flagged>>", faults={3: overloaded})  # any dialect
    server.schedule(None, rate_limited)  # the next request answers normally, the one after 429
    server.fail_always(quota_exhausted)  # and every one once the schedule is used up

Bytes on the wire are :mod:`pipeline.local_wire`'s business; this module never touches a socket.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.local_model import DEFAULT_DIM, DEFAULT_MODEL, HashingEmbedder
from pipeline.local_wire import LoopbackHTTPServer

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "ApiError",
    "FaultSchedule",
    "Injection",
    "LoopbackServer",
    "Poison",
    "Reply",
    "ServerStats",
    "error_reply",
]

_logger = logging.getLogger("pipeline.local_server")


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer, as route handlers return it.

    A dict ``body`` is sent as JSON; bytes are sent verbatim, so a fault test can answer with a
    truncated or non-JSON body. ``drop_connection`` closes the socket without answering (the
    status is then ignored), which is what a crashed upstream or a reset load balancer looks like
    to the client.
    """

    status: int
    body: bytes | dict[str, Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop_connection: bool = False


def error_reply(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    error = {"message": message, "type": error_type, "param": param, "code": code}
    return Reply(status, {"error": error}, headers or {})


class ApiError(Exception):
    """Raised by a route to answer with an OpenAI-shaped error; the server turns it into a reply.

    Raising instead of returning lets validation helpers stop a handler from any depth.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reply = error_reply(status, message, error_type=error_type, param=param, code=code)


@dataclass(frozen=True, slots=True)
class ServerStats:
    """What the server has seen since it started or since :meth:`LoopbackServer.reset_stats`.

    ``requests`` counts every HTTP request, on any path and with any outcome (dropped ones
    included); ``inputs``, ``texts`` and ``tokens`` count only successfully embedded inputs, in
    the order they were answered, so a test can check that every chunk was sent exactly once.
    """

    requests: int = 0
    inputs: int = 0
    tokens: int = 0
    texts: tuple[str, ...] = ()


#: A scripted answer: a :class:`Reply`, or a zero-argument callable that builds one per use (so
#: that, say, every injected error carries a fresh request id).
Injection = Reply | Callable[[], Reply]


class FaultSchedule:
    """Which embedding requests are answered with a scripted reply instead of their own.

    Turns are numbered from 1, one per embedding request in arrival order (every dialect takes
    its turn before it reads the payload; the pipeline's preflight is turn 1). A turn's answer is
    the reply set for its number, else the standing reply, else None (answer normally). Numbers
    are set three ways, which compose:

    - ``FaultSchedule({3: reply})`` or :meth:`at`: that turn, whenever it comes;
    - :meth:`next`: the next turns not yet taken or queued, one each (None skips a turn);
    - :meth:`always`: every turn without a reply of its own (None clears it).

    Thread-safe: handlers run one thread per request.

    >>> schedule = FaultSchedule({2: Reply(503)})
    >>> [reply and reply.status for reply in (schedule.take(), schedule.take(), schedule.take())]
    [None, 503, None]
    """

    def __init__(self, at: Mapping[int, Injection] | None = None) -> None:
        self._lock = threading.Lock()
        self._by_turn: dict[int, Injection] = {}
        self._standing: Injection | None = None
        self._taken = 0
        self._queued_to = 0  # the last turn :meth:`next` has filled
        for number, reply in (at or {}).items():
            self.at(number, reply)

    @property
    def taken(self) -> int:
        """How many turns have been taken: the embedding requests seen so far."""
        with self._lock:
            return self._taken

    def at(self, number: int, reply: Injection | None) -> None:
        """Answer turn ``number`` (1-based) with ``reply``; None answers it normally."""
        if number < 1:
            raise ValueError(f"turns are numbered from 1, got {number}")
        with self._lock:
            if reply is None:
                self._by_turn.pop(number, None)
            else:
                self._by_turn[number] = reply

    def next(self, *replies: Injection | None) -> None:
        """Answer the next turns with these, one each, after any queued before; None skips one."""
        with self._lock:
            start = max(self._taken, self._queued_to)
            for offset, reply in enumerate(replies, start=1):
                if reply is not None:
                    self._by_turn[start + offset] = reply
            self._queued_to = start + len(replies)

    def always(self, reply: Injection | None) -> None:
        """Answer every turn that has no reply of its own with ``reply``; None stops it."""
        with self._lock:
            self._standing = reply

    def take(self) -> Reply | None:
        """Take the next turn: the reply to send instead of an answer, or None to answer."""
        with self._lock:
            self._taken += 1
            injection = self._by_turn.pop(self._taken, None) or self._standing
        if injection is None or isinstance(injection, Reply):
            return injection
        return injection()


@dataclass(frozen=True, slots=True)
class Poison:
    """Markers that fail the whole request of any input containing one.

    A real provider refuses a request over one input (moderation, a context overflow) and says
    which; the client must then bisect the request to embed every other input. ``markers`` are
    plain substrings; an empty one is refused, since every input would contain it.

    >>> Poison.of("<<bad>>").find(["fine", "a <<bad>> one", "<<bad>> too"])
    (1, '<<bad>>')
    """

    markers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(not marker for marker in self.markers):
            raise ValueError("a poison marker must not be empty (every input would contain it)")

    @classmethod
    def of(cls, poison: str | Iterable[str] | None) -> Poison:
        """From one marker, several, or None (no poison)."""
        if poison is None:
            return cls()
        return cls((poison,) if isinstance(poison, str) else tuple(poison))

    def __bool__(self) -> bool:
        return bool(self.markers)

    def find(self, texts: Sequence[str]) -> tuple[int, str] | None:
        """``(index, marker)`` of the first input holding a marker, or None when none does."""
        for index, text in enumerate(texts):
            for marker in self.markers:
                if marker in text:
                    return index, marker
        return None


class LoopbackServer:
    """An embedding API on a background thread, in no dialect yet: subclass it and :meth:`route`.

    Binds at construction (``port=0`` picks a free port), so :attr:`base_url` is known before
    :meth:`start`; use it as a context manager. ``faults`` seeds :attr:`faults` (turn number →
    reply) and ``poison`` (one marker or several) is :attr:`poison`; the model is a
    :class:`~pipeline.local_model.HashingEmbedder` of ``dim``, served as ``model``. Requests are
    served concurrently, one thread each; every answer carries a fresh ``x-request-id``.

    Subclasses set :attr:`BASE_PATH` (what a client appends to the host to make its base URL) and
    implement :meth:`route`; they may override :meth:`authorize` (other auth schemes) and
    :meth:`poison_reply` (their provider's refusal).
    """

    #: Appended to :attr:`root_url` to make :attr:`base_url` (OpenAI's is ``/v1``).
    BASE_PATH: ClassVar[str] = ""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        dim: int = DEFAULT_DIM,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        *,
        faults: Mapping[int, Injection] | None = None,
        poison: str | Iterable[str] | None = None,
    ) -> None:
        self.model = model
        self.embedder = HashingEmbedder(dim)
        self.faults = FaultSchedule(faults)
        self.poison = Poison.of(poison)
        self._api_key = api_key
        self._stats_lock = threading.Lock()
        self._request_local = threading.local()
        self._requests = 0
        self._texts: list[str] = []
        self._tokens = 0
        self._httpd = LoopbackHTTPServer((host, port), self._answer_wire)
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def root_url(self) -> str:
        """The host root, ``http://127.0.0.1:PORT``, without any path."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The URL a client takes as its base: :attr:`root_url` plus :attr:`BASE_PATH`."""
        return self.root_url + self.BASE_PATH

    def start(self) -> str:
        """Serve on a daemon thread and return :attr:`base_url`; the socket already listens."""
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        # stop() waits up to one poll interval; tests start and stop dozens of servers.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"embedding-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self.base_url

    def serve_forever(self) -> None:
        """Serve on the calling thread until interrupted (the CLI's foreground mode)."""
        self._httpd.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the listening socket. Idempotent."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- statistics ------------------------------------------------------------------------

    @property
    def stats(self) -> ServerStats:
        """A consistent snapshot of the counters."""
        with self._stats_lock:
            return ServerStats(self._requests, len(self._texts), self._tokens, tuple(self._texts))

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._requests = 0
            self._texts = []
            self._tokens = 0

    def record_served(self, texts: Sequence[str], tokens: int) -> None:
        """Count inputs that got vectors; each dialect calls it for what it delivers intact."""
        with self._stats_lock:
            self._texts.extend(texts)
            self._tokens += tokens

    def request_query(self) -> dict[str, str]:
        """The query parameters of the request being answered on the calling thread.

        ``route`` gets the path alone; dialects that put settings in the query string (Azure's
        ``?api-version=``) read them here. Each request is served on its own thread.
        """
        return dict(getattr(self._request_local, "query", {}))

    # -- faults and poison -----------------------------------------------------------------

    def schedule(self, *replies: Injection | None) -> None:
        """Answer the next embedding requests with these, one each; None answers normally."""
        self.faults.next(*replies)

    def fail_always(self, reply: Injection | None) -> None:
        """Answer every embedding request with ``reply`` once the schedule is used up."""
        self.faults.always(reply)

    def scheduled_fault(self) -> Reply | None:
        """This embedding request's turn in :attr:`faults`: the reply to send, or None.

        Every dialect's embedding route calls it once per request, before reading the payload.
        """
        return self.faults.take()

    def poisoned(self, texts: Sequence[str]) -> Reply | None:
        """The dialect's refusal when an input holds a :attr:`poison` marker, else None."""
        found = self.poison.find(texts)
        return None if found is None else self.poison_reply(*found)

    def poison_reply(self, index: int, marker: str) -> Reply:
        """How the provider refuses a request over ``input[index]``; OpenAI's shape by default."""
        return error_reply(
            400,
            f"'$.input[{index}]' is invalid: it contains the poison marker {marker!r}",
            param="input",
            code="invalid_request",
        )

    # -- the app protocol (override points) --------------------------------------------------

    def authorize(self, method: str, path: str, headers: Mapping[str, str]) -> None:
        """Raise a 401 :class:`ApiError` unless the request carries the key (if one is set).

        ``/health`` stays open so that probes need no secret. The message never repeats the key
        that was sent: error messages end up in logs.
        """
        if self._api_key is None or path == "/health":
            return
        scheme, _, sent = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            sent.strip().encode(), self._api_key.encode()
        ):
            raise ApiError(
                401,
                "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )

    def route(self, method: str, path: str, payload: Any, headers: Mapping[str, str]) -> Reply:
        """Answer one authorised request; ``payload`` is the parsed JSON body, or None if empty.

        ``path`` has no query string; ``headers`` keys are lower-case. The base serves nothing.
        """
        raise ApiError(404, f"no route for {method} {path}", code="not_found")

    def parse_body(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> Any:
        """The ``payload`` :meth:`route` gets: the JSON-decoded body, or None when it is empty.

        Runs after :meth:`authorize`, so an unauthorised upload is never parsed. Dialects that
        take other bodies (the Files API's multipart uploads in :mod:`pipeline.local_batch`)
        override it for their paths and defer the rest here.
        """
        return _parse_json(body)

    # -- plumbing ------------------------------------------------------------------------------

    def _answer_wire(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> Reply:
        """What :mod:`pipeline.local_wire` calls for each request, on the request's thread."""
        self._request_local.query = query
        return self._answer(method, path, body, headers)

    def _answer(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> Reply:
        """Authorise, parse and route one request; every failure becomes an OpenAI-shaped reply.

        ``body`` is None when the request did not say how long its body is.
        """
        with self._stats_lock:
            self._requests += 1
        try:
            if body is None:
                raise ApiError(411, "send the body with a valid Content-Length header")
            self.authorize(method, path, headers)
            return self.route(method, path, self.parse_body(method, path, body, headers), headers)
        except ApiError as exc:
            return exc.reply
        except Exception:
            # A real API answers 500 rather than hanging up; a test should see the status.
            _logger.exception("unhandled error while answering %s %s", method, path)
            return error_reply(500, "internal server error", error_type="server_error")


def _parse_json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
