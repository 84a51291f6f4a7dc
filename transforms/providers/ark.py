"""Volcengine Ark (火山方舟): the doubao-embedding text models.

``POST {base_url}/embeddings`` with ``{model, input, encoding_format}``; ``model`` is a model id
(``doubao-embedding-text-240715``) or an inference endpoint id (``ep-...``). The answer has
OpenAI's shape, so it is parsed by :func:`~transforms.providers.openai.parse_openai_answer`;
what differs is Ark's own:

- **No ``dimensions`` parameter.** Ark's documented dimension reduction (向量降维) happens on the
  client: keep the first ``provider.dimensions`` values of the native vector and L2-normalise
  them. Sizes are checked for the models whose reductions are documented; an endpoint id hides
  its model, so any size is accepted for it, and an answer too short for the size aborts the run
  (at the preflight, in practice).
- **Unnormalised vectors.** Reduced vectors are always normalised, since a prefix of a vector is
  not a unit vector; ``provider.normalize: true`` (a key of every kind, applied by
  :meth:`~transforms.providers.base.Provider.finish_vectors`) normalises native-size ones.
- **Limits.** At most 4096 tokens and 100,000 UTF-8 bytes per input, no empty input. No documented
  cap on inputs per request; Ark recommends at most 4 texts or 4096 tokens per request for
  latency, which ``configs/ark.yaml`` offers as a preset rather than a cap.
- **Error codes.** Ark says what went wrong in ``error.code``, and its 429 mixes throttling
  (retry) with exhausted quota (abort): :data:`ERROR_RULES` maps each documented code to its class.

**Config** (:class:`ArkConfig`): the shared keys, with a check of reduced sizes. OpenAI's
``api_version`` and ``send_dimensions`` are errors here, not settings silently ignored: Ark takes
no query parameters and is never sent ``dimensions``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import httpx
import numpy as np

from transforms.errors import (
    ConfigError,
    FatalProviderError,
    InputRejectedError,
    ProviderError,
    RateLimitedError,
    RetryableError,
)
from transforms.providers.base import (
    EmbeddingResult,
    HttpRequest,
    Provider,
    classify_http_error,
    error_code_and_message,
    l2_normalize,
    request_id_of,
    retry_after_seconds,
)
from transforms.providers.config import BaseProviderConfig
from transforms.providers.openai import parse_openai_answer

#: Sizes ``provider.dimensions`` may take for the models whose reductions Ark documents (the
#: native size included). Other model ids and every endpoint id accept any size.
DOCUMENTED_DIMENSIONS: Mapping[str, frozenset[int]] = {
    "doubao-embedding-text-240715": frozenset({512, 1024, 2048, 2560}),
    "doubao-embedding-large-text-250515": frozenset({256, 512, 1024, 2048}),
}

#: The sizes the multimodal endpoint serves (it reduces server-side; 2048 when unset).
MULTIMODAL_DIMENSIONS = frozenset({1024, 2048})


@dataclass(frozen=True, slots=True)
class ErrorRule:
    """One row of Ark's error table: the answers it matches and the class they become.

    ``codes`` are shell-style patterns (``"RateLimitExceeded.*"``); ``status`` pins the HTTP
    status the docs give for them, or is None for codes Ark sends with more than one status.
    """

    error: type[ProviderError]
    codes: tuple[str, ...]
    status: int | None = None

    def matches(self, status: int, code: str | None) -> bool:
        if code is None or (self.status is not None and status != self.status):
            return False
        return any(fnmatch.fnmatchcase(code, pattern) for pattern in self.codes)


#: Ark's documented error codes, first match wins. An answer no rule matches (401 with any code,
#: 5xx, an undocumented code) falls back to :func:`~transforms.providers.base.classify_http_error`:
#: 401/403/404 fatal, 429 throttled, 5xx retried, other 4xx about an input.
ERROR_RULES: tuple[ErrorRule, ...] = (
    # Throttling: slow down and retry.
    ErrorRule(
        RateLimitedError,
        ("RateLimitExceeded.*", "ModelAccountRpmRateLimitExceeded",
         "ModelAccountTpmRateLimitExceeded"),
        status=429,
    ),
    # Ark is short of capacity, not us over our budget: retry without slowing the limiter.
    ErrorRule(RetryableError, ("ServerOverloaded",)),
    # No request can succeed until someone tops up, raises a limit, grants access or opens a model.
    ErrorRule(FatalProviderError, ("QuotaExceeded", "SetLimitExceeded"), status=429),
    ErrorRule(FatalProviderError, ("AccountOverdueError", "AccessDenied"), status=403),
    ErrorRule(FatalProviderError, ("InvalidEndpointOrModel.NotFound", "ModelNotOpen")),
    # A closed endpoint refuses every request, not one input: bisecting would reject them all.
    ErrorRule(FatalProviderError, ("InvalidEndpoint.ClosedEndpoint",)),
    # About one input's content or length: bisect the request until that input is alone.
    ErrorRule(
        InputRejectedError,
        ("SensitiveContentDetected*", "InvalidParameter", "OutofContextError"),
        status=400,
    ),
)


class ArkConfig(BaseProviderConfig):
    """``provider.kind: ark``: the shared keys; ``dimensions`` checked against the model's sizes.

    A reduced size is always normalised; ``normalize: true`` normalises native-size vectors too.
    """

    kind: Literal["ark"] = "ark"
    batch_refusal: ClassVar[str | None] = (
        "Volcengine Ark documents batch inference for chat models only, not for embeddings")
    # Records (text and image parts) to {base_url}/embeddings/multimodal, one fused vector each
    # (transforms.providers.multimodal); needs input.image_field.
    multimodal: bool = False
    # Ask the multimodal endpoint for a sparse vector too (the sparse_embedding column).
    sparse: bool = False

    def check(self) -> None:
        """Refuse a reduced size the model does not document, before any request is sent."""
        if self.sparse and not self.multimodal:
            raise ConfigError(
                "sparse vectors come only from Ark's multimodal endpoint; set "
                "provider.multimodal: true (and input.image_field), or remove provider.sparse",
                key="provider.sparse",
            )
        if self.multimodal:
            if self.dimensions is not None and self.dimensions not in MULTIMODAL_DIMENSIONS:
                sizes = " or ".join(map(str, sorted(MULTIMODAL_DIMENSIONS)))
                raise ConfigError(
                    f"the multimodal endpoint serves {sizes} dimensions, not "
                    f"{self.dimensions}; choose one of them or null (2048)",
                    key="provider.dimensions",
                )
            return
        allowed = DOCUMENTED_DIMENSIONS.get(self.model)
        if self.dimensions is not None and allowed is not None and self.dimensions not in allowed:
            raise ConfigError(
                f"{self.model} serves {', '.join(map(str, sorted(allowed)))} dimensions, not "
                f"{self.dimensions}; choose one of them or null for the native size",
                key="provider.dimensions",
            )


class ArkProvider(Provider):
    """Volcengine Ark's ``/embeddings``: OpenAI's answer, Ark's request, reduction and errors."""

    kind = "ark"
    default_max_input_tokens = 4096
    cfg: ArkConfig

    def build_request(self, texts: Sequence[str], api_key: str | None) -> HttpRequest:
        return HttpRequest("POST", f"{self.cfg.base_url}/embeddings",
                           self.body(texts, dimensions=False), self.headers(api_key))

    def parse_response(
        self, response: httpx.Response, n_inputs: int, est_tokens: int
    ) -> EmbeddingResult:
        """OpenAI's parsing, plus a check that the native vectors can serve the reduced size.

        Only a model without documented sizes (an endpoint id, a newer model) can get here with a
        size above its native one, as :meth:`ArkConfig.check` vets the others; every answer will
        be as short, so no request can succeed and the run stops.
        """
        result = parse_openai_answer(response, n_inputs, est_tokens)
        native = result.vectors.shape[1]
        if self.cfg.dimensions is not None and native < self.cfg.dimensions:
            raise FatalProviderError(
                f"{self.cfg.model} answers {native}-dimensional vectors, too short to reduce to "
                f"provider.dimensions={self.cfg.dimensions}; choose a size up to {native}",
                http_status=response.status_code,
                provider_request_id=result.provider_request_id,
            )
        return result

    def finalize_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Ark's 向量降维: the first ``dimensions`` values, L2-normalised; native ones as sent."""
        if self.cfg.dimensions is not None:
            return l2_normalize(vectors[:, : self.cfg.dimensions])
        return vectors

    def classify_error(self, response: httpx.Response) -> ProviderError:
        """The first :data:`ERROR_RULES` row that matches, else the shared HTTP defaults."""
        code, message = error_code_and_message(response)
        retry_after_s = retry_after_seconds(response.headers)
        provider_request_id = request_id_of(response)
        for rule in ERROR_RULES:
            if rule.matches(response.status_code, code):
                return rule.error(
                    message,
                    http_status=response.status_code,
                    code=code,
                    retry_after_s=retry_after_s,
                    provider_request_id=provider_request_id,
                )
        return classify_http_error(
            response.status_code,
            code,
            message,
            retry_after_s=retry_after_s,
            provider_request_id=provider_request_id,
        )
