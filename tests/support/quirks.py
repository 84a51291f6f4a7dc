"""Servers with the habits of real ones no one here wrote, and the checks the tests share.

Each habit below stalled a run, wasted requests or gave a wrong-looking result against a real
server (issue 12); the tests in ``tests/test_bounded_waits.py`` and
``tests/test_learned_limits.py`` run the whole pipeline against them on loopback:

- :class:`QuirkServer`: the OpenAI-dialect server whose answer to chosen turns is edited
  (headers added, ``usage`` replaced), on top of the base's scripted replies;
- :class:`SilentServer`: accepts connections, reads the request, never answers;
- :class:`CappedServer`: refuses a request over ``cap`` inputs in the shape of one real server
  (TEI's 413, FastAPI's 422, OpenAI's and Azure's 400, vLLM's 400);
- :func:`short_documents`: a corpus of many one-chunk documents (many requests);
- :func:`assert_key_kept`: the API key appears in no output file.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.local_server import EmbeddingServer, Reply
from tests.support.corpus import ExpectedCorpus, long_text
from tests.support.harness import read_output

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["CAP_SHAPES", "CappedServer", "QuirkServer", "SilentServer", "assert_key_kept",
           "short_documents"]

#: An edit of a normal answer: takes the reply the server would send, returns the one it sends.
Edit = Callable[[Reply], Reply]


class QuirkServer(EmbeddingServer):
    """An :class:`EmbeddingServer` whose answers to some embedding turns are edited.

    ``edits`` maps a turn (1-based, one per embedding request in arrival order, the preflight
    is turn 1; the same numbering as :class:`~pipeline.local_base.FaultSchedule`) to an edit of
    the answer the server would give. A turn with a scripted reply is not edited.
    """

    def __init__(self, *args: Any, edits: Mapping[int, Edit] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.edits = dict(edits or {})
        self._turn_lock = threading.Lock()
        self._turn = threading.local()

    def scheduled_fault(self) -> Reply | None:
        with self._turn_lock:  # the turn taken and its number, as one step
            reply = super().scheduled_fault()
            self._turn.number = self.faults.taken
        return reply

    def handle_embeddings(self, payload: dict[str, Any], headers: Mapping[str, str]) -> Reply:
        reply = super().handle_embeddings(payload, headers)
        edit = self.edits.get(self._turn.number)
        return edit(reply) if edit is not None and reply.status == 200 else reply


def with_headers(**headers: str) -> Edit:
    """An edit that adds headers (``x_ratelimit_reset_requests="1h"``: underscores → dashes)."""
    named = {name.replace("_", "-"): value for name, value in headers.items()}
    return lambda reply: Reply(reply.status, reply.body, {**reply.headers, **named})


def with_usage(prompt_tokens: int) -> Edit:
    """An edit that replaces the answer's ``usage`` with ``prompt_tokens``."""
    def edit(reply: Reply) -> Reply:
        assert isinstance(reply.body, dict)
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        return Reply(reply.status, {**reply.body, "usage": usage}, reply.headers)
    return edit


class SilentServer:
    """Accepts every connection and reads what is sent, but never answers a byte.

    What a hung upstream behind a load balancer, or a server stuck on a GPU, looks like to a
    client: the connection opens, the request goes out, nothing comes back. ``requests`` counts
    the HTTP requests that arrived (by their request line), ``headers`` keeps their raw heads.
    """

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.heads: list[bytes] = []
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-server", daemon=True)

    @property
    def requests(self) -> int:
        with self._lock:
            return len(self.heads)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for connection in self._connections:
                connection.close()
        self._socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        connection.settimeout(0.2)
        pending = b""
        while not self._stop.is_set():
            try:
                data = connection.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            pending += data
            while b"\r\n\r\n" in pending:  # one head per request; the body is skipped by length
                head, _, pending = pending.partition(b"\r\n\r\n")
                with self._lock:
                    self.heads.append(head)
                pending = pending[_content_length(head):]


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


# -- request caps in the shapes real servers state them ---------------------------------------


def _tei(cap: int, n: int) -> Reply:
    return Reply(413, {"error": f"batch size {n} > maximum allowed batch size {cap}",
                       "error_type": "Validation"})


def _fastapi(cap: int, n: int) -> Reply:
    # FastAPI's default answer to a pydantic v2 validation error (infinity, and most gateways
    # written in Python), the whole input echoed back in ``input``.
    return Reply(422, {"detail": [{
        "type": "too_long", "loc": ["body", "input"],
        "msg": f"List should have at most {cap} items after validation, not {n}",
        "input": [f"text {i}" for i in range(n)],
        "ctx": {"field_type": "List", "max_length": cap, "actual_length": n}}]})


def _openai(cap: int, n: int) -> Reply:
    return Reply(400, {"error": {
        "message": f"Invalid 'input': array too long. Expected an array with maximum length "
                   f"{cap}, but got an array with length {n} instead.",
        "type": "invalid_request_error", "param": "input", "code": "array_above_max_length"}})


def _azure(cap: int, n: int) -> Reply:
    return Reply(400, {"error": {
        "message": f"Too many inputs. The max number of inputs is {cap}.  We hope to increase "
                   "the number of inputs per request soon.",
        "type": "invalid_request_error", "param": None, "code": None}})


def _vllm(cap: int, n: int) -> Reply:
    # vLLM answers a validation error with 400 and the pydantic error list as the message.
    errors = [{"type": "too_long", "loc": ("body", "input"),
               "msg": f"List should have at most {cap} items after validation, not {n}",
               "input": ["..."], "ctx": {"field_type": "List", "max_length": cap,
                                         "actual_length": n}}]
    return Reply(400, {"object": "error", "message": str(errors), "type": "BadRequestError",
                       "param": None, "code": 400})


#: Every shape of "too many inputs" the pipeline learns a cap from, by the server it comes from.
CAP_SHAPES: dict[str, Callable[[int, int], Reply]] = {
    "tei-413": _tei, "fastapi-422": _fastapi, "openai-400": _openai, "azure-400": _azure,
    "vllm-400": _vllm,
}


class CappedServer(EmbeddingServer):
    """Refuses a request of more than ``cap`` inputs, in the shape ``CAP_SHAPES[shape]``."""

    def __init__(self, *args: Any, cap: int, shape: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cap, self.refuse = cap, CAP_SHAPES[shape]
        self.refused = 0
        self._refused_lock = threading.Lock()

    def handle_embeddings(self, payload: dict[str, Any], headers: Mapping[str, str]) -> Reply:
        n = len(payload.get("input") or [])
        if n > self.cap:
            with self._refused_lock:
                self.refused += 1
            return self.refuse(self.cap, n)
        return super().handle_embeddings(payload, headers)


# -- corpora and checks ------------------------------------------------------------------------


def short_documents(root: Path, n: int, *, words: int = 40, seed: int = 5) -> ExpectedCorpus:
    """``n`` distinct one-chunk documents in ``root/docs.jsonl``; what a run must produce."""
    root.mkdir(parents=True, exist_ok=True)
    docs = {f"doc-{i}": f"Record {i}. " + " ".join(long_text("space", 1, seed + i).split()[:words])
            for i in range(n)}
    with (root / "docs.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": k, "text": v, "lang": "en"}) + "\n" for k, v in docs.items())
    return ExpectedCorpus.of(docs, metadata=dict.fromkeys(docs, "en"))


def assert_key_kept(output: str, key: str, *texts: str) -> None:
    """``key`` is in no file of the output (manifest, usage, rejects, vectors) nor in ``texts``."""
    manifest, tables = read_output(output)
    assert key not in json.dumps(manifest)
    for table in tables.values():
        if table is None:
            continue
        for row in table.to_pylist():
            assert not any(isinstance(v, str) and key in v for v in row.values()), row
    for text in texts:
        assert key not in text
