"""The provider contract: build a request, parse the answer, classify an error.

A provider knows one API dialect and nothing else: no retries, no rate limits, no Beam. The embed
stage hands it an ``httpx.Client`` (created once per worker process) and a list of texts, and gets
back either an :class:`EmbeddingResult` whose vectors are aligned with the texts, or one of the
classified :mod:`transforms.errors`. Everything httpx or the server can throw is translated here,
once, so that nothing above this boundary looks at HTTP status codes.

Alignment is the provider's first duty: vectors are re-ordered by the answer's ``index``, and an
answer whose indices, count or dimension do not match the request is a
:class:`~transforms.errors.MalformedResponseError` (retried), never a misaligned row.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import numpy as np

from transforms.errors import (
    DimensionChangedError,
    FatalProviderError,
    InputRejectedError,
    MalformedResponseError,
    ProviderError,
    RateLimitedError,
    RequestTooLargeError,
    RetryableError,
)
from transforms.limits import MONOTONIC, Clock
from transforms.providers.caps import stated_input_cap
from transforms.providers.config import BaseProviderConfig
from transforms.types import Chunk, SparseVector


@dataclass(frozen=True, slots=True)
class RateLimitHint:
    """What the provider's ``x-ratelimit-*`` headers said about the remaining budget."""

    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None


@dataclass(frozen=True, slots=True, eq=False)
class EmbeddingResult:
    """Vectors aligned with the request's texts, plus what the provider said it cost."""

    vectors: np.ndarray  # shape (n_inputs, dim), float32, row i belongs to text i
    prompt_tokens: int
    total_tokens: int
    tokens_estimated: bool
    http_status: int
    provider_request_id: str | None = None
    rate_hint: RateLimitHint | None = None
    #: The model the answer says produced the vectors (OpenAI's top-level ``model``), if named.
    served_model: str | None = None
    #: Multimodal answers: each row's sparse vector (with ``provider.sparse``), and the
    #: answer's ``prompt_tokens_details`` (tokens of text and of images).
    sparse: tuple[SparseVector, ...] | None = None
    text_tokens: int | None = None
    image_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    url: str
    json: Mapping[str, Any] | None
    headers: Mapping[str, str]
    params: Mapping[str, str] | None = None


class Provider:
    """Base class of every provider; subclasses override the dialect-specific hooks.

    ``embed`` is the one entry point used by the embed stage. Hooks, in call order:
    :meth:`build_request` → (HTTP) → :meth:`classify_error` for non-2xx answers, else
    :meth:`parse_response` → :meth:`finish_vectors` (the kind's :meth:`finalize_vectors`, then
    ``provider.normalize``).
    """

    kind: ClassVar[str]
    #: The per-input token limit of the API, if it has a documented one (checked against split).
    default_max_input_tokens: ClassVar[int | None] = None

    #: The kind's own config class, paired with the provider in :mod:`transforms.providers`;
    #: subclasses narrow this annotation to it (``cfg: ArkConfig``).
    cfg: BaseProviderConfig

    def __init__(self, cfg: BaseProviderConfig, *, clock: Clock = MONOTONIC) -> None:
        self.cfg = cfg
        #: Times whatever waits inside one call (the envelope's job polling); the embed session
        #: passes its own, so a test's fake clock reaches the provider too.
        self.clock = clock

    # -- configuration ----------------------------------------------------------------------

    #: The dimension the server was seen to serve (the preflight's, or the first answer's),
    #: when ``provider.dimensions`` is not set; set by the embed session.
    served_dim: int | None = None

    @property
    def expected_dim(self) -> int | None:
        """The dimension every vector must have after :meth:`finalize_vectors`, when known."""
        return self.cfg.dimensions if self.cfg.dimensions is not None else self.served_dim

    # -- the request ------------------------------------------------------------------------

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        if not api_key:
            return {}
        value = f"{self.cfg.auth_scheme} {api_key}" if self.cfg.auth_scheme else api_key
        return {self.cfg.auth_header: value}

    def headers(self, api_key: str | None) -> dict[str, str]:
        """``provider.extra_headers`` plus the auth header (auth wins on a clash)."""
        return {**self.cfg.extra_headers, **self.auth_headers(api_key)}

    def body(self, texts: Sequence[str], *, dimensions: bool) -> dict[str, Any]:
        """The fields every dialect shares: model, inputs, encoding, and ``dimensions`` if set.

        ``dimensions`` says whether this API may be sent ``provider.dimensions``: the kind's
        ``send_dimensions`` (openai, envelope), or False for APIs that reduce client-side (Ark).
        """
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "input": list(texts),
            "encoding_format": self.cfg.encoding_format,
        }
        if dimensions and self.cfg.dimensions is not None:
            body["dimensions"] = self.cfg.dimensions
        return body

    def build_request(self, texts: Sequence[str], api_key: str | None) -> HttpRequest:
        raise NotImplementedError

    def request_inputs(self, chunks: Sequence[Chunk], images: Any = None) -> Sequence[Any]:
        """What :meth:`embed` is given for ``chunks``: their texts here.

        Multimodal providers (:mod:`transforms.providers.multimodal`) give each chunk's typed
        parts instead, reading its image through ``images`` (an
        :class:`~transforms.images.ImageLoader`); called before the request is metered, so an
        image that cannot be read costs no request (it raises
        :class:`~transforms.errors.ImageError`).
        """
        return [c.text for c in chunks]

    def embed(
        self, client: httpx.Client, texts: Sequence[str], api_key: str | None, est_tokens: int
    ) -> EmbeddingResult:
        """Send one request for ``texts`` and return aligned vectors, or raise a classified error."""
        response = self.send(client, self.build_request(texts, api_key))
        if response.status_code >= 400:
            raise self.classify_error(response)
        try:
            result = self.parse_response(response, len(texts), est_tokens)
            vectors = self.finish_vectors(result.vectors)
            check_vectors(vectors, len(texts), self.expected_dim)
        except MalformedResponseError as exc:
            exc.http_status = response.status_code  # a 200 whose body cannot be trusted
            exc.provider_request_id = exc.provider_request_id or request_id_of(response)
            raise
        return EmbeddingResult(
            vectors=vectors,
            prompt_tokens=result.prompt_tokens,
            total_tokens=result.total_tokens,
            tokens_estimated=result.tokens_estimated,
            http_status=result.http_status,
            provider_request_id=result.provider_request_id or request_id_of(response),
            rate_hint=parse_rate_limit_headers(response.headers),
            served_model=result.served_model,
        )

    def send(self, client: httpx.Client, request: HttpRequest) -> httpx.Response:
        """One HTTP exchange, with transport failures translated to retryable errors.

        A redirect (3xx) is fatal, never followed: the request carries the API key, and a
        base URL that redirects is a configuration error (http:// for https://, a moved
        gateway), not a reason to send the key to wherever the ``Location`` points.
        """
        try:
            response = client.request(
                request.method,
                request.url,
                json=request.json,
                headers=dict(request.headers),
                params=request.params,
                follow_redirects=False,  # whatever the client's default: see the docstring
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise RetryableError(
                f"{CANNOT_CONNECT} {request.url} ({type(exc).__name__}: {exc})"
            ) from exc
        except httpx.TimeoutException as exc:
            raise RetryableError(
                f"{NO_ANSWER} provider.timeout_s={self.cfg.timeout_s:g}s "
                f"({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise RetryableError(
                f"connection to {request.url} failed ({type(exc).__name__}: {exc})"
            ) from exc
        # A read httpx Response sits in a reference cycle (its stream points back at it), so its
        # body (megabytes of vectors) lives until the cyclic collector runs, which it does ever
        # more rarely as the heap grows: a million chunks cost 200 MB of dead answers. The body
        # is read and the stream closed by now; an empty stream breaks the cycle.
        response.stream = httpx.ByteStream(b"")
        if 300 <= response.status_code < 400:
            raise redirect_error(response)
        return response

    # -- the answer -------------------------------------------------------------------------

    def parse_response(
        self, response: httpx.Response, n_inputs: int, est_tokens: int
    ) -> EmbeddingResult:
        raise NotImplementedError

    def finalize_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """The kind's own post-processing (Ark's dimension reduction); identity here."""
        return vectors

    def finish_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """:meth:`finalize_vectors`, then ``provider.normalize``: the one place it is applied.

        Every dialect's ``embed`` calls this, so ``normalize: true`` holds for every kind:
        servers that truncate ``dimensions`` without renormalising (infinity) or that scale
        their vectors still give unit vectors. An all-zero vector is left as it is.
        """
        vectors = self.finalize_vectors(vectors)
        return l2_normalize(vectors) if self.cfg.normalize else vectors

    def classify_error(self, response: httpx.Response) -> ProviderError:
        """Map an error answer to the most specific class (OpenAI-style rules by default).

        A refusal that states a cap on inputs per request, in any of the shapes servers use
        (:mod:`transforms.providers.caps`), is a :class:`RequestTooLargeError` carrying it.
        """
        code, message = error_code_and_message(response)
        cap = stated_input_cap(response, message)
        if cap is not None:
            return RequestTooLargeError(
                message, max_inputs=cap, http_status=response.status_code, code=code,
                retry_after_s=retry_after_seconds(response.headers),
                provider_request_id=request_id_of(response))
        return classify_http_error(
            response.status_code,
            code,
            message,
            retry_after_s=retry_after_seconds(response.headers),
            provider_request_id=request_id_of(response),
        )


# -- helpers shared by the dialects ---------------------------------------------------------

#: How a failure to open a connection at all is described (the preflight tells it apart from a
#: server that answers badly: only the first means a wrong or unreachable ``base_url``).
CANNOT_CONNECT = "cannot connect to"
#: How a request that got no answer within ``provider.timeout_s`` is described (the preflight
#: ends a run whose every attempt ended so: the server takes connections and never answers).
NO_ANSWER = "no answer within"


def redirect_error(response: httpx.Response) -> FatalProviderError:
    """A 3xx answer, as the configuration error it is, naming where it points."""
    location = response.headers.get("location")
    where = f"to {location}" if location else "without a Location"
    return FatalProviderError(
        f"the server answered with a redirect {where}; embedpipe never follows one (the API "
        "key would go along): set provider.base_url to the API's own URL, if that host is the "
        "one you mean to trust",
        http_status=response.status_code,
        provider_request_id=request_id_of(response),
    )

_QUOTA_WORDS = ("insufficient_quota", "quota", "billing", "overdue", "setlimitexceeded")


def classify_http_error(
    status: int,
    code: str | None,
    message: str,
    *,
    retry_after_s: float | None = None,
    provider_request_id: str | None = None,
) -> ProviderError:
    """The default classification of an HTTP error, shared by OpenAI-compatible servers.

    401/403/404 and exhausted quota are fatal; 408/409/425/429 and 5xx are retried; 413 means
    the request is too large (shrink it); other 4xx are about the content of the inputs.
    """
    kwargs: dict[str, Any] = {
        "http_status": status,
        "code": code,
        "retry_after_s": retry_after_s,
        "provider_request_id": provider_request_id,
    }
    lowered = f"{code or ''} {message}".lower()
    if status in (401, 403, 404):
        return FatalProviderError(message, **kwargs)
    if status == 429:
        if any(word in lowered for word in _QUOTA_WORDS):
            return FatalProviderError(message, **kwargs)
        return RateLimitedError(message, **kwargs)
    if status in (408, 409, 425) or status >= 500:
        return RetryableError(message, **kwargs)
    if status == 413:
        return RequestTooLargeError(message, **kwargs)
    return InputRejectedError(message, **kwargs)


def json_body(response: httpx.Response) -> Any:
    """The decoded JSON body; an unparseable one is malformed (and so retried)."""
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError) as exc:
        snippet = response.content[:120].decode("utf-8", "replace")
        raise MalformedResponseError(
            f"answer is not JSON ({exc.__class__.__name__}): {snippet!r}",
            http_status=response.status_code,
        ) from exc


def error_code_and_message(response: httpx.Response) -> tuple[str | None, str]:
    """Best-effort ``(code, message)`` from an error body of any common shape, or HTML."""
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        text = re.sub(r"<[^>]+>", " ", response.content[:300].decode("utf-8", "replace"))
        text = " ".join(text.split())
        return None, text or response.reason_phrase or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, str):
            return _code(body.get("code") or body.get("error_type")), err
        if isinstance(err, dict):
            message = err.get("message") or err.get("msg") or body.get("message") or ""
            code = err.get("code") or err.get("type") or body.get("code") or body.get("error_type")
            return _code(code), str(message) or json.dumps(body)[:300]
    return None, json.dumps(body)[:300]


def _code(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """``retry-after-ms`` (OpenAI), ``Retry-After`` seconds or HTTP-date; None when absent."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        return max(0.0, parsed.timestamp() - time.time())


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str | None) -> float | None:
    """OpenAI's reset durations (``"1s"``, ``"6m0s"``, ``"20ms"``) or bare seconds."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = _DURATION_PART.findall(value)
    return sum(float(n) * scale[u] for n, u in parts) if parts else None


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitHint | None:
    def num(name: str) -> float | None:
        raw = headers.get(name)
        try:
            return float(raw) if raw is not None else None
        except ValueError:
            return None

    hint = RateLimitHint(
        remaining_requests=num("x-ratelimit-remaining-requests"),
        remaining_tokens=num("x-ratelimit-remaining-tokens"),
        reset_requests_s=parse_duration(headers.get("x-ratelimit-reset-requests")),
        reset_tokens_s=parse_duration(headers.get("x-ratelimit-reset-tokens")),
    )
    return None if hint == RateLimitHint() else hint


def request_id_of(response: httpx.Response) -> str | None:
    for name in ("x-request-id", "x-client-request-id", "request-id", "x-tt-logid"):
        if name in response.headers:
            return response.headers[name]
    return None


def decode_embedding(value: Any, *, position: int) -> np.ndarray:
    """One embedding as float32: a base64 string of little-endian float32, or a list of numbers."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedResponseError(f"embedding {position} is not valid base64") from exc
        if len(raw) % 4:
            raise MalformedResponseError(
                f"embedding {position} has {len(raw)} bytes, not a whole number of float32"
            )
        return np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    if isinstance(value, list):
        try:
            return np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise MalformedResponseError(f"embedding {position} is not a list of numbers") from exc
    raise MalformedResponseError(f"embedding {position} is a {type(value).__name__}")


def align_by_index(items: Sequence[Any], n_inputs: int, *, key: str = "embedding") -> np.ndarray:
    """Stack ``[{index, <key>}]`` items into an (n_inputs, dim) array ordered by ``index``.

    Items without an ``index`` are taken in the order given (some servers omit it). Missing,
    duplicate or out-of-range indices and a count that differs from the request are malformed.
    Base64 vectors of one length without padding (every dimension divisible by 3, as 256, 768,
    1024, 1536, 3072) are decoded in one call straight into the matrix: per-vector decoding and
    stacking were a tenth of a run's CPU at dimension 1536.
    """
    if len(items) != n_inputs:
        raise MalformedResponseError(
            f"answer has {len(items)} embeddings for {n_inputs} inputs"
        )
    ordered: list[Any] = [None] * n_inputs
    for position, item in enumerate(items):
        if isinstance(item, dict):
            index = item.get("index", position)
            value = item.get(key)
        else:
            index, value = position, item
        if not isinstance(index, int) or not 0 <= index < n_inputs or ordered[index] is not None:
            raise MalformedResponseError(f"answer has a bad or repeated index {index!r}")
        if value is None:
            raise MalformedResponseError(f"embedding {index} is missing")
        ordered[index] = value
    matrix = _decode_uniform_base64(ordered)
    if matrix is not None:
        return matrix
    rows = [decode_embedding(value, position=index) for index, value in enumerate(ordered)]
    dims = {row.shape[0] for row in rows}
    if len(dims) != 1:
        raise MalformedResponseError(f"answer mixes embedding dimensions {sorted(dims)}")
    return np.vstack(rows)


def _decode_uniform_base64(values: list[Any]) -> np.ndarray | None:
    """One decode for base64 strings of one unpadded length; None when they are not that."""
    first = values[0] if values else None
    if not isinstance(first, str) or not first or len(first) % 4 or first.endswith("="):
        return None
    width = len(first)
    if not all(isinstance(v, str) and len(v) == width and not v.endswith("=") for v in values):
        return None
    try:
        # Not validate=True: its regex over megabytes costs more than the decode. A character
        # outside the alphabet is dropped by the decoder, which the length check then catches.
        raw = binascii.a2b_base64("".join(values))
    except (binascii.Error, ValueError):
        return None  # the per-vector path names the culprit
    if len(raw) != len(values) * (width // 4 * 3) or len(raw) % (4 * len(values)):
        return None
    return np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False).reshape(
        len(values), -1)


def check_vectors(vectors: np.ndarray, n_inputs: int, expected_dim: int | None) -> None:
    """Final guard before vectors leave the provider: shape, dimension, finiteness, not zero.

    An all-zero vector is no embedding (a server that failed quietly, a model that returned its
    padding): it would be written, cached and served again to every later run, and it makes
    every cosine similarity undefined. It fails the answer like a malformed one: retried, and
    rejected if it persists.
    """
    if vectors.ndim != 2 or vectors.shape[0] != n_inputs:
        raise MalformedResponseError(
            f"answer has shape {vectors.shape} for {n_inputs} inputs"
        )
    if expected_dim is not None and vectors.shape[1] != expected_dim:
        raise DimensionChangedError(
            f"answer has dimension {vectors.shape[1]}, where this run's vectors have "
            f"{expected_dim} (provider.dimensions, or what the server served first)"
        )
    if vectors.shape[1] == 0 or not np.isfinite(vectors).all():
        raise MalformedResponseError("answer has empty or non-finite embeddings")
    zero = np.flatnonzero(~vectors.any(axis=1))
    if len(zero):
        raise MalformedResponseError(
            f"answer has {len(zero)} all-zero embedding(s), the first at index {int(zero[0])}")


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1.0, norms)).astype(np.float32, copy=False)


def usage_tokens(usage: Any, est_tokens: int) -> tuple[int, int, bool]:
    """``(prompt_tokens, total_tokens, estimated)`` from a usage object, or the local estimate."""
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        total = usage.get("total_tokens", prompt)
        if isinstance(prompt, int):
            return prompt, total if isinstance(total, int) else prompt, False
    return est_tokens, est_tokens, True
