"""The keys every ``provider.kind`` shares: endpoint, model, key, request caps, plan and preflight.

Each provider module defines its own config class beside its :class:`~transforms.providers.base.
Provider`, by subclassing :class:`BaseProviderConfig` with a literal ``kind`` and the keys only
its dialect reads (:class:`~transforms.providers.openai.OpenAIConfig`,
:class:`~transforms.providers.ark.ArkConfig`,
:class:`~transforms.providers.envelope.EnvelopeConfig`). The registry
(:mod:`transforms.providers`) joins them into one union discriminated by ``kind``, so a key of
another kind is an error instead of a setting silently ignored. ::

    BaseProviderConfig            the keys below, shared by every kind
    ├── OpenAIConfig              kind: openai    + api_version, send_dimensions
    ├── ArkConfig                 kind: ark       (reduced sizes per model)
    └── EnvelopeConfig            kind: envelope  + send_dimensions, parameters, poll_path,
                                                    poll_timeout_s

A leaf module (pydantic only), so every provider module may import it.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from transforms.errors import ConfigError

_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def looks_like_a_key(value: str) -> bool:
    """Whether an ``api_key_env`` value is a key pasted in place of a variable name.

    Anything that is not a variable name (``sk-...``, with spaces, dots, slashes); and long
    random runs that are valid names by their characters but that no one names a variable
    with: a long name without an underscore and with several digits (Azure's 32 hex digits,
    base62), or a part between underscores of 16 characters or more holding a digit, or of 32
    or more (``ark_`` and 32 hex digits). Names are words: ``AZURE_OPENAI_API_KEY_20240501``.

    >>> looks_like_a_key("OPENAI_API_KEY"), looks_like_a_key("sk-proj-abc123")
    (False, True)
    """
    if not _VARIABLE_NAME.fullmatch(value):
        return True
    if len(value) >= 20 and "_" not in value and sum(c.isdigit() for c in value) >= 4:
        return True
    return any(len(part) >= 32 or (len(part) >= 16 and any(c.isdigit() for c in part))
               for part in value.split("_"))


class BaseProviderConfig(BaseModel):
    """The ``provider`` keys that mean the same for every kind.

    The defaults are OpenAI's for every kind: a config of another kind sets ``base_url``,
    ``model`` and ``api_key_env`` (as ``configs/ark.yaml`` and ``configs/envelope.yaml`` do).

    Subclasses may override :meth:`check` for rules that need the whole section (Ark's reduced
    sizes per model) and must name the key at fault.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    base_url: str = "https://api.openai.com/v1"
    model: str = "text-embedding-3-small"
    # The NAME of the environment variable that holds the key; None: no authentication.
    api_key_env: str | None = "OPENAI_API_KEY"
    # Reduced dimension: sent to the API (openai, envelope) or applied client-side (ark).
    dimensions: int | None = Field(None, gt=0)
    # L2-normalise every vector the server answers (Provider.finish_vectors), for any kind:
    # Ark's native vectors and servers that truncate `dimensions` without renormalising.
    normalize: bool = False
    encoding_format: Literal["base64", "float"] = "base64"
    timeout_s: float = Field(60, gt=0)
    # Request caps: how many inputs, tokens and UTF-8 bytes of input one request may carry.
    max_inputs_per_request: int = Field(256, gt=0)
    max_tokens_per_request: int = Field(100_000, gt=0)
    max_bytes_per_request: int = Field(4_000_000, gt=0)
    # The model's per-input token limit; None: the provider's built-in one (Ark: 4096), if any.
    max_input_tokens: int | None = Field(None, gt=0)
    # How the key is sent (Azure: auth_header api-key, auth_scheme None), and headers to add.
    auth_header: str = "Authorization"
    auth_scheme: str | None = "Bearer"
    extra_headers: dict[str, str] = Field(default_factory=dict)
    # Cost estimate for `embedpipe plan`.
    price_per_million_tokens: float | None = Field(None, ge=0)
    # One tiny request before the pipeline starts, so a bad key or model fails in seconds.
    preflight: bool = True
    # How requests reach the provider: one HTTP request each (online), or OpenAI's Batch API
    # (batch: uploaded files of requests, answered within a completion window at a discount,
    # with a quota of its own; its keys are kind openai's). Kinds without a batch API refuse it (batch_refusal).
    mode: Literal["online", "batch"] = "online"

    #: Why this kind has no batch mode (None: it has one); ``mode: batch`` is then refused.
    batch_refusal: ClassVar[str | None] = None

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_name(cls, v: str | None) -> str | None:
        # The value is never repeated in the message: the usual mistake is the key itself.
        if v is not None and looks_like_a_key(v):
            raise ValueError(
                "must be the NAME of the environment variable that holds the key (letters, "
                "digits and _, e.g. OPENAI_API_KEY), not the key itself; its value is not shown "
                "here. Export the key in a variable and put that variable's name here")
        return v

    def check_mode(self) -> None:
        """Refuse ``mode: batch`` for a kind without a batch API, saying why (exit 2)."""
        if self.mode == "batch" and self.batch_refusal is not None:
            raise ConfigError(f"batch mode is not available for kind {self.kind}: "
                              f"{self.batch_refusal}; use mode: online", key="provider.mode")

    def check(self) -> None:
        """Raise :class:`~transforms.errors.ConfigError` for settings this API cannot honour.

        Called once the whole config has validated, before any request is sent; the error names
        its key (``provider.dimensions``). Nothing to check for the shared keys.
        """
