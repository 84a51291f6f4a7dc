"""The provider registry: ``provider.kind`` → the class that speaks that API's dialect.

Entries are import paths, resolved lazily, so a provider's module (and anything it imports) is
loaded only when a config asks for it. Adding a provider is one module plus one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from transforms.errors import ConfigError

if TYPE_CHECKING:
    from transforms.providers.base import Provider

_REGISTRY: dict[str, str] = {
    "ark": "transforms.providers.ark:ArkProvider",
    "envelope": "transforms.providers.envelope:EnvelopeProvider",
    "openai": "transforms.providers.openai:OpenAIProvider",
}


def provider_kinds() -> list[str]:
    return sorted(_REGISTRY)


def get_provider_class(kind: str) -> type[Provider]:
    """The provider class for ``kind``; an unknown kind is a config error listing the choices."""
    try:
        target = _REGISTRY[kind]
    except KeyError:
        raise ConfigError(
            f"unknown provider kind {kind!r}; choose one of {', '.join(provider_kinds())}",
            key="provider.kind",
        ) from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
