"""OpenAI's embedding API on the local server: the default provider of embedpipe.

``POST /v1/embeddings`` (also ``/embeddings``), ``GET /v1/models`` and ``GET /health``, with
OpenAI's request, response and error shapes: ``float`` and ``base64`` encodings, ``dimensions``,
``usage`` by :func:`~pipeline.local_model.count_tokens`, an optional bearer key. It is as strict as
OpenAI (unknown fields are 400, another model name is 404 ``model_not_found``), so client bugs
show up offline. Faults and poison come from the base (:mod:`pipeline.local_base`); test servers
that break answers in other ways subclass :class:`EmbeddingServer` and override
:meth:`~EmbeddingServer.handle_embeddings`::

    class NoUsageServer(EmbeddingServer):
        def handle_embeddings(self, payload, headers):
            reply = super().handle_embeddings(payload, headers)
            return Reply(reply.status, {k: v for k, v in reply.body.items() if k != "usage"})

    with EmbeddingServer(poison="<<bad>>", faults={2: error_reply(500, "boom")}) as server:
        ...  # point the client at server.base_url
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline.local_base import ApiError, LoopbackServer, Reply
from pipeline.local_model import count_tokens, encode_embedding, truncate_dimensions

__all__ = ["EmbeddingRequest", "EmbeddingServer", "parse_embedding_request"]

_REQUEST_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A request OpenAI would accept, parsed."""

    texts: tuple[str, ...]
    encoding_format: str
    dimensions: int | None


def parse_embedding_request(payload: dict[str, Any], *, model: str, dim: int) -> EmbeddingRequest:
    """Check a request as strictly as OpenAI does, so client bugs surface here first.

    ``model`` is the one model served, ``dim`` its native size (the most ``dimensions`` may ask).
    Dialects that wrap OpenAI's body in their own (the envelope API) parse the body with it too.
    """
    unknown = sorted(set(payload) - _REQUEST_FIELDS)
    if unknown:
        raise ApiError(
            400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0]
        )
    requested = payload.get("model")
    if not isinstance(requested, str) or not requested:
        raise ApiError(400, "you must provide a model parameter", param="model")
    if requested != model:
        raise ApiError(
            404,
            f"The model {requested!r} does not exist; this server serves {model!r}.",
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
    if dimensions is not None and (type(dimensions) is not int or not 1 <= dimensions <= dim):
        raise ApiError(
            400,
            f"dimensions must be an integer from 1 to {dim}, got {dimensions!r}",
            param="dimensions",
        )
    return EmbeddingRequest(_parse_input(payload.get("input")), encoding_format, dimensions)


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


class EmbeddingServer(LoopbackServer):
    """An OpenAI-compatible embedding API on a background thread, for the demo and for tests.

    Binds at construction (``port=0`` picks a free port), so :attr:`base_url` is known before
    :meth:`start`. Use it as a context manager in tests::

        with EmbeddingServer(api_key="sk-test") as server:
            client = httpx.Client(base_url=server.base_url)

    An embedding request takes its turn in :attr:`faults` before its body is read, and is
    refused by :attr:`poison` once it is valid. Subclasses customise :meth:`route` (add paths),
    :meth:`handle_embeddings` (alter answers) or :meth:`authorize` (other auth schemes).
    """

    BASE_PATH: ClassVar[str] = "/v1"

    def route(
        self, method: str, path: str, payload: Any, headers: Mapping[str, str]
    ) -> Reply:
        """Answer one authorised request; ``payload`` is the parsed JSON body, or None if empty.

        Subclasses add routes by matching their own paths first and deferring the rest to
        ``super().route(...)``. ``path`` has no query string; ``headers`` keys are lower-case.
        """
        match method, path:
            case "POST", "/v1/embeddings" | "/embeddings":
                scheduled = self.scheduled_fault()
                if scheduled is not None:
                    return scheduled
                if not isinstance(payload, dict):
                    raise ApiError(400, "the request body must be a JSON object")
                return self.handle_embeddings(payload, headers)
            case "GET", "/v1/models" | "/models":
                model = {"id": self.model, "object": "model", "created": 0, "owned_by": "embedpipe"}
                return Reply(200, {"object": "list", "data": [model]})
            case "GET", "/health":
                return Reply(200, {"status": "ok", "model": self.model, "dim": self.dim})
        return super().route(method, path, payload, headers)

    def handle_embeddings(self, payload: dict[str, Any], headers: Mapping[str, str]) -> Reply:
        """``POST /v1/embeddings``: validate, refuse poison, embed, count and answer as OpenAI."""
        request = self.parse_embedding_request(payload)
        refusal = self.poisoned(request.texts)
        if refusal is not None:
            return refusal
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
        """Check a request as strictly as OpenAI does (:func:`parse_embedding_request`)."""
        return parse_embedding_request(payload, model=self.model, dim=self.dim)
