"""Multimodal embedding APIs on loopback: Ark's ``/embeddings/multimodal`` and the envelope API
with typed parts, both over one fused model that tests can compute on their own.

The model (:func:`fused_vector`, :func:`sparse_vector`) is a deterministic function of a
request's text parts and image *bytes*, written here from the API's description and not from the
client, so that a vector in the output proves which text and which image were sent together:

- **fused**: every part of a request gives **one** vector (``data`` is one object for Ark);
- **dimensions**: 1024 or 2048 (default 2048), applied by the server;
- **sparse**: with ``sparse_embedding: {"type": "enabled"}``, ``data.sparse_embedding`` lists
  ``{index, value}`` in *descending* index order, so a client that does not sort is caught;
- **per-part validation** as Ark documents it: a part is ``{"type": "text", "text"}`` (non-empty)
  or ``{"type": "image_url", "image_url": {"url"}}``; a ``data:`` URL must decode to an image
  Pillow reads, at most 10 MB and 36 M pixels, else 400 ``InvalidParameter``; an ``http(s)``
  URL is not fetched (its bytes are taken to be the URL's own, at the token cap);
- **usage**: ``prompt_tokens`` = text tokens (:func:`~pipeline.local_server.count_tokens`) +
  image tokens (``ceil(w*h/784)``, at least 1 and at most 1312), with
  ``prompt_tokens_details: {text_tokens, image_tokens}``; :attr:`billed` keeps each answer's.

A text part containing a poison marker is refused with 400 ``InputTextSensitiveContentDetected``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline.local_server import ApiError, Reply, count_tokens, encode_embedding
from tests.support.ark_server import ArkApiError, ArkServer, ark_error
from tests.support.envelope_server import EnvelopeServer, envelope

MULTIMODAL_MODEL = "doubao-embedding-vision-250615"
DIMENSIONS = (1024, 2048)
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 36_000_000


def image_tokens(width: int, height: int) -> int:
    return max(1, min(1312, math.ceil(width * height / 784)))


def _seed(texts: Sequence[str], images: Sequence[bytes]) -> int:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(b"T" + hashlib.sha256(text.encode()).digest())
    for data in images:
        digest.update(b"I" + hashlib.sha256(data).digest())
    return int.from_bytes(digest.digest()[:8], "little")


def fused_vector(texts: Sequence[str], images: Sequence[bytes], dim: int) -> np.ndarray:
    """The one vector of a request with these text parts and image bytes (unit length)."""
    vector = np.random.default_rng(_seed(texts, images)).standard_normal(dim).astype(np.float32)
    return vector / np.float32(np.linalg.norm(vector))


def sparse_vector(texts: Sequence[str], images: Sequence[bytes]) -> list[tuple[int, float]]:
    """The request's sparse vector as ``(index, value)`` pairs, sorted by index."""
    rng = np.random.default_rng(_seed(texts, images) ^ 0x5A5A)
    n = 3 + len(texts) * 2 + len(images) * 3
    indices = sorted({int(i) for i in rng.integers(0, 250_000, n)})
    return [(i, float(np.float32(rng.uniform(0.01, 2.0)))) for i in indices]


@dataclass(frozen=True)
class Billed:
    """What one answered request cost: its parts' digest, and the tokens by kind."""

    texts: tuple[str, ...]
    image_sha256: tuple[str, ...]
    text_tokens: int
    image_tokens: int


class _Parts:
    """A request's parts, validated; raises :class:`ApiError` as the dialect sends it."""

    def __init__(self, value: Any, fail: Any) -> None:
        self.texts: list[str] = []
        self.images: list[bytes] = []
        self.image_tokens = 0
        if not isinstance(value, list) or not value:
            raise fail("input must be a non-empty list of parts")
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str) or not text:
                    raise fail(f"input[{i}].text must be a non-empty string")
                self.texts.append(text)
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url") if isinstance(
                    part.get("image_url"), dict) else None
                if not isinstance(url, str) or not url:
                    raise fail(f"input[{i}].image_url.url must be a URL")
                data, tokens = self._image(i, url, fail)
                self.images.append(data)
                self.image_tokens += tokens
            else:
                raise fail(f"input[{i}] has an unknown type {kind!r}")
        self.text_tokens = sum(count_tokens(t) for t in self.texts)

    @staticmethod
    def _image(i: int, url: str, fail: Any) -> tuple[bytes, int]:
        if url.startswith(("http://", "https://")):
            return url.encode(), 1312
        head, _, payload = url.partition(",")
        if not head.startswith("data:image/") or not head.endswith(";base64"):
            raise fail(f"input[{i}].image_url.url must be http(s) or data:image/...;base64")
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:
            raise fail(f"input[{i}] image is not valid base64") from None
        if len(data) > MAX_IMAGE_BYTES:
            raise fail(f"input[{i}] image is over 10 MB")
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise fail(f"input[{i}] image is over 36 M pixels")
                image.verify()
        except ApiError:
            raise
        except Exception:  # noqa: BLE001
            raise fail(f"input[{i}] image cannot be decoded") from None
        return data, image_tokens(width, height)


class _Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._billed: list[Billed] = []

    def add(self, parts: _Parts) -> None:
        with self._lock:
            self._billed.append(Billed(
                tuple(parts.texts), tuple(hashlib.sha256(d).hexdigest() for d in parts.images),
                parts.text_tokens, parts.image_tokens))

    @property
    def billed(self) -> list[Billed]:
        with self._lock:
            return list(self._billed)


def _usage(parts: _Parts) -> dict[str, Any]:
    total = parts.text_tokens + parts.image_tokens
    return {"prompt_tokens": total, "total_tokens": total,
            "prompt_tokens_details": {"text_tokens": parts.text_tokens,
                                      "image_tokens": parts.image_tokens}}


_ARK_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "sparse_embedding"})


class ArkMultimodalServer(ArkServer):
    """Ark with ``/api/v3/embeddings/multimodal`` beside its text endpoint; see the module."""

    def __init__(self, *, models: Mapping[str, int] | None = None, **kwargs: Any) -> None:
        super().__init__(models=models or {MULTIMODAL_MODEL: 2048, "ep-text": 32}, **kwargs)
        self.ledger = _Ledger()

    @property
    def billed(self) -> list[Billed]:
        return self.ledger.billed

    def route(self, method: str, path: str, payload: Any, headers: Mapping[str, str]) -> Reply:
        if (method, path) != ("POST", "/api/v3/embeddings/multimodal"):
            return super().route(method, path, payload, headers)
        scheduled = self.scheduled_fault()
        if scheduled is not None:
            return scheduled
        if not isinstance(payload, dict):
            raise ArkApiError(400, "InvalidParameter", "the request body must be a JSON object")
        return self._multimodal(payload)

    def _multimodal(self, payload: dict[str, Any]) -> Reply:
        def fail(message: str) -> ArkApiError:
            return ArkApiError(400, "InvalidParameter", message, param="input")

        unknown = sorted(set(payload) - _ARK_FIELDS)
        if unknown:
            raise ArkApiError(400, "InvalidParameter", f"The parameter {unknown[0]} specified "
                              "in the request is not valid.", param=unknown[0])
        model = payload.get("model")
        if model != MULTIMODAL_MODEL:
            raise ArkApiError(404, "InvalidEndpointOrModel.NotFound",
                              f"The model or endpoint {model} does not exist or you do not have "
                              "access to it.")
        dim = payload.get("dimensions", 2048)
        if dim not in DIMENSIONS:
            raise ArkApiError(400, "InvalidParameter", "dimensions must be 1024 or 2048",
                              param="dimensions")
        sparse = payload.get("sparse_embedding")
        if sparse is not None and sparse != {"type": "enabled"} and sparse != {"type": "disabled"}:
            raise ArkApiError(400, "InvalidParameter", "sparse_embedding.type must be enabled or "
                              "disabled", param="sparse_embedding")
        encoding_format = payload.get("encoding_format", "float")
        if encoding_format not in ("float", "base64"):
            raise ArkApiError(400, "InvalidParameter", "encoding_format must be float or base64")
        parts = _Parts(payload.get("input"), fail)
        if self.poison.find(parts.texts) is not None:
            return ark_error(400, "InputTextSensitiveContentDetected",
                             "The request failed because the input text may contain sensitive "
                             "information.")
        data: dict[str, Any] = {
            "object": "embedding",
            "embedding": encode_embedding(fused_vector(parts.texts, parts.images, dim),
                                          encoding_format)}
        if sparse == {"type": "enabled"}:
            pairs = sparse_vector(parts.texts, parts.images)
            data["sparse_embedding"] = [{"index": i, "value": v} for i, v in reversed(pairs)]
        self.ledger.add(parts)
        self.record_served(parts.texts, parts.text_tokens + parts.image_tokens)
        return Reply(200, {"id": uuid.uuid4().hex, "object": "list", "model": model,
                           "data": data, "usage": _usage(parts)})


class MultimodalEnvelopeServer(EnvelopeServer):
    """The envelope API taking one record's typed parts as ``input`` (one vector back)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ledger = _Ledger()

    @property
    def billed(self) -> list[Billed]:
        return self.ledger.billed

    def _submit(self, payload: Any) -> Reply:
        value = payload.get("input") if isinstance(payload, dict) else None
        if not (isinstance(value, list) and value and all(isinstance(p, dict) for p in value)):
            return super()._submit(payload)  # texts: the preflight, text-only servers
        with self._lock:
            self._payloads.append(payload)
        scheduled = self.scheduled_fault()
        if scheduled is not None:
            return scheduled
        if payload.get("model") != self.model:
            raise ApiError(404, f"model {payload.get('model')!r} not found")
        parts = _Parts(value, lambda message: ApiError(400, message))
        if self.poison.find(parts.texts) is not None:
            raise ApiError(400, "input contains forbidden content")
        encoding_format = payload.get("encoding_format", "float")
        vector = fused_vector(parts.texts, parts.images, self.dim)
        self.ledger.add(parts)
        self.record_served(parts.texts, parts.text_tokens + parts.image_tokens)
        return envelope({"id": f"emb-{uuid.uuid4().hex[:8]}", "model": self.model,
                         "data": [{"object": "embedding", "index": 0,
                                   "embedding": encode_embedding(vector, encoding_format)}],
                         "usage": _usage(parts)})
