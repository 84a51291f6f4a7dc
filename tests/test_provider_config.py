"""One config model per provider kind: which keys apply where, and the errors when one does not.

The table :data:`KEYS` is the contract ``docs/providers-config.md`` documents; a key that moves
between kinds, appears or disappears must change both.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config, parse_config
from pipeline.graph import namespace_key
from transforms.errors import ConfigError
from transforms.providers import (
    REGISTRY,
    ArkConfig,
    EnvelopeConfig,
    OpenAIConfig,
    ProviderConfig,
    get_provider_class,
)

REPO = Path(__file__).resolve().parents[1]
BASE: dict[str, Any] = {"input": {"path": "corpus/*.jsonl"}}

SHARED = {
    "kind", "base_url", "model", "api_key_env", "dimensions", "encoding_format", "timeout_s",
    "max_inputs_per_request", "max_tokens_per_request", "max_bytes_per_request",
    "max_input_tokens", "auth_header", "auth_scheme", "extra_headers",
    "price_per_million_tokens", "preflight", "normalize", "mode",
}
#: Batch mode's keys (docs/batch.md): OpenAI's Batch API is kind openai's alone.
BATCH = {"batch_poll_interval_s", "batch_completion_window", "batch_discount",
         "batch_max_inputs", "batch_max_open"}
#: Every ``provider`` key, by the kinds it applies to.
KEYS = {
    "openai": SHARED | {"api_version", "send_dimensions"} | BATCH,
    "ark": SHARED | {"multimodal", "sparse"},
    "envelope": SHARED | {"send_dimensions", "parameters", "poll_path", "poll_timeout_s",
                          "multimodal"},
}
#: A value each kind-specific key accepts.
SAMPLE = {"api_version": "2024-10-21", "send_dimensions": False,
          "batch_poll_interval_s": 5, "batch_completion_window": "24h", "batch_discount": 0.4,
          "batch_max_inputs": 1000, "batch_max_open": 2,
          "parameters": {"instruction": "query"}, "poll_path": "/v2/jobs/{id}",
          "poll_timeout_s": 30,
          # Issue 14's keys; false, as true needs input.image_field (tests/test_multimodal_config).
          "multimodal": False, "sparse": False}


def provider(**fields: Any) -> dict[str, Any]:
    return {**BASE, "provider": fields}


def test_each_kind_has_exactly_its_keys() -> None:
    assert {kind: set(entry.config.model_fields) for kind, entry in REGISTRY.items()} == KEYS
    # Every key the single model of old had is still valid for some kind.
    assert set().union(*KEYS.values()) == SHARED | set(SAMPLE)
    # normalize was Ark's alone; it is now a shared key, honoured by every kind.
    assert all("normalize" in keys for keys in KEYS.values())


def test_the_registry_pairs_each_kind_with_its_union_arm() -> None:
    arms = get_args(get_args(ProviderConfig)[0])
    assert {get_args(arm)[0] for arm in arms} == {entry.config for entry in REGISTRY.values()}
    for kind, entry in REGISTRY.items():
        assert entry.config().kind == kind == entry.provider.kind
        assert get_provider_class(kind) is entry.provider


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_each_kind_accepts_its_own_keys(kind: str) -> None:
    own = {key: value for key, value in SAMPLE.items() if key in KEYS[kind]}
    cfg = parse_config(provider(kind=kind, **own)).provider
    assert isinstance(cfg, REGISTRY[kind].config)
    assert {key: getattr(cfg, key) for key in own} == own


def test_kind_defaults_to_openai() -> None:
    assert isinstance(parse_config(BASE).provider, OpenAIConfig)
    assert isinstance(parse_config(provider(model="m")).provider, OpenAIConfig)


@pytest.mark.parametrize(
    ("kind", "key", "owners"),
    [
        ("openai", "parameters", "kind envelope"),
        ("openai", "poll_path", "kind envelope"),
        ("ark", "api_version", "kind openai"),
        ("ark", "send_dimensions", "kinds envelope and openai"),
        ("ark", "poll_timeout_s", "kind envelope"),
        ("envelope", "api_version", "kind openai"),
    ],
)
def test_a_key_of_another_kind_is_refused_naming_key_and_kind(kind: str, key: str,
                                                               owners: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(provider(kind=kind, **{key: SAMPLE[key]}))
    message = str(info.value)
    assert f"provider.{key}: does not apply to provider.kind '{kind}'" in message
    assert f"(it is a key of {owners})" in message


def test_every_foreign_key_of_every_kind_is_refused() -> None:
    for kind, keys in KEYS.items():
        for key in sorted(set(SAMPLE) - keys):
            with pytest.raises(ConfigError, match=rf"provider\.{key}: does not apply to "
                                                  rf"provider\.kind '{kind}'"):
                parse_config(provider(kind=kind, **{key: SAMPLE[key]}))


def test_a_key_no_kind_knows_is_unknown() -> None:
    with pytest.raises(ConfigError, match=r"provider\.modle: Extra inputs are not permitted"):
        parse_config(provider(kind="ark", modle="x"))


def test_errors_name_the_key_without_the_kind_tag() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(provider(kind="envelope", poll_timeout_s=0, timeout_s=-1))
    message = str(info.value)
    assert "  provider.poll_timeout_s: Input should be greater than 0" in message
    assert "  provider.timeout_s: Input should be greater than 0" in message
    assert "provider.envelope" not in message


@pytest.mark.parametrize("kind", ["nope", "OpenAI", 5, None])
def test_an_unknown_kind_lists_the_known_ones(kind: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(provider(kind=kind))
    assert "provider.kind: unknown provider kind" in str(info.value)
    assert "choose one of ark, envelope, openai" in str(info.value)
    with pytest.raises(ConfigError, match="choose one of ark, envelope, openai"):
        get_provider_class(str(kind))


def test_switching_kind_with_set_refuses_the_old_kinds_keys() -> None:
    with pytest.raises(ConfigError, match=r"provider\.api_version: does not apply to "
                                          r"provider\.kind 'ark'"):
        load_config(REPO / "configs" / "azure.yaml", ["provider.kind=ark"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_each_shipped_config_parses_as_its_kind(path: Path) -> None:
    cfg = load_config(path)
    kind = yaml.safe_load(path.read_text(encoding="utf-8"))["provider"].get("kind", "openai")
    assert isinstance(cfg.provider, REGISTRY[kind].config)


def test_cache_namespaces_keep_their_keys() -> None:
    """Kinds without ``normalize`` or ``parameters`` key as before, so caches still hit."""
    common = {"endpoint": "api.openai.com/v1", "model": "text-embedding-3-small",
              "dimensions": None}
    assert namespace_key(parse_config(BASE)) == {
        "kind": "openai", **common, "normalize": False, "parameters": {}}
    ark = namespace_key(parse_config(provider(kind="ark", normalize=True)))
    assert (ark["normalize"], ark["parameters"]) == (True, {})
    envelope = namespace_key(parse_config(provider(kind="envelope", parameters={"a": 1})))
    assert (envelope["normalize"], envelope["parameters"]) == (False, {"a": 1})


def test_kind_rules_still_name_their_key() -> None:
    with pytest.raises(ConfigError) as info:
        ArkConfig(model="doubao-embedding-text-240715", dimensions=300).check()
    assert info.value.key == "provider.dimensions"
    with pytest.raises(ConfigError) as info:
        EnvelopeConfig(poll_path="/jobs").check()
    assert info.value.key == "provider.poll_path"


# -- through the command line -----------------------------------------------------------------


def write_config(tmp_path: Path, **provider_fields: Any) -> Path:
    path = tmp_path / "embedpipe.yaml"
    path.write_text(yaml.safe_dump({
        "input": {"path": str(tmp_path / "corpus" / "*.jsonl")},
        "provider": {"api_key_env": None, **provider_fields},
        "output": {"path": str(tmp_path / "out")},
    }), encoding="utf-8")
    return path


def test_run_with_a_key_of_another_kind_exits_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, kind="openai", base_url="http://127.0.0.1:9/v1",
                          poll_path="/jobs/{id}")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert ("provider.poll_path: does not apply to provider.kind 'openai' "
            "(it is a key of kind envelope)") in done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.parametrize("command", ["run", "plan"])
def test_set_of_a_key_of_another_kind_exits_2(tmp_path: Path, command: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, kind="ark", base_url="http://127.0.0.1:9/api/v3")
    code = main([command, "--config", str(config), "--set", "provider.poll_path=/jobs/{id}"])
    assert code == 2
    assert ("provider.poll_path: does not apply to provider.kind 'ark' "
            "(it is a key of kind envelope)") in capsys.readouterr().err
