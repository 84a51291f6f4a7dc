"""Config validation: unknown keys, cross-field rules, overrides, secret-free dumps."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import apply_overrides, load_config, parse_config
from transforms.errors import ConfigError

BASE = {"input": {"path": "data/*.jsonl"}}


def test_defaults_follow_the_contract() -> None:
    cfg = parse_config(BASE)
    assert cfg.split.max_tokens == 512 and cfg.split.overlap_tokens == 64
    assert cfg.provider.kind == "openai" and cfg.provider.encoding_format == "base64"
    assert cfg.limits.requests_per_minute == 3000 and cfg.retry.max_attempts == 8
    assert cfg.output.rows_per_file == 100_000 and cfg.validate_.max_document_bytes == 10_000_000


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"limits\.tokens_per_minit"):
        parse_config({**BASE, "limits": {"tokens_per_minit": 5}})


def test_overlap_must_be_below_max_tokens() -> None:
    with pytest.raises(ConfigError, match="overlap_tokens"):
        parse_config({**BASE, "split": {"max_tokens": 64, "overlap_tokens": 64}})


def test_unknown_provider_kind_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"provider\.kind.*openai"):
        parse_config({**BASE, "provider": {"kind": "nope"}})


def test_chunk_must_fit_provider_limits() -> None:
    with pytest.raises(ConfigError, match=r"split\.max_tokens"):
        parse_config({**BASE, "provider": {"max_input_tokens": 256}})
    with pytest.raises(ConfigError, match=r"split\.max_tokens"):
        parse_config({**BASE, "provider": {"max_tokens_per_request": 100}})


def test_overrides_parse_yaml_scalars_and_create_sections() -> None:
    data = apply_overrides(BASE, ["limits.tokens_per_minute=500000", "output.include_text=true",
                                  "provider.dimensions=null", "input.path=s3://b/x/*.jsonl"])
    cfg = parse_config(data)
    assert cfg.limits.tokens_per_minute == 500000
    assert cfg.output.include_text is True
    assert cfg.input.path == "s3://b/x/*.jsonl"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(BASE, ["novalue"])


def test_public_dict_redacts_storage_secrets() -> None:
    cfg = parse_config({**BASE, "input": {"path": "s3://b/*", "storage_options": {
        "key": "AKIA123", "secret": "s3cr3t", "endpoint_url": "http://127.0.0.1:9"}}})
    dumped = str(cfg.public_dict())
    assert "AKIA123" not in dumped and "s3cr3t" not in dumped
    assert "http://127.0.0.1:9" in dumped


@pytest.mark.parametrize("workers", [0, -3, "0", "-3", "many", 2.5, True])
def test_workers_must_be_positive_or_auto(workers: object) -> None:
    with pytest.raises(ConfigError, match=r"limits\.workers") as refused:
        parse_config({**BASE, "limits": {"workers": workers}})
    assert "1 or more" in str(refused.value)
    assert parse_config({**BASE, "limits": {"workers": 3}}).limits.workers == 3
    assert parse_config({**BASE, "limits": {"workers": "auto"}}).limits.workers == "auto"


def test_workers_of_minus_three_is_exit_2_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    config = tmp_path / "config.yaml"
    config.write_text("input:\n  path: data/*.jsonl\n")
    assert main(["run", "--config", str(config), "--set", "limits.workers=-3",
                 "--output", str(tmp_path / "out")]) == 2
    assert "limits.workers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_public_dict_redacts_credentials_at_every_depth_and_every_header() -> None:
    options = {
        "anon": False, "token": None,
        "client_kwargs": {"aws_secret_access_key": "n3sted", "aws_session_token": "t0ken",
                          "endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        "config_kwargs": {"proxies": {"https": "http://user:pr0xypass@proxy:3128"}},
        "credentials": {"client_email": "a@b", "private_key": "-----BEGIN"},
        "account_url": "https://acct.blob.core.windows.net/c?sv=2022&sig=s1gnature&se=2030",
        "mounts": [{"password": "l1stpass", "host": "h"}],
    }
    cfg = parse_config({**BASE, "input": {"path": "s3://b/*", "storage_options": options},
                        "output": {"storage_options": options},
                        "provider": {"extra_headers": {"X-Gateway": "g4teway", "X-Org": "org1"}}})
    public = cfg.public_dict()
    dumped = str(public)
    for secret in ("n3sted", "t0ken", "pr0xypass", "BEGIN", "s1gnature", "l1stpass", "g4teway",
                   "org1"):
        assert secret not in dumped
    kept = public["output"]["storage_options"]
    assert kept["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9"
    assert kept["client_kwargs"]["region_name"] == "us-east-1"
    assert kept["anon"] is False and kept["token"] is None
    assert kept["account_url"].startswith("https://acct.blob.core.windows.net/c?sv=2022&sig=")
    assert public["provider"]["extra_headers"] == {"X-Gateway": "[REDACTED]",
                                                   "X-Org": "[REDACTED]"}
    # The run still uses the real values.
    assert cfg.output.storage_options["client_kwargs"]["aws_secret_access_key"] == "n3sted"
    assert cfg.provider.extra_headers["X-Gateway"] == "g4teway"


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.provider.api_key_env is None or cfg.provider.api_key_env.isupper()
