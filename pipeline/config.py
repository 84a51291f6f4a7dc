"""The validated configuration: read once, at the edge, from YAML plus ``--set`` overrides.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error that
names it instead of a silently ignored setting. Cross-field rules (overlap below max_tokens,
chunk size within the provider's per-input limit, dimensions the model supports) are checked
here, before any worker starts or any request is sent. The ``provider`` section is validated by
the model of its ``provider.kind``: a key of another kind is an error that names both. Nothing
deeper in the pipeline reads the environment, except the one place that resolves the API key on
the worker.

Example::

    cfg = load_config("configs/local.yaml", overrides=["limits.tokens_per_minute=500000"])
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from transforms.errors import ConfigError
from transforms.providers import (
    ArkConfig,
    EnvelopeConfig,
    OpenAIConfig,
    get_provider_class,
    misplaced_key_message,
    provider_kinds,
    unknown_kind_message,
)
from transforms.sections import (
    CacheConfig,
    InputConfig,
    LimitsConfig,
    OutputConfig,
    ProviderConfig,
    RetryConfig,
    SplitConfig,
    ValidateConfig,
    _Section,
)
from transforms.tokens import get_tokenizer, is_tokenizer_file

__all__ = [
    "ArkConfig", "CacheConfig", "Config", "EnvelopeConfig", "InputConfig", "LimitsConfig",
    "OpenAIConfig", "OutputConfig", "ProviderConfig", "RetryConfig", "SplitConfig",
    "ValidateConfig", "apply_overrides", "load_config", "parse_config",
]


class Config(_Section):
    input: InputConfig
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    split: SplitConfig = Field(default_factory=SplitConfig)
    provider: ProviderConfig = Field(default_factory=OpenAIConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def public_dict(self) -> dict[str, Any]:
        """The config as written to the manifest: every secret removed, key *names* kept.

        Storage options are redacted at any depth by name (``client_kwargs.
        aws_secret_access_key``), every ``provider.extra_headers`` value is redacted (gateway
        keys travel as headers of any name), and credentials in URLs (``https://user:pass@``,
        an Azure SAS URL's ``sig``) are removed wherever they are. Only this copy is redacted:
        the run itself uses the values as given.
        """
        data = self.model_dump(by_alias=True, mode="json")
        for section in ("input", "output"):
            data[section]["storage_options"] = redact_options(data[section]["storage_options"])
        headers = data["provider"].get("extra_headers") or {}
        data["provider"]["extra_headers"] = {name: REDACTED for name in headers}
        return _scrub_urls(data)


REDACTED = "[REDACTED]"
#: Words that mark an option's value as a credential wherever they appear in its lower-cased
#: name: ``key`` covers ``aws_secret_access_key``, ``account_key`` and ``sas_token`` twice over.
_SECRET_OPTION_WORDS = ("key", "secret", "token", "password", "passwd", "pwd", "credential",
                        "sas", "signature", "auth", "session", "cookie", "private",
                        "connection_string")
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def looks_secret(name: str) -> bool:
    """Whether an option (or URL query parameter) named ``name`` holds a credential."""
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_OPTION_WORDS) or lowered == "sig"


def redact_options(options: Any) -> Any:
    """Storage options with every value whose name suggests a credential redacted, at any depth.

    A secret-named option is redacted whole, whatever it holds (a dict of credentials too);
    booleans and nulls stay, since they say how a store is reached, not with what.

    >>> redact_options({"client_kwargs": {"aws_secret_access_key": "s3cr3t", "region_name": "x"}})
    {'client_kwargs': {'aws_secret_access_key': '[REDACTED]', 'region_name': 'x'}}
    """
    if isinstance(options, dict):
        return {k: (REDACTED if looks_secret(str(k)) and v is not None and not isinstance(v, bool)
                    else redact_options(v)) for k, v in options.items()}
    if isinstance(options, list):
        return [redact_options(v) for v in options]
    return options


def _scrub_urls(value: Any) -> Any:
    """``value`` with the user and password of every URL in it replaced, and the values of
    secret-named query parameters of a string that is a URL."""
    if isinstance(value, dict):
        return {k: _scrub_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_urls(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return _scrub_query(_URL_USERINFO.sub(f"{REDACTED}@", value))
    return value


def _scrub_query(text: str) -> str:
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(looks_secret(k) for k, _ in pairs):
        return text
    return urlunsplit(parts._replace(query=urlencode(
        [(k, REDACTED if looks_secret(k) else v) for k, v in pairs], safe="[]")))


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
        lines = [f"  {loc}: {msg}" for loc, msg in map(_describe, exc.errors())]
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines)) from None
    _check_cross_rules(cfg)
    return cfg


def _describe(err: ErrorDetails) -> tuple[str, str]:
    """``(dotted key, message)`` of one validation error, in the config's own terms.

    The ``provider`` union puts the kind in the location (``provider.ark.dimensions``): it is
    dropped, since users write ``provider.dimensions``. A key of another kind and an unknown
    kind are said so, rather than as pydantic's "extra inputs" and "input tag" messages.
    """
    loc = [str(part) for part in err["loc"]]
    if loc[:1] == ["provider"]:
        if err["type"] == "union_tag_invalid":
            return "provider.kind", unknown_kind_message(err.get("ctx", {}).get("tag"))
        if len(loc) > 1 and loc[1] in provider_kinds():
            kind = loc.pop(1)
            if err["type"] == "extra_forbidden" and len(loc) == 2:
                misplaced = misplaced_key_message(loc[1], kind)
                if misplaced is not None:
                    return ".".join(loc), misplaced
    return ".".join(loc) or "(top level)", err["msg"]


def _check_cross_rules(cfg: Config) -> None:
    cfg.provider.check_mode()
    cfg.provider.check()
    _check_multimodal(cfg)
    _check_tokenizer_file(cfg)
    provider_cls = get_provider_class(cfg.provider.kind)
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


def _check_multimodal(cfg: Config) -> None:
    """``input.image_field`` and ``provider.multimodal`` go together: either alone is an error."""
    multimodal = getattr(cfg.provider, "multimodal", False)
    if cfg.input.image_field is not None and not multimodal:
        raise ConfigError(
            f"{cfg.input.image_field!r} names an image field, but provider.kind "
            f"{cfg.provider.kind!r} is not sent images: set provider.multimodal: true (kinds ark "
            "and envelope), or remove input.image_field",
            key="input.image_field",
        )
    if multimodal and cfg.input.image_field is None:
        raise ConfigError(
            "a multimodal run needs to know where each record's image is: set "
            "input.image_field to the field holding it (records without one are sent as text), "
            "or remove provider.multimodal",
            key="provider.multimodal",
        )


def _check_tokenizer_file(cfg: Config) -> None:
    """Load a ``tokenizer.json`` now (exit 2 if it cannot be), and leave room beside its
    special tokens: a chunk's count includes them, its overlap does not."""
    if not is_tokenizer_file(cfg.split.tokenizer):
        return
    special = get_tokenizer(cfg.split.tokenizer).special_tokens
    room = cfg.split.max_tokens - special
    if room < 1:
        raise ConfigError(
            f"{cfg.split.max_tokens} leaves no room for text beside the model's {special} "
            "special tokens, which count against it; raise split.max_tokens",
            key="split.max_tokens",
        )
    if cfg.split.overlap_tokens >= room:
        raise ConfigError(
            f"{cfg.split.overlap_tokens} must be smaller than the {room} text tokens a chunk "
            f"holds (split.max_tokens={cfg.split.max_tokens} less the model's {special} special "
            "tokens); lower it",
            key="split.overlap_tokens",
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
