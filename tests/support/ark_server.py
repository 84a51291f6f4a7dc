"""A Volcengine Ark embedding API on loopback, strict where Ark is strict, with programmable faults.

It speaks Ark's dialect, so a client bug shows up as the error Ark would send:

- ``POST /api/v3/embeddings`` only (``base_url`` is ``http://127.0.0.1:PORT/api/v3``), with
  ``Authorization: Bearer <key>`` answered by Ark's 401 ``AuthenticationError``;
- a body of ``model``, ``input`` and ``encoding_format`` only: a ``dimensions`` field (which
  Ark's text API does not have) is a 400 ``InvalidParameter``, so a passing test proves the client
  never sent it; so are an empty list, an empty string and an input over 100,000 UTF-8 bytes,
  while an input over 4096 tokens (by :func:`~pipeline.local_server.count_tokens`) is a 400
  ``OutofContextError``;
- a model unknown to :attr:`ArkServer.models` is a 404 ``InvalidEndpointOrModel.NotFound``;
- vectors at the model's native size and **not** normalised: each is a
  :class:`~pipeline.local_server.HashingEmbedder` unit vector times :func:`native_scale` of its
  text, so a client that forgets to normalise after slicing is caught;
- errors as ``{"error": {"code", "message", "param", "type"}}``, usage by
  :func:`~pipeline.local_server.count_tokens`.

Faults, for tests of what the client does with each documented code, are the base's
(:class:`~pipeline.local_server.FaultSchedule`, the same for every dialect), with Ark's errors
as the replies::

    server = ArkServer(models={"ep-test": 32}, poison="<<flagged>>")
    server.schedule(None, Fault(429, "RateLimitExceeded.EndpointRPMExceeded"))  # 2nd request
    server.fail_always(Fault(403, "AccountOverdueError"))                      # then all of them

A request with an input containing a poison marker (the base's
:class:`~pipeline.local_server.Poison`) answers 400 ``SensitiveContentDetected``, as Ark's
moderation does, so bisection can isolate that input.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.local_server import (
    ApiError,
    HashingEmbedder,
    Injection,
    LoopbackServer,
    Reply,
    count_tokens,
    encode_embedding,
    error_reply,
)

#: The real models' native sizes; tests pass small ones to keep the vectors cheap.
ARK_MODELS: Mapping[str, int] = {
    "doubao-embedding-text-240715": 2560,
    "doubao-embedding-large-text-250515": 2048,
}
MAX_INPUT_TOKENS = 4096
MAX_INPUT_BYTES = 100_000

_REQUEST_FIELDS = frozenset({"model", "input", "encoding_format"})

#: Ark's ``error.type`` for each status it uses.
_ERROR_TYPES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    429: "TooManyRequests",
    500: "InternalServiceError",
    503: "ServiceUnavailable",
}

#: Ark's messages for the codes the tests use (any code may be scheduled; these just read true).
_MESSAGES = {
    "AuthenticationError": "The API key or AK/SK in the request is missing or invalid.",
    "AccountOverdueError": "The request failed because your account has an overdue balance.",
    "AccessDenied": "The request failed because you do not have access to the requested resource.",
    "InvalidEndpointOrModel.NotFound": "The model or endpoint does not exist or you do not have "
                                       "access to it.",
    "ModelNotOpen": "Your account has not activated the model service.",
    "QuotaExceeded": "Your account has exhausted its free quota of the model.",
    "SetLimitExceeded": "Your account has reached the inference limit you set.",
    "RateLimitExceeded.EndpointRPMExceeded": "The Requests Per Minute (RPM) limit of the "
                                             "associated endpoint for your account has been "
                                             "exceeded.",
    "ServerOverloaded": "The service is currently unable to handle additional requests due to "
                        "server overload.",
    "InternalServiceError": "The service encountered an unexpected internal error.",
    "SensitiveContentDetected": "The request failed because the input text may contain sensitive "
                                "information.",
}


def native_scale(text: str) -> float:
    """The length of ``text``'s native vector: differs between texts, and is never 1."""
    return 2.0 + len(text) % 5


def ark_error(status: int, code: str, message: str | None = None, *,
              headers: dict[str, str] | None = None) -> Reply:
    """An error answer as Ark sends it (see :func:`_ark_error_fields`)."""
    return error_reply(status, **_ark_error_fields(status, code, message), headers=headers)


class ArkApiError(ApiError):
    """Raised inside a handler to answer with an Ark-shaped error from any depth."""

    def __init__(self, status: int, code: str, message: str | None = None, *,
                 param: str = "") -> None:
        super().__init__(status, param=param, **_ark_error_fields(status, code, message))


def _ark_error_fields(status: int, code: str, message: str | None) -> dict[str, Any]:
    """Ark's ``type`` for the status, and its message for the code ending with a request id."""
    text = message or _MESSAGES.get(code, code)
    return {"message": f"{text} Request id: {uuid.uuid4().hex}",
            "error_type": _ERROR_TYPES.get(status, "BadRequest"), "code": code}


@dataclass(frozen=True, slots=True)
class Fault:
    """An error answer to schedule: ``(status, code)``, Ark's message for it unless given.

    Callable, as the base's :data:`~pipeline.local_server.Injection` may be: each answer it makes
    carries a fresh request id, as Ark's do.
    """

    status: int
    code: str
    message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def reply(self) -> Reply:
        return ark_error(self.status, self.code, self.message, headers=self.headers)

    __call__ = reply


class ArkServer(LoopbackServer):
    """Ark's ``/api/v3/embeddings`` on loopback; see the module docstring.

    ``models`` maps each served model or endpoint id to its native size (default: the real
    models at their real sizes; the base class's ``model`` and ``dim`` are its first entry).
    Embedders of other sizes are built on first use, since a 2560-wide rotation takes a second.
    Faults apply after authentication: the base's schedule (``faults``, :meth:`schedule`,
    :meth:`fail_always`) before the body is read, then the ``poison`` markers once it is valid.
    """

    BASE_PATH = "/api/v3"

    def __init__(
        self,
        *,
        models: Mapping[str, int] = ARK_MODELS,
        api_key: str | None = None,
        poison: str | Iterable[str] | None = None,
        faults: Mapping[int, Injection] | None = None,
    ) -> None:
        first = next(iter(models))
        super().__init__(dim=models[first], api_key=api_key, model=first, faults=faults,
                         poison=poison)
        self.models = dict(models)
        self._lock = threading.Lock()
        self._embedders = {self.dim: self.embedder}

    # -- the dialect -------------------------------------------------------------------------

    def authorize(self, method: str, path: str, headers: Mapping[str, str]) -> None:
        try:
            super().authorize(method, path, headers)
        except ApiError:
            raise ArkApiError(401, "AuthenticationError") from None

    def route(self, method: str, path: str, payload: Any, headers: Mapping[str, str]) -> Reply:
        if (method, path) != ("POST", "/api/v3/embeddings"):
            raise ArkApiError(404, "NotFound", f"no route for {method} {path}")
        scheduled = self.scheduled_fault()
        if scheduled is not None:
            return scheduled
        if not isinstance(payload, dict):
            raise ArkApiError(400, "InvalidParameter", "the request body must be a JSON object")
        return self.handle_embeddings(payload, headers)

    def handle_embeddings(self, payload: dict[str, Any], headers: Mapping[str, str]) -> Reply:
        model, texts, encoding_format = self._parse(payload)
        refusal = self.poisoned(texts)
        if refusal is not None:
            return refusal
        tokens = sum(count_tokens(text) for text in texts)
        self.record_served(texts, tokens)
        data = [
            {"index": i, "embedding": encode_embedding(vector, encoding_format),
             "object": "embedding"}
            for i, vector in enumerate(self._native_vectors(model, texts))
        ]
        return Reply(200, {
            "id": uuid.uuid4().hex, "created": int(time.time()), "object": "list", "model": model,
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    def poison_reply(self, index: int, marker: str) -> Reply:
        """Ark's moderation names no input: the whole request is refused."""
        return ark_error(400, "SensitiveContentDetected")

    def _native_vectors(self, model: str, texts: list[str]) -> np.ndarray:
        """Unit vectors at the model's native size, each scaled by :func:`native_scale`."""
        dim = self.models[model]
        with self._lock:
            if dim not in self._embedders:
                self._embedders[dim] = HashingEmbedder(dim)
            embedder = self._embedders[dim]
        scales = np.array([[native_scale(text)] for text in texts], dtype=np.float32)
        return embedder.embed(texts) * scales

    def _parse(self, payload: dict[str, Any]) -> tuple[str, list[str], str]:
        """``(model, texts, encoding_format)`` of a request Ark would accept, else its error."""
        unknown = sorted(set(payload) - _REQUEST_FIELDS)
        if unknown:
            raise ArkApiError(400, "InvalidParameter",
                              f"The parameter {unknown[0]} specified in the request is not "
                              "valid.", param=unknown[0])
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise ArkApiError(400, "MissingParameter", "The request is missing model.",
                              param="model")
        if model not in self.models:
            raise ArkApiError(404, "InvalidEndpointOrModel.NotFound",
                              f"The model or endpoint {model} does not exist or you do not have "
                              "access to it.")
        encoding_format = payload.get("encoding_format", "float")
        if encoding_format not in ("float", "base64"):
            raise ArkApiError(400, "InvalidParameter", "encoding_format must be float or base64",
                              param="encoding_format")
        value = payload.get("input")
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts:
            raise ArkApiError(400, "InvalidParameter", "input must be a non-empty string or list",
                              param="input")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise ArkApiError(400, "InvalidParameter", f"input[{i}] must be a non-empty "
                                  "string", param="input")
            if len(text.encode("utf-8", "surrogatepass")) > MAX_INPUT_BYTES:
                raise ArkApiError(400, "InvalidParameter",
                                  f"input[{i}] is over {MAX_INPUT_BYTES} bytes", param="input")
            if count_tokens(text) > MAX_INPUT_TOKENS:
                raise ArkApiError(400, "OutofContextError",
                                  f"input[{i}] is over {MAX_INPUT_TOKENS} tokens", param="input")
        return model, texts, encoding_format
