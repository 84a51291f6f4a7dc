"""Usage rows: one :class:`~transforms.types.UsageRecord` per HTTP attempt, answered or not.

Every attempt is accounted for, so ``usage/`` adds up to what the provider will bill and shows
each retry with its status and error. A row has fifteen fields; :class:`UsageRows` fixes the
two a session shares (model, worker), an :class:`Attempt` carries the four that describe the
attempt, and the answer or the error supplies the rest: no call site spells fifteen values.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from transforms.errors import ProviderError
from transforms.providers.base import EmbeddingResult
from transforms.types import OUTCOME_FAILED, OUTCOME_OK, OUTCOME_RETRY, UsageRecord


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One HTTP attempt of a logical request, as its usage row reports it.

    ``request_id`` names the attempt (``<batch>:<offset>+<n>:<attempt>``); ``latency_ms`` is
    the time from sending to the answer, after the limiter admitted it.
    """

    request_id: str
    n_inputs: int
    number: int  # 1 for the first attempt
    started_at: dt.datetime
    latency_ms: float


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageRows:
    """The usage-row builder of one session: what every row shares, set once.

    ``UsageRows(model=..., worker=...).answered(attempt, result)`` for an answer,
    ``.failed(attempt, error, detail=..., will_retry=...)`` for an error.
    """

    model: str
    worker: str

    def answered(self, attempt: Attempt, result: EmbeddingResult) -> UsageRecord:
        """The row of an attempt the provider answered with vectors."""
        return self._row(
            attempt,
            provider_request_id=result.provider_request_id,
            prompt_tokens=result.prompt_tokens,
            total_tokens=result.total_tokens,
            tokens_estimated=result.tokens_estimated,
            http_status=result.http_status,
            outcome=OUTCOME_OK,
            error=None,
            served_model=result.served_model,
            text_tokens=result.text_tokens,
            image_tokens=result.image_tokens,
        )

    def failed(
        self, attempt: Attempt, error: ProviderError, *, detail: str, will_retry: bool
    ) -> UsageRecord:
        """The row of a failed attempt: ``retry`` if it is tried again, else ``failed``.

        ``detail`` is the error as the row stores it, secrets already redacted. No tokens are
        counted: the provider did not embed anything.
        """
        return self._row(
            attempt,
            provider_request_id=error.provider_request_id,
            prompt_tokens=0,
            total_tokens=0,
            tokens_estimated=True,
            http_status=error.http_status,
            outcome=OUTCOME_RETRY if will_retry else OUTCOME_FAILED,
            error=detail,
        )

    def _row(
        self,
        attempt: Attempt,
        *,
        provider_request_id: str | None,
        prompt_tokens: int,
        total_tokens: int,
        tokens_estimated: bool,
        http_status: int | None,
        outcome: str,
        error: str | None,
        served_model: str | None = None,
        text_tokens: int | None = None,
        image_tokens: int | None = None,
    ) -> UsageRecord:
        return UsageRecord(
            request_id=attempt.request_id,
            provider_request_id=provider_request_id,
            model=self.model,
            n_inputs=attempt.n_inputs,
            prompt_tokens=prompt_tokens,
            total_tokens=total_tokens,
            tokens_estimated=tokens_estimated,
            attempt=attempt.number,
            http_status=http_status,
            outcome=outcome,
            error=error,
            latency_ms=attempt.latency_ms,
            started_at=attempt.started_at,
            worker=self.worker,
            served_model=served_model,
            text_tokens=text_tokens,
            image_tokens=image_tokens,
        )
