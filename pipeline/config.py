"""The validated configuration: read once, at the edge, from YAML plus ``--set`` overrides.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error that
names it instead of a silently ignored setting. Cross-field rules (overlap below max_tokens,
chunk size within the provider's per-input limit, dimensions the model supports) are checked
here, before any worker starts or any request is sent. Nothing deeper in the pipeline reads
the environment, except the one place that resolves the API key on the worker.

Example::

    cfg = load_config("configs/local.yaml", overrides=["limits.tokens_per_minute=500000"])
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from transforms.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(_Section):
    path: str | list[str]
    format: Literal["auto", "jsonl", "parquet", "csv", "text"] = "auto"
    id_field: str = "id"
    text_field: str = "text"
    metadata_fields: list[str] = Field(default_factory=list)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # Uncompressed JSONL and CSV files above this size are read in ranges of about this size by
    # several workers (Parquet: groups of row groups); compressed files are read whole.
    range_bytes: int = Field(64 * 1024 * 1024, gt=0)

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
            raise ValueError("give at least one fsspec URL or glob")
        return v


class ValidateConfig(_Section):
    max_document_bytes: int = Field(10_000_000, gt=0)


class SplitConfig(_Section):
    max_tokens: int = Field(512, gt=0)
    overlap_tokens: int = Field(64, ge=0)
    tokenizer: Literal["cl100k_base", "o200k_base", "chars"] = "cl100k_base"

    @model_validator(mode="after")
    def _overlap_below_max(self) -> SplitConfig:
        if self.overlap_tokens >= self.max_tokens:
            raise ValueError(
                f"overlap_tokens ({self.overlap_tokens}) must be smaller than max_tokens "
                f"({self.max_tokens})"
            )
        return self


class ProviderConfig(_Section):
    kind: str = "openai"
    base_url: str = "https://api.openai.com/v1"
    model: str = "text-embedding-3-small"
    api_key_env: str | None = "OPENAI_API_KEY"
    dimensions: int | None = Field(None, gt=0)
    normalize: bool = False
    encoding_format: Literal["base64", "float"] = "base64"
    timeout_s: float = Field(60, gt=0)
    max_inputs_per_request: int = Field(256, gt=0)
    max_tokens_per_request: int = Field(100_000, gt=0)
    max_bytes_per_request: int = Field(4_000_000, gt=0)
    max_input_tokens: int | None = Field(None, gt=0)
    # OpenAI-compatible variants (Azure: auth_header api-key, api_version; see README).
    auth_header: str = "Authorization"
    auth_scheme: str | None = "Bearer"
    api_version: str | None = None
    extra_headers: dict[str, str] = Field(default_factory=dict)
    send_dimensions: bool = True
    # Envelope API.
    parameters: dict[str, Any] = Field(default_factory=dict)
    poll_path: str = "/api/v1/embeddings/{id}"
    poll_timeout_s: float = Field(300, gt=0)
    # Cost estimate for `embedpipe plan`.
    price_per_million_tokens: float | None = Field(None, ge=0)
    # One tiny request before the pipeline starts, so a bad key or model fails in seconds.
    preflight: bool = True

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v.rstrip("/")


class LimitsConfig(_Section):
    requests_per_minute: float = Field(3000, gt=0)
    tokens_per_minute: float = Field(1_000_000, gt=0)
    max_concurrency: int = Field(16, gt=0)
    # Worker processes sharing the budget: "auto" derives it from the Beam options.
    workers: int | Literal["auto"] = "auto"


class RetryConfig(_Section):
    max_attempts: int = Field(8, gt=0)
    max_wait_s: float = Field(120, gt=0)
    initial_wait_s: float = Field(1.0, gt=0)


class OutputConfig(_Section):
    path: str = "./out/run"
    include_text: bool = False
    rows_per_file: int = Field(100_000, gt=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    overwrite: bool = False


class CacheConfig(_Section):
    enabled: bool = True
    path: str | None = None


class Config(_Section):
    input: InputConfig
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    split: SplitConfig = Field(default_factory=SplitConfig)
    provider: ProviderConfig = Field(default_factory=ProviderConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def public_dict(self) -> dict[str, Any]:
        """The config as written to the manifest: storage secrets removed, key *names* kept."""
        data = self.model_dump(by_alias=True, mode="json")
        for section in ("input", "output"):
            data[section]["storage_options"] = _redact_options(data[section]["storage_options"])
        return data


_SECRET_OPTION_WORDS = ("key", "secret", "token", "password", "credential", "sas")


def _redact_options(options: dict[str, Any]) -> dict[str, Any]:
    return {
        k: ("[REDACTED]" if any(w in k.lower() for w in _SECRET_OPTION_WORDS) else v)
        for k, v in options.items()
    }


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set a.b=value`` pairs; values are YAML scalars (``true``, ``5``, ``null``)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}", key="--set")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"value {raw!r} is not valid YAML: {exc}", key=key) from exc
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{part!r} is not a section", key=key)
            node = child
        node[parts[-1]] = value
    return out


def parse_config(data: dict[str, Any], *, source: str = "config") -> Config:
    """Validate a config mapping; every problem is reported with its dotted key."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines)) from None
    _check_cross_rules(cfg)
    return cfg


def _check_cross_rules(cfg: Config) -> None:
    from transforms.providers import get_provider_class

    provider_cls = get_provider_class(cfg.provider.kind)
    provider_cls.check_config(cfg.provider)
    limit = cfg.provider.max_input_tokens or provider_cls.default_max_input_tokens
    if limit is not None and cfg.split.max_tokens > limit:
        raise ConfigError(
            f"{cfg.split.max_tokens} is above the provider's per-input limit of {limit} tokens; "
            f"lower split.max_tokens",
            key="split.max_tokens",
        )
    if cfg.split.max_tokens > cfg.provider.max_tokens_per_request:
        raise ConfigError(
            f"a single chunk ({cfg.split.max_tokens} tokens) would not fit in a request of "
            f"provider.max_tokens_per_request={cfg.provider.max_tokens_per_request}",
            key="split.max_tokens",
        )


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply ``--set`` overrides and validate it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}", key="--config") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}", key="--config") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections", key="--config")
    return parse_config(apply_overrides(data, overrides or []), source=str(p))
