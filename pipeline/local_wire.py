"""Bytes on the wire for the local embedding server: HTTP/1.1 in, one :class:`Reply` out.

:class:`LoopbackHTTPServer` reads each request on its own thread, hands method, path, query,
body and headers to one ``answer`` callable (:meth:`LoopbackServer._answer_wire
<pipeline.local_base.LoopbackServer>`) and writes the :class:`WireReply` it returns (a
:class:`pipeline.local_base.Reply`). Nothing here knows a dialect, a model or a fault: those live
in :mod:`pipeline.local_base` and the apps built on it, which import this module, never the
other way round.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

__all__ = ["Answer", "LoopbackHTTPServer", "WireReply"]


class WireReply(Protocol):
    """What the wire needs of an answer (:class:`pipeline.local_base.Reply` is one)."""

    @property
    def status(self) -> int: ...
    @property
    def body(self) -> bytes | dict[str, Any]: ...
    @property
    def headers(self) -> dict[str, str]: ...
    @property
    def drop_connection(self) -> bool: ...


#: ``answer(method, path, query, body, headers)``; ``body`` is None when its length is unknown.
Answer = Callable[[str, str, dict[str, str], "bytes | None", Mapping[str, str]], WireReply]

_logger = logging.getLogger("pipeline.local_server")


class LoopbackHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that answers every request through one ``answer`` callable."""

    daemon_threads = True
    # Closing the server must not wait for handler threads: a client that keeps an idle
    # keep-alive connection open would otherwise hold up stop() and Ctrl-C indefinitely.
    block_on_close = False
    # Parallel clients open many connections at once; the default backlog of 5 would make some
    # of them wait for a SYN retransmit (a second or more) under a burst.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], answer: Answer) -> None:
        super().__init__(address, _RequestHandler)
        self.answer = answer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer is routine (timeouts, fault tests): no traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            _logger.exception("error while serving %s", client_address)


class _RequestHandler(BaseHTTPRequestHandler):
    """Bytes on the wire only: reads the request, hands it to the app, writes the reply."""

    protocol_version = "HTTP/1.1"  # keep-alive, as real clients expect
    # Headers and body leave in two writes; with Nagle's algorithm on, the body would wait for
    # the client's delayed ACK, adding ~40 ms to every answer on a kept-alive connection.
    disable_nagle_algorithm = True
    server: LoopbackHTTPServer

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        body = self._read_body()
        if body is None:
            self.close_connection = True  # the body's end is unknown: the stream cannot be reused
        headers = {name.lower(): value for name, value in self.headers.items()}
        target = urlsplit(self.path)
        reply = self.server.answer(method, target.path, dict(parse_qsl(target.query)), body,
                                   headers)
        if reply.drop_connection:
            self.close_connection = True  # the server closes the socket without a byte sent
            return
        self._send(reply)

    def _read_body(self) -> bytes | None:
        """The request body, or None when its length cannot be known (a bad header).

        Chunked bodies (what httpx sends for a streamed body) are read to their end: answering
        before the body is consumed and closing would reset the connection under the client.
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length", "0").strip()
        if not (length.isascii() and length.isdigit()):
            return None
        return self.rfile.read(int(length))

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        while True:
            size_line = self.rfile.readline(65537)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                return None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(3)  # the CRLF after each chunk

    def _send(self, reply: WireReply) -> None:
        if isinstance(reply.body, bytes):
            body = reply.body
        else:
            body = json.dumps(reply.body, separators=(",", ":")).encode()
        headers = {"content-type": "application/json", "x-request-id": str(uuid.uuid4())}
        headers.update((name.lower(), value) for name, value in reply.headers.items())
        headers["content-length"] = str(len(body))
        self.send_response(reply.status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: one stderr line per request would bury the pipeline's own output."""
