"""The provider registry: ``provider.kind`` → its config class and the provider of its dialect.

Adding a provider is one module (a :class:`~transforms.providers.config.BaseProviderConfig`
subclass with a literal ``kind``, and a :class:`~transforms.providers.base.Provider`) plus one
entry in :data:`REGISTRY` and one arm in :data:`ProviderConfig`.

:data:`ProviderConfig` is the ``provider`` section: a pydantic union discriminated by ``kind``
(``openai`` when absent), so each config is validated by its own kind's class, and a key that
belongs to another kind is refused; :func:`misplaced_key_message` says whose key it is. The
config classes must all be known to validate a config, so the provider modules are imported with
this package; they need nothing beyond embedpipe's core dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Discriminator, Tag

from transforms.errors import ConfigError
from transforms.providers.ark import ArkConfig, ArkProvider
from transforms.providers.base import Provider
from transforms.providers.config import BaseProviderConfig
from transforms.providers.envelope import EnvelopeConfig, EnvelopeProvider
from transforms.providers.openai import OpenAIConfig, OpenAIProvider

__all__ = [
    "REGISTRY", "ArkConfig", "BaseProviderConfig", "EnvelopeConfig", "OpenAIConfig",
    "ProviderConfig", "ProviderEntry", "get_provider_class", "misplaced_key_message",
    "provider_class_for", "provider_kinds", "unknown_kind_message",
]

#: The kind a ``provider`` section without ``kind`` is.
DEFAULT_KIND = "openai"


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    """One registered kind: the model its ``provider`` section validates against, and its API."""

    config: type[BaseProviderConfig]
    provider: type[Provider]


REGISTRY: dict[str, ProviderEntry] = {
    "ark": ProviderEntry(ArkConfig, ArkProvider),
    "envelope": ProviderEntry(EnvelopeConfig, EnvelopeProvider),
    "openai": ProviderEntry(OpenAIConfig, OpenAIProvider),
}


def _kind_of(value: Any) -> str:
    """The union's tag: ``kind`` of a mapping (``openai`` if absent) or of a config object.

    Anything else is tagged ``openai``, so that its error is OpenAI's model saying it wants a
    mapping; a ``kind`` that is not a string becomes an unknown kind.
    """
    if isinstance(value, dict):
        kind = value.get("kind", DEFAULT_KIND)
    else:
        kind = getattr(value, "kind", DEFAULT_KIND)
    return kind if isinstance(kind, str) else repr(kind)


#: The ``provider`` config section: one model per kind, chosen by ``kind``.
ProviderConfig = Annotated[
    Annotated[OpenAIConfig, Tag("openai")]
    | Annotated[ArkConfig, Tag("ark")]
    | Annotated[EnvelopeConfig, Tag("envelope")],
    Discriminator(_kind_of),
]


def provider_kinds() -> list[str]:
    return sorted(REGISTRY)


def unknown_kind_message(kind: object) -> str:
    return f"unknown provider kind {kind!r}; choose one of {', '.join(provider_kinds())}"


def provider_class_for(cfg: BaseProviderConfig) -> type[Provider]:
    """The provider that serves ``cfg``: its kind's, or its multimodal one with
    ``provider.multimodal: true`` (:mod:`transforms.providers.multimodal`)."""
    if getattr(cfg, "multimodal", False):
        from transforms.providers.multimodal import MULTIMODAL_PROVIDERS

        return MULTIMODAL_PROVIDERS[cfg.kind]
    return get_provider_class(cfg.kind)


def get_provider_class(kind: str) -> type[Provider]:
    """The provider class for ``kind``; an unknown kind is a config error listing the choices."""
    try:
        return REGISTRY[kind].provider
    except KeyError:
        raise ConfigError(unknown_kind_message(kind), key="provider.kind") from None


def kinds_with_key(key: str) -> list[str]:
    """The kinds whose ``provider`` section has ``key``, sorted."""
    return sorted(kind for kind, entry in REGISTRY.items() if key in entry.config.model_fields)


def misplaced_key_message(key: str, kind: str) -> str | None:
    """Why ``provider.<key>`` is refused for ``kind``, if it is another kind's key; else None.

    None means no kind knows the key (a misspelling): the caller reports it as unknown. The
    message follows the key, as in ``provider.poll_path: does not apply to provider.kind
    'openai' (it is a key of kind envelope); remove it, or set provider.kind: envelope``.
    """
    owners = [k for k in kinds_with_key(key) if k != kind]
    if not owners:
        return None
    if len(owners) == 1:
        return (f"does not apply to provider.kind {kind!r} (it is a key of kind {owners[0]}); "
                f"remove it, or set provider.kind: {owners[0]}")
    return (f"does not apply to provider.kind {kind!r} (it is a key of kinds "
            f"{' and '.join(owners)}); remove it, or set provider.kind to one of them")
