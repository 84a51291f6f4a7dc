"""The OpenAI-compatible family: OpenAI, Azure OpenAI, vLLM, TEI, Ollama, LiteLLM and the like.

``POST {base_url}/embeddings`` with ``{model, input, encoding_format, dimensions}``; the answer is
``{data: [{index, embedding}], usage: {prompt_tokens, total_tokens}}``. Variants are options,
not subclasses:

- Azure: ``base_url: https://RESOURCE.openai.azure.com/openai/deployments/DEPLOYMENT``,
  ``auth_header: api-key``, ``auth_scheme: null``, ``api_version: "2024-10-21"``.
- Servers without ``usage`` (Ollama, some vLLM builds): tokens are estimated and the usage row
  says ``tokens_estimated``.
- Servers that reject ``dimensions``: ``send_dimensions: false``.
- A server with a cap on inputs per request states it when refusing a larger one (TEI's 413
  "batch size 64 > maximum allowed batch size 8", FastAPI's 422 ``too_long``, vLLM's 400,
  OpenAI's and Azure's 400): every shape is read (:mod:`transforms.providers.caps`), classified as
  :class:`~transforms.errors.RequestTooLargeError` carrying the cap, and the embed stage sends
  smaller requests from then on instead of failing.
- Error bodies come in several shapes (OpenAI's ``{error: {message, code}}``, TEI's flat
  ``{error, error_type}`` or ``{message, code, type}``, vLLM's integer ``code``, HTML pages from
  proxies); :func:`~transforms.providers.base.error_code_and_message` reads them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import httpx
from pydantic import Field

from transforms.errors import MalformedResponseError
from transforms.providers.base import (
    EmbeddingResult,
    HttpRequest,
    Provider,
    align_by_index,
    json_body,
    usage_tokens,
)
from transforms.providers.config import BaseProviderConfig


class OpenAIConfig(BaseProviderConfig):
    """``provider.kind: openai``: the shared keys, plus the variants of OpenAI-compatible servers.

    ``api_version`` is sent as ``?api-version=`` (Azure); ``send_dimensions: false`` keeps
    ``dimensions`` out of the body for servers that reject it (TEI, vLLM without Matryoshka).
    """

    kind: Literal["openai"] = "openai"
    api_version: str | None = None
    send_dimensions: bool = True
    # provider.mode: batch (docs/batch.md): how often each open batch is asked its state, the
    # batches' completion_window, the batch price over the online one (plan, manifest, summary),
    # inputs per batch (OpenAI's cap is 50,000: smaller batches finish and fail in smaller
    # pieces), and how many batches one worker fills and waits for at once (memory: their chunks).
    batch_poll_interval_s: float = Field(60, gt=0)
    batch_completion_window: str = Field("24h", pattern=r"^[1-9][0-9]*h$")
    batch_discount: float = Field(0.5, ge=0, le=1)
    batch_max_inputs: int = Field(50_000, gt=0, le=50_000)
    batch_max_open: int = Field(4, gt=0)


class OpenAIProvider(Provider):
    """An OpenAI-compatible ``/embeddings`` endpoint."""

    kind = "openai"
    # Model-dependent (8191 for OpenAI's models): set provider.max_input_tokens.
    default_max_input_tokens: ClassVar[int | None] = None
    cfg: OpenAIConfig

    def build_request(self, texts: Sequence[str], api_key: str | None) -> HttpRequest:
        params = {"api-version": self.cfg.api_version} if self.cfg.api_version else None
        body = self.body(texts, dimensions=self.cfg.send_dimensions)
        return HttpRequest("POST", f"{self.cfg.base_url}/embeddings", body,
                           self.headers(api_key), params)

    def parse_response(
        self, response: httpx.Response, n_inputs: int, est_tokens: int
    ) -> EmbeddingResult:
        return parse_openai_answer(response, n_inputs, est_tokens)


def parse_openai_answer(
    response: httpx.Response, n_inputs: int, est_tokens: int
) -> EmbeddingResult:
    """An answer of OpenAI's shape, ``{data: [{index, embedding}], usage, id?}``, aligned.

    A function rather than a method so that Ark, whose answers have this shape but whose config
    does not, shares it without being an :class:`OpenAIProvider`.
    """
    body = json_body(response)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise MalformedResponseError(
            "answer has no 'data' list", http_status=response.status_code
        )
    vectors = align_by_index(data, n_inputs)
    prompt, total, estimated = usage_tokens(body.get("usage"), est_tokens)
    served = body.get("model")
    return EmbeddingResult(
        vectors=vectors,
        prompt_tokens=prompt,
        total_tokens=total,
        tokens_estimated=estimated,
        http_status=response.status_code,
        provider_request_id=body.get("id") if isinstance(body.get("id"), str) else None,
        served_model=served if isinstance(served, str) and served else None,
    )
