"""No secret in any file a run writes, nor in its log: storage options, headers, URLs, the key.

Secrets are planted in every place a user puts one (nested storage options of the input and of
an S3 output, gateway headers, the API key), a real run writes its output and cache to S3
(moto on loopback), and every object and file it wrote, and the log, is scanned for them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest

from pipeline.config import Config, parse_config, redact_options
from pipeline.local_server import EmbeddingServer, serve_local_main
from pipeline.run import RunRequest, execute
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.harness import make_config
from transforms.errors import ConfigError

SECRETS = {
    "input_nested": "in-nested-SECRET-0f3a9c1e2b7d",
    "input_token": "in-token-SECRET-5e8b1d2c3a4f",
    "output_secret_key": "out-aws-SECRET-7c6d5e4f3a2b",
    "output_password": "out-password-SECRET-1a2b3c4d",
    "header": "gateway-SECRET-9d8c7b6a5f4e",
}


def test_no_planted_secret_reaches_a_file_or_the_log(
        tmp_path: Path, s3_options: dict[str, Any], embedding_server: EmbeddingServer,
        caplog: pytest.LogCaptureFixture) -> None:
    root = str(tmp_path / "corpus")
    write_corpus(root)
    endpoint = s3_options["client_kwargs"]["endpoint_url"]
    output_options = {
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1",
                          "aws_access_key_id": "testing",
                          "aws_secret_access_key": SECRETS["output_secret_key"]},
        "config_kwargs": {"proxies": {"password": SECRETS["output_password"]}},
    }
    input_options = {"client_kwargs": {"session_token": SECRETS["input_nested"]},
                     "token": SECRETS["input_token"]}
    cfg = make_config(corpus_patterns(root), "s3://corpus/out", embedding_server.base_url,
                      storage_options=input_options,
                      output={"storage_options": output_options},
                      provider={"extra_headers": {"X-Gateway-Key": SECRETS["header"]}})
    caplog.set_level(logging.DEBUG)
    assert execute(RunRequest(cfg)) == 0

    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="corpus")["Contents"]]
    assert any(k.endswith("manifest.json") for k in keys)
    assert any(".embedpipe-cache/" in k for k in keys)  # the cache is beside the output, on S3
    blobs = {k: s3.get_object(Bucket="corpus", Key=k)["Body"].read() for k in keys}
    blobs.update({str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()})
    blobs["log"] = caplog.text.encode()
    for where, data in blobs.items():
        for name, secret in SECRETS.items():
            assert secret.encode() not in data, f"{name} found in {where}"
    manifest = blobs[next(k for k in keys if k.endswith("out/manifest.json"))].decode()
    assert '"X-Gateway-Key": "[REDACTED]"' in manifest  # the header's name is kept


def test_no_planted_secret_reaches_a_local_output_its_cache_or_the_command_log(
        tmp_path: Path, embedding_server: EmbeddingServer) -> None:
    """The same with a local output and cache, run by the real command line: every file under
    the run's folder (output, cache beside it, corpus) and its stdout and stderr are scanned.
    The local filesystem takes any storage option, so nested ones reach fsspec as given."""
    secrets = {name: f"local-{value}" for name, value in SECRETS.items()}
    work = tmp_path / "work"
    root = str(work / "corpus")
    write_corpus(root)
    input_options = {"client_kwargs": {"aws_session_token": secrets["input_nested"]},
                     "token": secrets["input_token"]}
    output_options = {"client_kwargs": {"aws_secret_access_key": secrets["output_secret_key"]},
                      "config_kwargs": {"proxies": {"password": secrets["output_password"]}}}
    cfg = make_config(corpus_patterns(root), str(work / "out"), embedding_server.base_url,
                      storage_options=input_options, output={"storage_options": output_options},
                      provider={"extra_headers": {"X-Gateway-Key": secrets["header"]}})
    config = tmp_path / "config.json"  # the user's own file holds the secrets: not scanned
    config.write_text(json.dumps(cfg.model_dump(by_alias=True, mode="json")))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(config)],
                          capture_output=True, timeout=300, check=False,
                          cwd=Path(__file__).parents[1], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    files = {str(p): p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert str(work / "out" / "manifest.json") in files
    assert any("/.embedpipe-cache/" in name for name in files)  # the cache was written and seen
    files.update({"stdout": proc.stdout, "stderr": proc.stderr})
    for where, data in files.items():
        for name, secret in secrets.items():
            assert secret.encode() not in data, f"{name} found in {where}"
    manifest = json.loads(files[str(work / "out" / "manifest.json")])["config"]
    assert manifest["provider"]["extra_headers"] == {"X-Gateway-Key": "[REDACTED]"}
    assert manifest["output"]["storage_options"]["client_kwargs"] == {
        "aws_secret_access_key": "[REDACTED]"}
    assert embedding_server.stats.requests > 0


def test_redaction_reaches_any_depth_and_keeps_names() -> None:
    options = {"anon": False, "client_kwargs": {"endpoint_url": "http://h", "region_name": "r",
                                                "aws_secret_access_key": "s"},
               "credentials": {"user": "u", "pass": "p"}, "list": [{"api_key": "k"}]}
    assert redact_options(options) == {
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://h", "region_name": "r",
                          "aws_secret_access_key": "[REDACTED]"},
        "credentials": "[REDACTED]", "list": [{"api_key": "[REDACTED]"}]}


def test_credentials_in_urls_are_removed_from_the_public_config() -> None:
    cfg = Config.model_validate({
        "input": {"path": "https://alice:pa55word@files.example/corpus.jsonl"},
        "provider": {"kind": "openai", "api_key_env": None,
                     "base_url": "https://bob:hunter2@gateway.example/v1"}})
    text = str(cfg.public_dict())
    assert "pa55word" not in text and "hunter2" not in text and "alice" not in text
    assert "files.example/corpus.jsonl" in text and "gateway.example/v1" in text


@pytest.mark.parametrize("value", [
    "sk-proj-abcdef0123456789ABCDEF",        # OpenAI
    "0123456789abcdef0123456789abcdef",      # Azure: 32 hex digits, a valid name by its letters
    "Bearer sk-abc",
])
def test_a_key_in_place_of_its_variable_name_is_refused_without_showing_it(value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({"input": {"path": "x.jsonl"},
                      "provider": {"kind": "openai", "api_key_env": value}})
    message = str(refused.value)
    assert value not in message and value[:12] not in message
    assert "provider" in message and "api_key_env" in message and "NAME" in message


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "AZURE_OPENAI_KEY_2024", "my_key", "ARK_KEY"])
def test_variable_names_are_accepted(name: str) -> None:
    cfg = parse_config({"input": {"path": "x.jsonl"},
                        "provider": {"kind": "openai", "api_key_env": name}})
    assert cfg.provider.api_key_env == name


def test_serve_local_refuses_a_key_in_place_of_its_variable_name_without_showing_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    key = "sk-proj-abcdef0123456789ABCDEF"
    assert serve_local_main(["--port", "0", "--api-key-env", key]) == 2
    err = capsys.readouterr().err
    assert key not in err and key[:12] not in err
    assert "--api-key-env" in err and "not the key" in err


def test_the_cache_namespace_never_holds_the_credentials_of_base_url() -> None:
    from pipeline.graph import namespace_key

    with_user = parse_config({"input": {"path": "x.jsonl"}, "provider": {
        "kind": "openai", "api_key_env": None, "base_url": "https://bob:hunter2@gw.example/v1"}})
    plain = parse_config({"input": {"path": "x.jsonl"}, "provider": {
        "kind": "openai", "api_key_env": None, "base_url": "https://gw.example/v1"}})
    assert "hunter2" not in str(namespace_key(with_user))
    assert namespace_key(with_user) == namespace_key(plain)  # the same vectors, one namespace
