"""Multimodal records: a record's text and image as typed parts, fused into one vector.

``provider.multimodal: true`` (with ``input.image_field``) selects these providers in place of
their kind's text one (:func:`~transforms.providers.provider_class_for`). Each request carries
one record: a multimodal API fuses every part of a request into **one** vector, so sending N
records in one request would give one vector for all of them. The embed stage packs one record
a request (``max_inputs`` 1) and keeps ``limits.max_concurrency`` of them in flight.

The parts, laid out in one place (:data:`PARTS`), as Ark documents them::

    [{"type": "text", "text": "a red chair"},
     {"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | "https://..."}}]

A record without text sends its image part alone; one without an image its text part alone.
Images read from storage go as base64 ``data:`` URLs with their MIME type
(:meth:`~transforms.images.ImageLoader.url_to_send`); http(s) URLs as they are.

**Ark** (:class:`ArkMultimodalProvider`): ``POST {base_url}/embeddings/multimodal`` with
``{model, input: parts, encoding_format, dimensions?, sparse_embedding?}``. ``dimensions`` (1024
or 2048) is applied by the server, not cut on the client as for Ark's text models;
``provider.sparse`` asks for ``sparse_embedding: {"type": "enabled"}``. The answer's ``data`` is
one object, ``{embedding, object, sparse_embedding?: [{index, value}]}``; usage has
``prompt_tokens_details: {text_tokens, image_tokens}``.

**Envelope** (:class:`EnvelopeMultimodalProvider`): our reading of the envelope API's "other
format" for multi-modal content: the same parts as the body's ``input``, one record per
request, the one vector read as for text (``data.data`` or ``data.embeddings``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx
import numpy as np

from transforms.errors import (
    ImageError,
    InputRejectedError,
    MalformedResponseError,
    ProviderError,
)
from transforms.providers.ark import ArkProvider, ErrorRule
from transforms.providers.base import (
    EmbeddingResult,
    HttpRequest,
    Provider,
    check_vectors,
    decode_embedding,
    json_body,
    parse_rate_limit_headers,
    request_id_of,
    usage_tokens,
)
from transforms.providers.envelope import SUBMIT_PATH, EnvelopeProvider
from transforms.types import IMAGE_UNREADABLE, Chunk, SparseVector


@dataclass(frozen=True, slots=True)
class PartLayout:
    """How a record becomes typed parts: the one place the layout is set, for every API."""

    text_type: str = "text"
    image_type: str = "image_url"

    def parts(self, text: str, image_url: str | None) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        if text:
            parts.append({"type": self.text_type, "text": text})
        if image_url is not None:
            parts.append({"type": self.image_type, self.image_type: {"url": image_url}})
        return parts


#: The part layout sent to every multimodal API.
PARTS = PartLayout()


def record_parts(chunks: Sequence[Chunk], images: Any) -> list[list[dict[str, Any]]]:
    """Each chunk's parts, its image read through ``images`` (an ImageLoader)."""
    out = []
    for chunk in chunks:
        url = None
        if chunk.image is not None:
            try:
                if images is None:
                    raise ImageError(IMAGE_UNREADABLE, "cannot be read: the run has no loader")
                url = images.url_to_send(chunk.image)
            except ImageError as exc:
                raise ImageError(exc.reason, f"image {chunk.image.reference[:300]!r} of record "
                                 f"{chunk.doc_id!r} {exc.message}") from exc
        out.append(PARTS.parts(chunk.text, url))
    return out


def usage_details(usage: Any) -> tuple[int | None, int | None]:
    """``(text_tokens, image_tokens)`` of ``usage.prompt_tokens_details``, when stated."""
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    if not isinstance(details, dict):
        return None, None

    def count(name: str) -> int | None:
        value = details.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return count("text_tokens"), count("image_tokens")


def parse_sparse(items: Any) -> SparseVector:
    """``[{index, value}]`` as (int32 indices, float32 values), sorted by index.

    Indices must be distinct non-negative integers and values finite numbers: an answer that is
    not is malformed (and so retried), never a sparse vector written half right.
    """
    if not isinstance(items, list):
        raise MalformedResponseError("answer has no 'sparse_embedding' list")
    pairs: list[tuple[int, float]] = []
    for item in items:
        index = item.get("index") if isinstance(item, dict) else None
        value = item.get("value") if isinstance(item, dict) else None
        if (not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 2**31
                or not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value)):
            raise MalformedResponseError(f"sparse_embedding has a bad item {str(item)[:80]}")
        pairs.append((index, float(value)))
    pairs.sort()
    indices = np.array([i for i, _ in pairs], dtype=np.int32)
    if len(indices) > 1 and not (np.diff(indices) > 0).all():
        raise MalformedResponseError("sparse_embedding repeats an index")
    return indices, np.array([v for _, v in pairs], dtype=np.float32)


#: Ark's multimodal refusals that are about the record (its text or its image): they reject
#: that record alone. Checked before Ark's text rules, which still apply to the rest.
MULTIMODAL_INPUT_RULES: tuple[ErrorRule, ...] = (
    ErrorRule(InputRejectedError, ("*SensitiveContentDetected*", "InvalidParameter*",
                                   "*Image*", "OutofContextError"), status=400),
)


def _one_record(inputs: Sequence[Any]) -> list[dict[str, Any]]:
    if len(inputs) != 1:
        raise ValueError(f"a multimodal request carries one record, not {len(inputs)}: the "
                         "API would fuse them into one vector")
    return list(inputs[0])


class ArkMultimodalProvider(ArkProvider):
    """Ark's ``/embeddings/multimodal``; see the module docstring."""

    def request_inputs(self, chunks: Sequence[Chunk], images: Any = None) -> Sequence[Any]:
        return record_parts(chunks, images)

    def build_request(self, texts: Sequence[Any], api_key: str | None) -> HttpRequest:
        body: dict[str, Any] = {"model": self.cfg.model, "input": _one_record(texts),
                                "encoding_format": self.cfg.encoding_format}
        if self.cfg.dimensions is not None:
            body["dimensions"] = self.cfg.dimensions
        if self.cfg.sparse:
            body["sparse_embedding"] = {"type": "enabled"}
        return HttpRequest("POST", f"{self.cfg.base_url}/embeddings/multimodal", body,
                           self.headers(api_key))

    def finalize_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """As served: the server applies ``dimensions`` itself."""
        return vectors

    def classify_error(self, response: httpx.Response) -> ProviderError:
        error = super().classify_error(response)
        if type(error) is not InputRejectedError and any(
                rule.matches(response.status_code, error.code)
                for rule in MULTIMODAL_INPUT_RULES):
            return InputRejectedError(
                error.message, http_status=error.http_status, code=error.code,
                retry_after_s=error.retry_after_s,
                provider_request_id=error.provider_request_id)
        return error

    def embed(
        self, client: httpx.Client, texts: Sequence[Any], api_key: str | None, est_tokens: int
    ) -> EmbeddingResult:
        """One record's parts in, its one vector (and sparse vector) out."""
        response = self.send(client, self.build_request(texts, api_key))
        if response.status_code >= 400:
            raise self.classify_error(response)
        try:
            return self._parse(response, est_tokens)
        except MalformedResponseError as exc:
            exc.http_status = response.status_code
            exc.provider_request_id = exc.provider_request_id or request_id_of(response)
            raise

    def _parse(self, response: httpx.Response, est_tokens: int) -> EmbeddingResult:
        body = json_body(response)
        data = body.get("data") if isinstance(body, dict) else None
        if isinstance(data, list) and len(data) == 1:
            data = data[0]  # a list of one: tolerated, though Ark sends the object itself
        if not isinstance(data, dict) or "embedding" not in data:
            raise MalformedResponseError(
                "answer's 'data' is not one object with an 'embedding' (the multimodal endpoint "
                "answers one fused vector per request)")
        vectors = self.finish_vectors(decode_embedding(data["embedding"], position=0)[None, :])
        check_vectors(vectors, 1, self.expected_dim)
        sparse = (parse_sparse(data.get("sparse_embedding")),) if self.cfg.sparse else None
        usage = body.get("usage")
        prompt, total, estimated = usage_tokens(usage, est_tokens)
        text_tokens, image_tokens = usage_details(usage)
        served = body.get("model")
        return EmbeddingResult(
            vectors=vectors, prompt_tokens=prompt, total_tokens=total,
            tokens_estimated=estimated, http_status=response.status_code,
            provider_request_id=(body.get("id") if isinstance(body.get("id"), str)
                                 else request_id_of(response)),
            rate_hint=parse_rate_limit_headers(response.headers),
            served_model=served if isinstance(served, str) and served else None,
            sparse=sparse, text_tokens=text_tokens, image_tokens=image_tokens)


class EnvelopeMultimodalProvider(EnvelopeProvider):
    """The envelope API with one record's parts as ``input``; see the module docstring."""

    def request_inputs(self, chunks: Sequence[Chunk], images: Any = None) -> Sequence[Any]:
        return record_parts(chunks, images)

    def build_request(self, texts: Sequence[Any], api_key: str | None) -> HttpRequest:
        body = self.body([], dimensions=self.cfg.send_dimensions)
        body["input"] = _one_record(texts)
        if self.cfg.parameters:
            body["parameters"] = dict(self.cfg.parameters)
        return HttpRequest("POST", f"{self.cfg.base_url}{SUBMIT_PATH}", body,
                           self.headers(api_key))

    def finish_result(self, result: EmbeddingResult, data: dict[str, Any]) -> EmbeddingResult:
        text_tokens, image_tokens = usage_details(data.get("usage"))
        return replace(result, text_tokens=text_tokens, image_tokens=image_tokens)


#: ``provider.kind`` → its multimodal provider.
MULTIMODAL_PROVIDERS: dict[str, type[Provider]] = {
    "ark": ArkMultimodalProvider,
    "envelope": EnvelopeMultimodalProvider,
}
