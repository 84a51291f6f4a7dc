"""A deliberately cheap OpenAI-dialect embedding server for ``make bench-scale``.

The scale benchmark asks what embedpipe itself costs (wall time, memory, time to the first
request) on large corpora, so the provider must cost as close to nothing as possible: every
millisecond the server spends is a millisecond charged to the client under test. The embedded
local server (:mod:`pipeline.local_server`) computes real hashing embeddings and is far too
expensive for a million chunks; this one answers from a pool of precomputed vectors instead.

Per ``POST /v1/embeddings`` it parses the JSON body, counts the inputs, and joins precomputed
byte strings (64 distinct unit vectors, handed out round-robin), with no latency and no rate
limit. Answers carry ``Content-Length`` over HTTP/1.1 keep-alive, Nagle off.

It also records what the benchmark measures from the server side:

- ``GET /stats``: ``{"requests", "inputs", "first_request_time", "first_batch_time",
  "last_request_time"}`` as JSON; times are ``time.time()`` of the arrival of the first
  ``/v1/embeddings`` request, of the first one with more than one input (embedpipe's preflight
  sends a single input before the pipeline starts), and of the last one.
- ``POST /reset``: clears those counters.

Run in its own process (so it competes with the client for CPUs, not for the client's GIL)::

    python -m tests.support.fast_server [--host 127.0.0.1] [--port 0] [--dim 1536] [--pool 64]

It prints its base URL (``http://127.0.0.1:PORT/v1``) on one line once it is listening, and
serves until terminated (SIGTERM or SIGINT).
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self

REPO = Path(__file__).resolve().parents[2]

DEFAULT_DIM = 1536
DEFAULT_POOL = 64
EMBEDDINGS_PATH = "/v1/embeddings"


class VectorPool:
    """Precomputed answer fragments: for each pool vector, ``,"embedding":<vector>}`` as bytes.

    One pool per (dimension, encoding), built on first use and kept; building is the only
    numerical work the server ever does.
    """

    def __init__(self, size: int, seed: int = 1536) -> None:
        self.size = size
        self.seed = seed
        self._fragments: dict[tuple[int, str], list[bytes]] = {}
        self._lock = threading.Lock()

    def fragments(self, dim: int, encoding: str) -> list[bytes]:
        key = (dim, encoding)
        cached = self._fragments.get(key)
        if cached is not None:
            return cached
        with self._lock:
            if key not in self._fragments:
                self._fragments[key] = self._build(dim, encoding)
            return self._fragments[key]

    def _build(self, dim: int, encoding: str) -> list[bytes]:
        rng = np.random.default_rng(self.seed + dim)
        vectors = rng.standard_normal((self.size, dim)).astype("<f4")
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        out = []
        for vec in vectors:
            if encoding == "base64":
                body = b'"' + base64.b64encode(vec.tobytes()) + b'"'
            else:
                body = json.dumps([float(x) for x in vec]).encode()
            out.append(b',"embedding":' + body + b"}")
        return out


class Stats:
    """Request counters and arrival times, shared by the handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.inputs = 0
            self.first_request_time: float | None = None
            self.first_batch_time: float | None = None
            self.last_request_time: float | None = None
            self._cursor = 0

    def record(self, now: float, n_inputs: int) -> int:
        """Count one request; returns the pool cursor its vectors start from."""
        with self._lock:
            self.requests += 1
            self.inputs += n_inputs
            if self.first_request_time is None:
                self.first_request_time = now
            if self.first_batch_time is None and n_inputs > 1:
                self.first_batch_time = now
            self.last_request_time = now
            cursor = self._cursor
            self._cursor += n_inputs
            return cursor

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "inputs": self.inputs,
                "first_request_time": self.first_request_time,
                "first_batch_time": self.first_batch_time,
                "last_request_time": self.last_request_time,
            }


class FastServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], dim: int, pool_size: int) -> None:
        super().__init__(address, Handler)
        self.host = address[0]
        self.dim = dim
        self.pool = VectorPool(pool_size)
        self.stats = Stats()
        self.pool.fragments(dim, "base64")  # the common case is ready before the first request

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.server_port}/v1"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: FastServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a log line per request would cost more than the answer."""

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
        self._send(status, json.dumps(body).encode())

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:
        if self.path == "/stats":
            self._send(HTTPStatus.OK, json.dumps(self.server.stats.as_dict()).encode())
        elif self.path in ("/health", "/"):
            self._send(HTTPStatus.OK, b'{"ok":true}')
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

    def do_POST(self) -> None:
        raw = self._read_body()
        if self.path == "/reset":
            self.server.stats.reset()
            self._send(HTTPStatus.OK, b'{"ok":true}')
            return
        if self.path.split("?", 1)[0] != EMBEDDINGS_PATH:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
            return
        now = time.time()
        try:
            request = json.loads(raw)
            model = request["model"]
            inputs = request["input"]
        except (ValueError, KeyError, TypeError):
            self._error(HTTPStatus.BAD_REQUEST, "body must be JSON with 'model' and 'input'")
            return
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            self._error(HTTPStatus.BAD_REQUEST, "'input' must be a non-empty list of strings")
            return
        encoding = request.get("encoding_format") or "float"
        if encoding not in ("base64", "float"):
            self._error(HTTPStatus.BAD_REQUEST, f"unknown encoding_format {encoding!r}")
            return
        dim = request.get("dimensions") or self.server.dim
        if not isinstance(dim, int) or dim <= 0 or dim > self.server.dim:
            self._error(HTTPStatus.BAD_REQUEST, f"dimensions must be in 1..{self.server.dim}")
            return
        n = len(inputs)
        cursor = self.server.stats.record(now, n)
        fragments = self.server.pool.fragments(dim, encoding)
        size = len(fragments)
        # An estimate: a word is about a token; exact counts would cost a tokenizer per input.
        tokens = sum(text.count(" ") + 1 for text in inputs if isinstance(text, str))
        items = b",".join(
            b'{"object":"embedding","index":%d' % i + fragments[(cursor + i) % size]
            for i in range(n)
        )
        tail = json.dumps({"prompt_tokens": tokens, "total_tokens": tokens}).encode()
        body = b"".join((
            b'{"object":"list","data":[', items, b'],"model":', json.dumps(model).encode(),
            b',"usage":', tail, b"}",
        ))
        self._send(HTTPStatus.OK, body)


class FastServerProcess:
    """This server in a subprocess, for a benchmark in the parent; its stats over HTTP."""

    def __init__(self, dim: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fast_server", "--dim", str(dim)],
            stdout=subprocess.PIPE, text=True, cwd=REPO,
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http://"):
            self.close()
            raise RuntimeError("the fast server did not start")
        self._root = self.base_url.removesuffix("/v1")
        self._http = httpx.Client(timeout=10)

    def stats(self) -> dict[str, Any]:
        return self._http.get(f"{self._root}/stats").raise_for_status().json()

    def reset(self) -> None:
        self._http.post(f"{self._root}/reset").raise_for_status()

    def close(self) -> None:
        if hasattr(self, "_http"):
            self._http.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.fast_server",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM)
    parser.add_argument("--pool", type=int, default=DEFAULT_POOL,
                        help="distinct precomputed vectors, reused round-robin")
    args = parser.parse_args(argv)
    server = FastServer((args.host, args.port), args.dim, args.pool)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(server.base_url, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
