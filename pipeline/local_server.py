"""An OpenAI-compatible embedding server on loopback: the default provider of embedpipe.

``embedpipe serve-local``, the demo and the test suite need an embedding API that runs offline,
answers in milliseconds and returns vectors that *mean* something, so that a demo search finds
the right documents and a test can tell one chunk's vector from its neighbour's. This module is
that server, on the standard library and numpy only.

The model: :class:`HashingEmbedder`
-----------------------------------
A feature-hashing bag-of-n-grams embedder (the "hashing trick", Weinberger et al. 2009),
followed by a fixed random rotation:

1. **Features.** The text is lower-cased and cut into words (``\\w+``, Unicode-aware, so a run of
   CJK characters is one word). The features are every word, every pair of adjacent words, and
   every character 3-gram of each word padded with boundary markers (``cat`` → ``<ca``, ``cat``,
   ``at>``), so that inflections and typos still share most of their weight.
2. **Weights.** Each distinct feature weighs ``1 + log(tf)`` (sublinear term frequency), so a
   word repeated fifty times does not drown the rest of the text.
3. **Hashing.** Each feature is hashed with keyed BLAKE2b (64 bits, the key is ``seed``): the
   hash modulo ``dim`` picks a bucket and its top bit a sign ±1. A word pair's hash is mixed
   from its two word hashes (splitmix64), which is as good as hashing the pair's string and much
   faster. The signed per-bucket sums are a sparse random projection of the unbounded feature
   space: inner products are preserved in expectation.
4. **Rotation.** The hashed vector is L2-normalised and multiplied by a fixed random orthogonal
   matrix (drawn from ``seed``). Cosines are unchanged, but every coordinate now mixes every
   bucket, so a prefix of the vector is a random projection of the whole. That is what makes the
   ``dimensions`` request parameter (truncate, then re-normalise, like OpenAI's
   text-embedding-3) sound: without it the prefix of a short text would often be all zeros.

A text without word characters (punctuation, emoji, whitespace) is hashed by its raw characters
instead, and if the signed sums of a very short text cancel out exactly, its signs are dropped:
every non-empty text gets a finite unit vector. The same text, ``dim`` and ``seed`` always give
the same vector, whatever else is in the request (bit for bit on one platform; the rotation goes
through BLAS, whose last-bit rounding may differ between builds).

What it is not: a semantic model. Two texts are close when they share words and spellings, not
meaning ("car" and "automobile" are unrelated to it). It is for demos and tests.

The server: :class:`EmbeddingServer`
------------------------------------
``POST /v1/embeddings`` (also ``/embeddings``), ``GET /v1/models`` and ``GET /health``, with
OpenAI's request, response and error shapes, on ``http.server.ThreadingHTTPServer``: ``float``
and ``base64`` encodings, ``dimensions``, ``usage`` by :func:`count_tokens`, an optional bearer
key. It is as strict as OpenAI (unknown fields are 400, another model name is 404
``model_not_found``), so client bugs show up offline. Test servers for faults and other API
dialects subclass it and override :meth:`~EmbeddingServer.route` or
:meth:`~EmbeddingServer.handle_embeddings`::

    class FlakyServer(EmbeddingServer):
        def handle_embeddings(self, payload, headers):
            if self.stats.requests % 2:  # every other request, the first one included
                return error_reply(429, "slow down", error_type="rate_limit_error")
            return super().handle_embeddings(payload, headers)

    with FlakyServer() as server:
        ...  # point the client at server.base_url
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_DIM",
    "DEFAULT_MODEL",
    "ApiError",
    "EmbeddingServer",
    "HashingEmbedder",
    "Reply",
    "ServerStats",
    "count_tokens",
    "encode_embedding",
    "error_reply",
    "serve_local_main",
    "truncate_dimensions",
]

DEFAULT_MODEL = "local-hash-embedding"
DEFAULT_DIM = 256
DEFAULT_CLI_PORT = 8089

_logger = logging.getLogger(__name__)

_WORD_RE = re.compile(r"\w+")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")

# Feature namespaces, so that the word "the" and the 3-gram "the" are different features.
_WORD_PREFIX = "w\x1f"
_GRAM_PREFIX = "c\x1f"
_RAW_PREFIX = "r\x1f"

# A word's hashes are memoised: natural text is Zipfian, so after a few documents almost every
# word is a hit. Starting afresh when full is simpler than an LRU and costs one cold document.
_WORD_CACHE_SIZE = 1 << 18

# splitmix64 constants (Steele, Lea & Flood 2014), used to mix two word hashes into a pair hash.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_SIGN_SHIFT = np.uint64(63)


def count_tokens(text: str) -> int:
    """The server's own token count, reported in ``usage``: words plus punctuation marks.

    Deliberately *not* cl100k: the pipeline counts tokens with its own tokenizer to plan
    requests, and a provider's count differs from it. The local server reporting a different
    number keeps the pipeline honest about which count goes into ``usage/``. Any non-empty text
    counts at least one token.
    """
    if not text:
        return 0
    return max(1, len(_TOKEN_RE.findall(text)))


class HashingEmbedder:
    """Deterministic text embeddings by feature hashing; see the module docstring for the model.

    Thread-safe: the only state besides the constants is a memo of word hashes, and concurrent
    writes to it are idempotent.

    >>> vectors = HashingEmbedder(dim=64).embed(["a red apple", "a green apple", "tax return"])
    >>> vectors.shape, vectors.dtype
    ((3, 64), dtype('float32'))
    >>> bool(vectors[0] @ vectors[1] > vectors[0] @ vectors[2])
    True
    """

    def __init__(self, dim: int = DEFAULT_DIM, seed: int = 0) -> None:
        if dim < 1:
            raise ValueError(f"dim must be at least 1, got {dim}")
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        self.dim = dim
        self.seed = seed
        self._key = seed.to_bytes(8, "little")
        self._rotation = _random_rotation(dim, seed)
        self._word_cache: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` into an ``(n, dim)`` float32 array of unit rows, in input order.

        A text's vector does not depend on the other texts of the call, so how the pipeline
        bundles chunks never changes their vectors. Raises ``ValueError`` for an empty string:
        there is nothing to hash, and the API refuses it before it gets here.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        features: list[np.ndarray] = []
        term_counts: list[np.ndarray] = []
        for row, text in enumerate(texts):
            if not text:
                raise ValueError(f"texts[{row}] is empty; every text must be non-empty")
            distinct, tf = np.unique(self._feature_hashes(text), return_counts=True)
            features.append(distinct)
            term_counts.append(tf)
        hashed = self._bucket_sums(features, term_counts)
        hashed /= np.linalg.norm(hashed, axis=1, keepdims=True)
        rotated: np.ndarray = hashed @ self._rotation
        rotated /= np.linalg.norm(rotated, axis=1, keepdims=True)
        return rotated.astype(np.float32)

    def _bucket_sums(self, features: list[np.ndarray], term_counts: list[np.ndarray]) -> np.ndarray:
        """The signed, sublinearly weighted bucket sums of each text, all texts in one pass.

        One ``bincount`` over ``row * dim + bucket`` replaces a dozen small numpy calls per text,
        which is where the time went when texts were done one by one.
        """
        n_rows = len(features)
        hashes = np.concatenate(features)
        weights = 1.0 + np.log(np.concatenate(term_counts))
        row_offsets = np.arange(n_rows) * self.dim
        n_features = np.fromiter(map(len, features), dtype=np.intp, count=n_rows)
        slots = np.repeat(row_offsets, n_features) + (hashes % np.uint64(self.dim)).astype(np.intp)
        signed = np.where(hashes >> _SIGN_SHIFT, -weights, weights)
        sums = np.bincount(slots, weights=signed, minlength=n_rows * self.dim)
        sums = sums.reshape(n_rows, self.dim)
        cancelled = ~sums.any(axis=1)
        if cancelled.any():
            # A few features whose signed weights cancel exactly; unsigned sums cannot cancel.
            unsigned = np.bincount(slots, weights=weights, minlength=n_rows * self.dim)
            sums[cancelled] = unsigned.reshape(n_rows, self.dim)[cancelled]
        return sums

    def _feature_hashes(self, text: str) -> np.ndarray:
        """Every feature occurrence of ``text`` as a 64-bit hash; repeats encode the tf."""
        words = _WORD_RE.findall(text.lower())
        if not words:
            return np.array([self._hash(_RAW_PREFIX + char) for char in text], dtype=np.uint64)
        cache = self._word_hashes_for(words)
        per_word = list(map(cache.__getitem__, words))
        hashes = np.concatenate(per_word)
        lengths = np.fromiter(map(len, per_word), dtype=np.intp, count=len(per_word))
        unigrams = hashes[np.cumsum(lengths) - lengths]  # each word's own hash comes first
        return np.concatenate([hashes, _mix_pairs(unigrams[:-1], unigrams[1:])])

    def _word_hashes_for(self, words: list[str]) -> dict[str, np.ndarray]:
        """The memo, holding every word in ``words``: its own hash, then its 3-grams' hashes.

        A full memo is replaced, not cleared, so a thread still reading the old one is unharmed.
        """
        cache = self._word_cache
        missing = set(words).difference(cache)
        if len(cache) + len(missing) > _WORD_CACHE_SIZE:
            cache = self._word_cache = {}
            missing = set(words)
        for word in missing:
            padded = f"<{word}>"
            grams = (padded[i : i + 3] for i in range(len(padded) - 2))
            cache[word] = np.array(
                [self._hash(_WORD_PREFIX + word), *(self._hash(_GRAM_PREFIX + g) for g in grams)],
                dtype=np.uint64,
            )
        return cache

    def _hash(self, feature: str) -> int:
        # surrogatepass: JSON may carry lone surrogates, which are still hashable code points.
        data = feature.encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(data, digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "little")


def _mix_pairs(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Order-sensitive 64-bit hashes of (left[i], right[i]) pairs, by the splitmix64 finaliser."""
    z: np.ndarray = left ^ (right * _GOLDEN + _MIX_2)  # uint64 arrays wrap silently, as meant
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    z ^= z >> np.uint64(31)
    return z


@functools.lru_cache(maxsize=8)
def _random_rotation(dim: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal ``dim × dim`` matrix, fixed by ``seed``; read-only.

    Memoised per process: tests start dozens of servers, and a QR decomposition competing for
    cores with other work can take most of a second.
    """
    gaussian = np.random.default_rng(seed).standard_normal((dim, dim))
    q, r = np.linalg.qr(gaussian)
    rotation = q * np.sign(np.diag(r))  # the sign fix makes it uniform (Mezzadri 2007)
    rotation.flags.writeable = False
    return rotation


def truncate_dimensions(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """The first ``dimensions`` values of each row, re-normalised to unit length.

    This is how OpenAI's text-embedding-3 models serve the ``dimensions`` parameter
    (Matryoshka representation learning); :class:`HashingEmbedder` vectors support it because
    their rotation spreads every feature over every coordinate.
    """
    prefix = vectors[:, :dimensions]
    norms = np.linalg.norm(prefix, axis=1, keepdims=True)
    unit: np.ndarray = prefix / np.maximum(norms, np.finfo(np.float32).tiny)
    return unit.astype(np.float32)


def encode_embedding(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """One vector as OpenAI sends it: a JSON list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


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
    """What the server has seen since it started or since :meth:`EmbeddingServer.reset_stats`.

    ``requests`` counts every HTTP request, on any path and with any outcome (dropped ones
    included); ``inputs``, ``texts`` and ``tokens`` count only successfully embedded inputs, in
    the order they were answered, so a test can check that every chunk was sent exactly once.
    """

    requests: int = 0
    inputs: int = 0
    tokens: int = 0
    texts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    texts: tuple[str, ...]
    encoding_format: str
    dimensions: int | None


_REQUEST_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


class EmbeddingServer:
    """An OpenAI-compatible embedding API on a background thread, for the demo and for tests.

    Binds at construction (``port=0`` picks a free port), so :attr:`base_url` is known before
    :meth:`start`. Use it as a context manager in tests::

        with EmbeddingServer(api_key="sk-test") as server:
            client = httpx.Client(base_url=server.base_url)

    Subclasses customise :meth:`route` (add paths, other dialects), :meth:`handle_embeddings`
    (inject faults, alter answers) or :meth:`authorize` (other auth schemes). Requests are served
    concurrently, one thread each; every answer carries a fresh ``x-request-id``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        dim: int = DEFAULT_DIM,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
    ) -> None:
        self.model = model
        self.embedder = HashingEmbedder(dim)
        self._api_key = api_key
        self._httpd = _HTTPServer((host, port), self)
        self._thread: threading.Thread | None = None
        self._stats_lock = threading.Lock()
        self._request_local = threading.local()
        self._requests = 0
        self._texts: list[str] = []
        self._tokens = 0

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
    def base_url(self) -> str:
        """The URL a client takes as its base, ``/v1`` included: ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

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
        """Count inputs that got vectors; dialect subclasses with their own endpoints call it."""
        with self._stats_lock:
            self._texts.extend(texts)
            self._tokens += tokens

    def request_query(self) -> dict[str, str]:
        """The query parameters of the request being answered on the calling thread.

        ``route`` gets the path alone; dialects that put settings in the query string (Azure's
        ``?api-version=``) read them here. Each request is served on its own thread.
        """
        return dict(getattr(self._request_local, "query", {}))

    # -- request handling (override points) --------------------------------------------------

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

    def route(
        self, method: str, path: str, payload: Any, headers: Mapping[str, str]
    ) -> Reply:
        """Answer one authorised request; ``payload`` is the parsed JSON body, or None if empty.

        Subclasses add routes by matching their own paths first and deferring the rest to
        ``super().route(...)``. ``path`` has no query string; ``headers`` keys are lower-case.
        """
        match method, path:
            case "POST", "/v1/embeddings" | "/embeddings":
                if not isinstance(payload, dict):
                    raise ApiError(400, "the request body must be a JSON object")
                return self.handle_embeddings(payload, headers)
            case "GET", "/v1/models" | "/models":
                model = {"id": self.model, "object": "model", "created": 0, "owned_by": "embedpipe"}
                return Reply(200, {"object": "list", "data": [model]})
            case "GET", "/health":
                return Reply(200, {"status": "ok", "model": self.model, "dim": self.dim})
        raise ApiError(404, f"no route for {method} {path}", code="not_found")

    def handle_embeddings(self, payload: dict[str, Any], headers: Mapping[str, str]) -> Reply:
        """``POST /v1/embeddings``: validate, embed, count and answer as OpenAI does."""
        request = self.parse_embedding_request(payload)
        body = self.embedding_body(request)
        self.record_served(request.texts, body["usage"]["prompt_tokens"])
        return Reply(200, body)

    def embedding_body(self, request: EmbeddingRequest) -> dict[str, Any]:
        """The 200 body for a valid request, without counting it as served.

        Subclasses that alter or break answers build on this and call :meth:`record_served`
        only for what they deliver intact.
        """
        vectors = self.embedder.embed(request.texts)
        if request.dimensions is not None:
            vectors = truncate_dimensions(vectors, request.dimensions)
        tokens = sum(count_tokens(text) for text in request.texts)
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": encode_embedding(vector, request.encoding_format),
            }
            for index, vector in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": self.model, "usage": usage}

    def parse_embedding_request(self, payload: dict[str, Any]) -> EmbeddingRequest:
        """Check a request as strictly as OpenAI does, so client bugs surface here first."""
        unknown = sorted(set(payload) - _REQUEST_FIELDS)
        if unknown:
            raise ApiError(
                400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0]
            )
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model parameter", param="model")
        if model != self.model:
            raise ApiError(
                404,
                f"The model {model!r} does not exist; this server serves {self.model!r}.",
                param="model",
                code="model_not_found",
            )
        encoding_format = payload.get("encoding_format", "float")
        if encoding_format not in ("float", "base64"):
            raise ApiError(
                400,
                f"encoding_format must be 'float' or 'base64', got {encoding_format!r}",
                param="encoding_format",
            )
        dimensions = payload.get("dimensions")
        if dimensions is not None and (
            type(dimensions) is not int or not 1 <= dimensions <= self.dim
        ):
            raise ApiError(
                400,
                f"dimensions must be an integer from 1 to {self.dim}, got {dimensions!r}",
                param="dimensions",
            )
        return EmbeddingRequest(_parse_input(payload.get("input")), encoding_format, dimensions)

    # -- plumbing ------------------------------------------------------------------------------

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
            return self.route(method, path, _parse_json(body), headers)
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


def _parse_input(value: Any) -> tuple[str, ...]:
    """``input`` as a tuple of non-empty strings; token arrays are not supported."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise ApiError(400, "input must be a string or a list of strings", param="input")
    if not texts:
        raise ApiError(400, "input must not be an empty list", param="input")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(
                400,
                f"input[{index}] is a {type(text).__name__}; only strings are supported "
                f"(token arrays are not)",
                param="input",
            )
        if not text:
            raise ApiError(400, f"input[{index}] is an empty string", param="input")
    return tuple(texts)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Closing the server must not wait for handler threads: a client that keeps an idle
    # keep-alive connection open would otherwise hold up stop() and Ctrl-C indefinitely.
    block_on_close = False
    # Parallel clients open many connections at once; the default backlog of 5 would make some
    # of them wait for a SYN retransmit (a second or more) under a burst.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: EmbeddingServer) -> None:
        super().__init__(address, _RequestHandler)
        self.app = app

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
    server: _HTTPServer

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
        self.server.app._request_local.query = dict(parse_qsl(target.query))
        reply = self.server.app._answer(method, target.path, body, headers)
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

    def _send(self, reply: Reply) -> None:
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


def serve_local_main(argv: list[str] | None = None) -> int:
    """``embedpipe serve-local``: serve in the foreground until Ctrl-C or SIGTERM, then exit 0.

    Exits 2 when the arguments are invalid, the key variable is unset or the port is taken.
    """
    parser = argparse.ArgumentParser(
        prog="embedpipe serve-local",
        description="Serve deterministic hashing embeddings on an OpenAI-compatible API "
        f"(model {DEFAULT_MODEL!r}). For demos and tests: vectors reflect shared words and "
        "spellings, not meaning.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_CLI_PORT, help="0 picks a free port")
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM, help="embedding dimension")
    parser.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="require 'Authorization: Bearer <key>', the key read from this environment variable",
    )
    args = parser.parse_args(argv)
    if args.dim < 1:
        parser.error(f"--dim must be at least 1, got {args.dim}")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(
                f"embedpipe serve-local: environment variable {args.api_key_env} is not set or "
                f"empty; export the key in it, or drop --api-key-env",
                file=sys.stderr,
            )
            return 2
    try:
        server = EmbeddingServer(args.host, args.port, args.dim, api_key)
    except OSError as exc:
        print(
            f"embedpipe serve-local: cannot listen on {args.host}:{args.port}: {exc.strerror}; "
            f"choose another --port",
            file=sys.stderr,
        )
        return 2
    print(f"embedpipe local server on {server.base_url} (dim={server.dim})", flush=True)
    serve_until_interrupted(server)
    return 0


def serve_until_interrupted(server: EmbeddingServer) -> None:
    """Serve in the foreground until Ctrl-C or SIGTERM, then stop.

    SIGTERM is what process managers and ``kill`` send, and a server started in the background
    by a script inherits an ignored SIGINT: both must stop it cleanly, like Ctrl-C in a terminal.
    """
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(serve_local_main())
