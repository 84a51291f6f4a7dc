"""OpenAI's Files and Batches API: the HTTP calls batch mode makes, and nothing else.

Batch mode (``provider.mode: batch``, :mod:`transforms.batch_session`) embeds through this
module: upload a JSONL file of requests (``POST /files``, ``purpose=batch``), create a batch
(``POST /batches``), poll it (``GET /batches/{id}``), download its output and error files
(``GET /files/{id}/content``), find the batches of an earlier process by their ``metadata``
(``GET /batches``, paged with ``after``), and cancel one (``POST /batches/{id}/cancel``).

Errors are classified by the provider exactly as its online answers are
(:meth:`~transforms.providers.base.Provider.classify_error`): a bad key or an exhausted quota is
a :class:`~transforms.errors.FatalProviderError`, a 5xx or a dropped connection is retried with
the run's :class:`~transforms.retry.RetryPolicy`. One call is not blindly retried: creating a
batch. A ``POST /batches`` whose answer was lost may have created it, and a second one would be
paid twice; :meth:`BatchApi.create` looks for it by its ``metadata`` before it tries again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from transforms.errors import MalformedResponseError, ProviderError, RetryableError
from transforms.providers.base import Provider, redirect_error, request_id_of
from transforms.retry import RetryPolicy

#: The states after which a batch never changes again.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: Every state, in the order a batch goes through them (for progress lines).
STATES = ("validating", "in_progress", "finalizing", "cancelling",
          "completed", "failed", "expired", "cancelled")
#: The endpoint every request line names.
EMBEDDINGS_ENDPOINT = "/v1/embeddings"


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """A batch object as ``GET /batches/{id}`` answers it, reduced to what batch mode reads."""

    id: str
    status: str
    input_file_id: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: ``errors.data`` of a batch that failed validation: ``{code, message, param, line}`` each.
    errors: tuple[Mapping[str, Any], ...] = ()
    total: int = 0
    completed: int = 0
    failed: int = 0
    created_at: int = 0

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def parse(cls, body: Any) -> BatchInfo:
        """Read a batch object; one without an ``id``, ``status`` or input file is malformed."""
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) \
                or not isinstance(body.get("status"), str):
            raise MalformedResponseError(f"not a batch object: {str(body)[:200]}")
        counts = body.get("request_counts") or {}
        errors = body.get("errors") or {}
        data = errors.get("data") if isinstance(errors, dict) else None
        metadata = body.get("metadata") or {}
        return cls(
            id=body["id"],
            status=body["status"],
            input_file_id=str(body.get("input_file_id") or ""),
            output_file_id=body.get("output_file_id") or None,
            error_file_id=body.get("error_file_id") or None,
            metadata={str(k): str(v) for k, v in metadata.items()}
            if isinstance(metadata, dict) else {},
            errors=tuple(e for e in data if isinstance(e, dict)) if isinstance(data, list) else (),
            total=int(counts.get("total") or 0),
            completed=int(counts.get("completed") or 0),
            failed=int(counts.get("failed") or 0),
            created_at=int(body.get("created_at") or 0),
        )


class BatchApi:
    """The Files and Batches endpoints under the provider's ``base_url``, with retries.

    ``sleep`` is injected with the retry waits (tests pass a fake clock's).
    """

    def __init__(
        self,
        provider: Provider,
        client: httpx.Client,
        api_key: str | None,
        retry: RetryPolicy,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.provider = provider
        self.client = client
        self.retry = retry
        self._headers = provider.auth_headers(api_key)
        self._headers.update(provider.cfg.extra_headers)
        self._sleep = sleep
        self.base_url = provider.cfg.base_url

    # -- the calls ---------------------------------------------------------------------------

    def upload(self, filename: str, data: bytes) -> str:
        """``POST /files`` with ``purpose=batch``; the new file's id."""
        body = self._json("POST", "/files", data={"purpose": "batch"},
                          files={"file": (filename, data, "application/jsonl")})
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise MalformedResponseError(f"the upload's answer names no file id: {body!r:.200}")
        return body["id"]

    def create(self, input_file_id: str, metadata: Mapping[str, str], window: str) -> BatchInfo:
        """``POST /batches``. Retried only after a look for the batch it may have created."""
        payload = {"input_file_id": input_file_id, "endpoint": EMBEDDINGS_ENDPOINT,
                   "completion_window": window, "metadata": dict(metadata)}
        for attempt in self.retry.retrying(sleep=self._sleep):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    made = self.find(lambda b: b.input_file_id == input_file_id
                                     and dict(b.metadata) == dict(metadata), pages=2)
                    if made is not None:
                        return made
                return BatchInfo.parse(self._once("POST", "/batches", json=payload))
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def get(self, batch_id: str) -> BatchInfo:
        return BatchInfo.parse(self._json("GET", f"/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> BatchInfo:
        return BatchInfo.parse(self._json("POST", f"/batches/{batch_id}/cancel"))

    def content(self, file_id: str) -> bytes:
        """``GET /files/{id}/content``: the file's bytes."""
        return self._call("GET", f"/files/{file_id}/content").content

    def batches(self, *, page_size: int = 100, pages: int | None = None) -> Iterator[BatchInfo]:
        """Every batch of the organisation, newest first, ``page_size`` per ``GET /batches``."""
        after: str | None = None
        for _ in iter(int, 1) if pages is None else range(pages):
            params = {"limit": str(page_size), **({"after": after} if after else {})}
            body = self._json("GET", "/batches", params=params)
            data = body.get("data") if isinstance(body, dict) else None
            if not isinstance(data, list):
                raise MalformedResponseError(f"the batch list has no 'data': {body!r:.200}")
            for item in data:
                yield BatchInfo.parse(item)
            if not data or not body.get("has_more"):
                return
            after = body.get("last_id") or data[-1].get("id")

    def find(self, match: Callable[[BatchInfo], bool], *, pages: int | None = None
             ) -> BatchInfo | None:
        return next((b for b in self.batches(pages=pages) if match(b)), None)

    # -- HTTP --------------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call, retried, its answer's JSON."""
        return _parsed(self._call(method, path, **kwargs), method, path)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in self.retry.retrying(sleep=self._sleep):
            with attempt:
                return self._send(method, path, **kwargs)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _once(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call, not retried, its answer's JSON."""
        return _parsed(self._send(method, path, **kwargs), method, path)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One exchange; transport failures are retryable, error answers classified."""
        url = f"{self.base_url}{path}"
        try:
            response = self.client.request(method, url, headers=self._headers,
                                           follow_redirects=False, **kwargs)
        except httpx.TransportError as exc:
            raise RetryableError(
                f"{method} {url} got no answer ({type(exc).__name__}: {exc})") from exc
        if 300 <= response.status_code < 400:
            raise redirect_error(response)
        if response.status_code >= 400:
            error: ProviderError = self.provider.classify_error(response)
            error.provider_request_id = error.provider_request_id or request_id_of(response)
            raise error
        return response


def _parsed(response: httpx.Response, method: str, path: str) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedResponseError(
            f"{method} {path} answered {response.status_code} with a body that is not JSON",
            http_status=response.status_code) from exc
