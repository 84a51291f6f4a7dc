"""The envelope dialect: every answer wrapped in ``{success, code, message, data}``; queued jobs.

Some gateways wrap every answer, errors included, in an envelope and answer HTTP 200 even when the
call failed: the status the API means is the envelope's ``code``. They may also queue a request
and answer with a job to poll instead of vectors. ::

    POST {base_url}/api/v1/embeddings          Authorization: Bearer <key>
    {"model", "input": [...], "encoding_format", "dimensions"?, "parameters"?}

    {"success": true, "code": "200", "message": "ok",
     "data": {"id": "...", "usage": {"prompt_tokens", "total_tokens"},
              "data": [{"index", "embedding"}]                    # OpenAI's layout, or
              "embeddings": [{"index", "embedding"} | [floats]]}}  # the envelope's own

``dimensions`` is sent only when set (and ``send_dimensions`` allows), ``parameters`` only when
``provider.parameters`` is non-empty. Embeddings are base64 or float; they are aligned by
``index`` when given, else taken in order.

**Errors.** A ``success: false`` answer (any HTTP status) and a non-2xx answer are classified by
:func:`classify_envelope_error`: by the envelope's ``code`` when it is an HTTP error status, else
by the HTTP status, with :func:`~transforms.providers.base.classify_http_error`'s rules:

=============================  ======================================================
``"429"``                      RateLimitedError (fatal when the message speaks of quota)
``"5xx"``, 408, 409, 425       RetryableError
``"400"``, other 4xx           InputRejectedError (the request is bisected)
``"413"``                      RequestTooLargeError (the request is split)
``"401"``/``"403"``/``"404"``  FatalProviderError (the run aborts, exit 3)
not a status (``"E42"``)       by the HTTP status; on HTTP 2xx, RetryableError
=============================  ======================================================

The envelope's code is reported as the error's ``http_status``: it is the status the API meant,
and ``usage/``, the manifest's ``throttled`` count and the preflight's hints key on it.

**Queued jobs.** When ``data.status`` is ``PENDING``, ``RUNNING`` or ``PROCESSING`` and no vectors
came, the job is polled at ``GET {base_url}{provider.poll_path}`` (``{id}`` is ``data.id``) with a
geometric backoff (:class:`PollBackoff`), or after the ``Retry-After`` the server asked for, until:

- ``COMPLETED`` (or vectors present): the vectors and usage are taken from that answer;
- ``FAILED``, ``ERROR`` or ``CANCELLED``: classified by the envelope's code when it is an error
  status, else a :class:`~transforms.errors.RetryableError`, so the request is submitted again;
- ``provider.poll_timeout_s`` elapses: a :class:`~transforms.errors.RetryableError` (resubmit).

A poll that itself fails transiently (a retryable answer, a dropped connection) does not end the
wait: the job may still be running, so polling goes on until the deadline. Fatal answers to a
poll abort like any other; the preflight polls too, so a wrong ``poll_path`` fails in seconds.

Submission and polls are one attempt for the embed stage: one usage row, one limiter charge
(polls are not charged to the requests-per-minute budget; the backoff keeps them sparse), and
its latency covers the whole wait. Each HTTP exchange is bounded by ``provider.timeout_s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import httpx
from pydantic import Field

from transforms.errors import ConfigError, MalformedResponseError, ProviderError, RetryableError
from transforms.limits import MONOTONIC, Clock
from transforms.providers.base import (
    EmbeddingResult,
    HttpRequest,
    Provider,
    align_by_index,
    check_vectors,
    classify_http_error,
    error_code_and_message,
    json_body,
    parse_rate_limit_headers,
    request_id_of,
    retry_after_seconds,
    usage_tokens,
)
from transforms.providers.config import BaseProviderConfig

#: ``data.status`` values of a job that is still being worked on.
QUEUED_STATES = frozenset({"PENDING", "RUNNING", "PROCESSING"})
#: ``data.status`` values of a job that ended without vectors.
FAILED_STATES = frozenset({"FAILED", "ERROR", "CANCELLED"})

#: Where requests are submitted, under ``provider.base_url`` (the host root).
SUBMIT_PATH = "/api/v1/embeddings"


@dataclass(frozen=True, slots=True)
class PollBackoff:
    """The wait between polls of a queued job: ``initial_s``, then ×``factor`` up to ``max_s``.

    Geometric rather than fixed, so a short job is picked up within a fraction of a second and a
    long one costs a poll every few seconds; no jitter, since one client polls one job.
    """

    initial_s: float = 0.2
    factor: float = 1.5
    max_s: float = 5.0

    def after(self, wait_s: float) -> float:
        return min(self.max_s, wait_s * self.factor)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One decoded answer; ``data`` is ``{}`` when the server sent none (error envelopes)."""

    success: bool
    code: str | None
    message: str
    data: dict[str, Any]

    @property
    def job_id(self) -> str | None:
        value = self.data.get("id")
        return None if value is None or value == "" else str(value)

    @property
    def job_status(self) -> str | None:
        value = self.data.get("status")
        return value.upper() if isinstance(value, str) else None

    @property
    def vector_items(self) -> list[Any] | None:
        """The embeddings in either layout (``data.data`` first), or None when there are none."""
        for key in ("data", "embeddings"):
            items = self.data.get(key)
            if isinstance(items, list) and items:
                return items
        return None


def read_envelope(response: httpx.Response) -> Envelope:
    """Decode an envelope; a body that is not one is malformed (and so retried)."""
    body = json_body(response)
    if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
        raise MalformedResponseError(
            "answer is not an envelope (no boolean 'success')", http_status=response.status_code
        )
    data = body.get("data")
    if data is not None and not isinstance(data, dict):
        raise MalformedResponseError(
            f"envelope 'data' is a {type(data).__name__}, not an object",
            http_status=response.status_code,
        )
    code = body.get("code")
    return Envelope(
        success=body["success"],
        code=None if code is None or code == "" else str(code),
        message=str(body.get("message") or ""),
        data=data or {},
    )


def classify_envelope_error(
    code: str | None,
    message: str,
    *,
    http_status: int,
    retry_after_s: float | None = None,
    provider_request_id: str | None = None,
) -> ProviderError:
    """Classify a failed answer by its envelope ``code``, falling back to the HTTP status.

    The code wins when it is an HTTP error status (``"429"``, ``"503"``): on this API the
    transport status is often 200 whatever happened. A code that is not one (``"E1001"``) says
    nothing we can act on: the HTTP status decides, and on a 2xx the answer is retried, since a
    failure the server did not attribute to the input or the key is most likely transient.
    """
    status = _error_status(code) or (http_status if http_status >= 400 else None)
    text = message or "the provider sent no message"
    # A code that only repeats the status says nothing more: keep messages "HTTP 429: ...".
    shown = None if code == str(status or http_status) else code
    if status is None:
        return RetryableError(
            text, http_status=http_status, code=shown, retry_after_s=retry_after_s,
            provider_request_id=provider_request_id,
        )
    return classify_http_error(
        status, shown, text, retry_after_s=retry_after_s, provider_request_id=provider_request_id
    )


def _error_status(code: str | None) -> int | None:
    """``code`` as an HTTP error status (400-599), or None when it is not one."""
    if code is None or len(code) != 3 or not (code.isascii() and code.isdigit()):
        return None
    status = int(code)
    return status if 400 <= status <= 599 else None


class EnvelopeConfig(BaseProviderConfig):
    """``provider.kind: envelope``: the shared keys, the body's ``parameters`` and job polling.

    ``send_dimensions: false`` keeps ``dimensions`` out of the body, as for ``kind: openai``.
    """

    kind: Literal["envelope"] = "envelope"
    batch_refusal: ClassVar[str | None] = (
        "the envelope API has no batch endpoint (its queued jobs, poll_path, are already "
        "waited for in online mode)")
    send_dimensions: bool = True
    # Sent as-is as the body's "parameters" when non-empty.
    parameters: dict[str, Any] = Field(default_factory=dict)
    # Where a queued job is polled, under base_url; {id} is the job's data.id.
    poll_path: str = "/api/v1/embeddings/{id}"
    # A job not done by then is submitted again.
    poll_timeout_s: float = Field(300, gt=0)
    # Each record's typed parts (text, image_url) as the body's "input", one record per request
    # (transforms.providers.multimodal); needs input.image_field.
    multimodal: bool = False

    def check(self) -> None:
        """A ``poll_path`` must be a path naming the job, or no job could ever be collected."""
        if not self.poll_path.startswith("/") or "{id}" not in self.poll_path:
            raise ConfigError(
                f"{self.poll_path!r} must start with '/' and contain '{{id}}' where the job id "
                "goes, e.g. /api/v1/embeddings/{id}",
                key="provider.poll_path",
            )


class EnvelopeProvider(Provider):
    """An envelope API (see the module docstring); synchronous answers and queued jobs alike.

    Overrides :meth:`embed` rather than ``parse_response``: a queued job needs the HTTP client
    between the submission and the answer that holds the vectors.

    ``clock`` times the polling; tests pass a fake one so that polling never really sleeps.
    Thread-safe: the embed stage shares one instance between its threads, and it keeps no
    state beyond its configuration.
    """

    kind = "envelope"
    #: How queued jobs are polled. A class attribute, so a test or subclass can shorten it.
    poll_backoff: PollBackoff = PollBackoff()

    cfg: EnvelopeConfig

    def __init__(self, cfg: EnvelopeConfig, *, clock: Clock = MONOTONIC) -> None:
        super().__init__(cfg, clock=clock)

    def build_request(self, texts: Sequence[str], api_key: str | None) -> HttpRequest:
        body = self.body(texts, dimensions=self.cfg.send_dimensions)
        if self.cfg.parameters:
            body["parameters"] = dict(self.cfg.parameters)
        return HttpRequest("POST", f"{self.cfg.base_url}{SUBMIT_PATH}", body,
                           self.headers(api_key))

    def embed(
        self, client: httpx.Client, texts: Sequence[str], api_key: str | None, est_tokens: int
    ) -> EmbeddingResult:
        """Submit ``texts``, wait for the job if the server queued it, return aligned vectors."""
        request = self.build_request(texts, api_key)
        submitted = self.send(client, request)
        response, answer = submitted, self._unwrap(submitted)
        if not self._is_done(response, answer):
            response, answer = self._await_job(client, request, submitted, answer)
        items = answer.vector_items
        if items is None:
            raise MalformedResponseError(
                f"answer with status {answer.job_status or '(none)'} holds no embeddings "
                "('data.data' or 'data.embeddings')",
                http_status=response.status_code,
            )
        vectors = self.finish_vectors(align_by_index(items, len(texts)))
        check_vectors(vectors, len(texts), self.expected_dim)
        prompt, total, estimated = usage_tokens(answer.data.get("usage"), est_tokens)
        served = answer.data.get("model")
        return self.finish_result(EmbeddingResult(
            vectors=vectors,
            prompt_tokens=prompt,
            total_tokens=total,
            tokens_estimated=estimated,
            http_status=response.status_code,
            provider_request_id=answer.job_id or request_id_of(submitted),
            rate_hint=parse_rate_limit_headers(submitted.headers),
            served_model=served if isinstance(served, str) and served else None,
        ), answer.data)

    def finish_result(self, result: EmbeddingResult, data: dict[str, Any]) -> EmbeddingResult:
        """The result, with whatever else a subclass reads from the answer's ``data``."""
        return result

    # -- answers ----------------------------------------------------------------------------

    def classify_error(self, response: httpx.Response) -> ProviderError:
        """A non-2xx answer, by its envelope when the body is one, else by its HTTP status.

        Proxies in front of the API answer with their own bodies (an HTML 503 page): those are
        read by :func:`~transforms.providers.base.error_code_and_message` like any other.
        """
        code, message = error_code_and_message(response)
        return classify_envelope_error(
            code,
            message,
            http_status=response.status_code,
            retry_after_s=retry_after_seconds(response.headers),
            provider_request_id=request_id_of(response),
        )

    def _unwrap(self, response: httpx.Response) -> Envelope:
        """The envelope of a successful answer; raises the classified error of a failed one.

        A ``success: false`` answer that states its job ``FAILED`` is returned, not raised:
        :meth:`_is_done` tells a failed job (submit again) from a failed poll (ask again).
        """
        if response.status_code >= 400:
            raise self.classify_error(response)
        answer = read_envelope(response)
        if not answer.success and answer.job_status not in FAILED_STATES:
            raise self._error(response, answer, answer.message)
        return answer

    def _is_done(self, response: httpx.Response, answer: Envelope) -> bool:
        """False while the job is queued; raises when it ended without vectors."""
        status = answer.job_status
        if status in FAILED_STATES:
            message = f"job {answer.job_id or '(no id)'} ended {status}"
            if answer.message:
                message += f": {answer.message}"
            raise self._error(response, answer, message)
        return status not in QUEUED_STATES or answer.vector_items is not None

    def _error(self, response: httpx.Response, answer: Envelope, message: str) -> ProviderError:
        return classify_envelope_error(
            answer.code,
            message,
            http_status=response.status_code,
            retry_after_s=retry_after_seconds(response.headers),
            provider_request_id=answer.job_id or request_id_of(response),
        )

    # -- queued jobs ------------------------------------------------------------------------

    def _await_job(
        self, client: httpx.Client, request: HttpRequest, submitted: httpx.Response,
        queued: Envelope,
    ) -> tuple[httpx.Response, Envelope]:
        """Poll the job ``queued`` announced until it is done; its final answer and envelope.

        Raises :class:`~transforms.errors.RetryableError` when ``provider.poll_timeout_s``
        elapses first, and the classified error when the job fails or a poll is refused.
        """
        job_id = queued.job_id
        if job_id is None:
            raise MalformedResponseError(
                f"job is {queued.job_status} but the answer has no 'data.id' to poll",
                http_status=submitted.status_code,
            )
        url = self.cfg.base_url + self.cfg.poll_path.replace("{id}", quote(job_id, safe=""))
        poll = HttpRequest("GET", url, None, request.headers)
        backoff = self.poll_backoff
        delay = backoff.initial_s
        hint = retry_after_seconds(submitted.headers)
        deadline = self.clock.now() + self.cfg.poll_timeout_s
        last_error: RetryableError | None = None
        while (remaining := deadline - self.clock.now()) > 0:
            self.clock.sleep(min(delay if hint is None else hint, remaining))
            try:
                response = self.send(client, poll)
                answer = self._unwrap(response)
            except RetryableError as exc:  # the poll failed, not the job: ask again later
                last_error, hint = exc, exc.retry_after_s
            else:
                if self._is_done(response, answer):
                    return response, answer
                hint = retry_after_seconds(response.headers)
            delay = backoff.after(delay)
        because = f"; last poll: {last_error.describe()}" if last_error else ""
        raise RetryableError(
            f"job {job_id} did not finish within provider.poll_timeout_s="
            f"{self.cfg.poll_timeout_s:g}s{because}",
            provider_request_id=job_id,
        )

