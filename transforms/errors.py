"""The one exception tree of embedpipe.

Errors from below (httpx, fsspec, the provider's JSON) are translated once, at the boundary that
sees them, into the most specific class here, and re-raised ``from exc`` so the cause is kept.
Retry and abort decisions test these classes, never httpx's.

::

    EmbedpipeError
    ├── ConfigError                 bad arguments or config, found before any API call (exit 2)
    ├── InputError                  an input file cannot be listed or opened
    ├── AccountingError             a run's output does not account for every chunk (exit 4)
    ├── StoreError                  the output or cache store cannot be written (exit 4)
    ├── LeaseLostError              another run took the output's lease: do not commit (exit 4)
    └── ProviderError               an answer (or no answer) from the embedding API
        ├── RetryableError          try the same request again, after a wait
        │   ├── RateLimitedError    429 / throttling: also slows the limiter down
        │   └── MalformedResponseError  unparseable body, wrong count, index or dimension
        ├── InputRejectedError      the provider refused the content of an input (400/422)
        │   └── ImageError          a record's image cannot be sent (unreadable, not an image,
        │                           too large): its reject's reason is the error's ``reason``
        ├── RequestTooLargeError    the request is over a server cap (413): shrink the request
        └── FatalProviderError      bad key, no quota, unknown model: abort the run (exit 3)

No message built here contains a secret: provider messages are passed through :func:`redact`
with the key before they are stored.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

#: The most characters of a provider's message that a usage or reject row keeps.
MAX_DETAIL_CHARS = 500


def bounded(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text``, or its first ``limit`` characters, an ellipsis and the length it had.

    >>> bounded("x" * 1200, 5)
    'xxxxx… [1,200 characters in all]'
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text):,} characters in all]"


class EmbedpipeError(Exception):
    """Base class of every error embedpipe raises on purpose."""


class ConfigError(EmbedpipeError):
    """The configuration or command line is invalid. Names the key at fault and how to fix it."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class InputError(EmbedpipeError):
    """An input URL cannot be listed or opened."""


class AccountingError(EmbedpipeError):
    """A finished run's outputs do not account for every chunk: it must not be committed."""


class StoreError(EmbedpipeError):
    """The output or the cache cannot be written even after a short retry: the run stops
    sending (every answer from then on would be paid for and lost) and commits nothing."""
class LeaseLostError(EmbedpipeError):
    """The output's lease names another run at commit time: this run must not commit.

    It happens when this run stalled past the lease's expiry (a machine asleep, a store that
    refused every renewal) and another run took the output over.
    """


class ProviderError(EmbedpipeError):
    """An error answer from the embedding API, already classified.

    ``code`` is the provider's own error code when it sent one (``RateLimitExceeded``, ``"429"``,
    ``invalid_api_key``); ``retry_after_s`` is the wait the provider asked for, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        provider_request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.code = code
        self.retry_after_s = retry_after_s
        self.provider_request_id = provider_request_id

    def describe(self) -> str:
        """One line for usage and reject rows: ``HTTP 429 RateLimitExceeded: too many requests``.

        A code that only repeats the status (vLLM's and infinity's ``"code": 400``) is said
        once, and the message is cut to :data:`MAX_DETAIL_CHARS` (:func:`bounded`): servers
        echo the request in their validation errors, and one refused request would otherwise
        copy every text it held into the row of each of its chunks. ``message`` itself stays
        whole, for classification.
        """
        status = None if self.http_status is None else str(self.http_status)
        code = None if self.code == status else self.code
        head = " ".join(part for part in (status and f"HTTP {status}", code) if part)
        message = bounded(self.message)
        return f"{head}: {message}" if head else message


class RetryableError(ProviderError):
    """A transient failure: the same request may succeed later."""


class RateLimitedError(RetryableError):
    """The provider throttled us (HTTP 429 or a throttling code)."""


class MalformedResponseError(RetryableError):
    """The answer cannot be trusted: bad JSON, or vectors that do not match the inputs."""


class DimensionChangedError(MalformedResponseError):
    """Vectors of another dimension than the run's: retried once as any bad answer; if it
    persists the server now serves another model, and the run is aborted (it cannot mix)."""


class InputRejectedError(ProviderError):
    """The provider rejected the content of the request (too long, unsafe, invalid)."""


class ImageError(InputRejectedError):
    """A record's image cannot be embedded; ``reason`` is its reject's reason code.

    An :class:`InputRejectedError`, so that in the embed stage it ends that record alone, like
    a refused input; raised before any request is sent (no usage row).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RequestTooLargeError(ProviderError):
    """The request exceeds a server-side cap on inputs or bytes; a smaller request will pass.

    ``max_inputs`` is the server's cap on inputs per request when its message said it
    (text-embeddings-inference: "batch size 64 > maximum allowed batch size 8").
    """

    def __init__(self, message: str, *, max_inputs: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.max_inputs = max_inputs


class FatalProviderError(ProviderError):
    """No request can succeed: bad key, no access, no quota, unknown model or endpoint."""


def option_strings(value: Any) -> Iterator[str]:
    """Every string in a (nested) storage-options mapping: what a backend may echo back."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from option_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from option_strings(item)


def redact(text: str, *secrets: str | None) -> str:
    """Remove every secret, and any 8-character piece of one echoed back, from ``text``."""
    out = text
    for secret in secrets:
        if not secret:
            continue
        out = out.replace(secret, "[REDACTED]")
        if len(secret) >= 16:
            # Providers echo keys partially ("sk-abc...wxyz"): drop every 8-character piece too.
            for i in range(len(secret) - 7):
                piece = secret[i : i + 8]
                if piece in out:
                    out = out.replace(piece, "[REDACTED]")
    return out
