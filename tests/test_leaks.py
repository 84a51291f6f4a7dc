"""No secret of the config reaches a file, a log line or an error: planted secrets, looked for.

A real run (the CLI in a subprocess, FnApiRunner) reads from and writes to a moto S3 server on
loopback with credentials given only as nested ``client_kwargs`` (the environment has none, so
they are really used), caches there too, and sends gateway headers to a loopback embedding
server that records them. Then every object in the bucket, every file under the run's TMPDIR and
the captured log are searched, byte for byte, for every planted value and for pieces of it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest

from pipeline.local_server import EmbeddingServer, Reply
from pipeline.run import RunRequest, execute
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.fixtures import Serve
from tests.support.harness import MODEL, make_config
from transforms.errors import ConfigError

REPO = Path(__file__).parents[1]


def planted(name: str) -> str:
    """A fresh value per test session: any trace of it anywhere is a leak."""
    return f"planted-{name}-{secrets.token_hex(12)}"


class HeaderRecordingServer(EmbeddingServer):
    """Records the values of the gateway headers it receives (to prove they are still sent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: set[tuple[str, str]] = set()

    def route(self, method: str, path: str, payload: Any, headers: Mapping[str, str]) -> Reply:
        for name in ("x-gateway-key", "x-tenant"):
            if name in headers:
                self.seen.add((name, headers[name]))
        return super().route(method, path, payload, headers)


def scan(blob: bytes, values: Mapping[str, str]) -> list[str]:
    """The names of the planted values found in ``blob``, whole or as a 12-character piece of
    their random part (a partial echo, ``...3fa9c01d2b7e``, is a leak too)."""
    found = []
    for name, value in values.items():
        token = value.rsplit("-", 1)[1].encode()
        pieces = (token[i:i + 12] for i in range(len(token) - 11))
        if value.encode() in blob or any(p in blob for p in pieces):
            found.append(name)
    return found


def test_planted_storage_and_header_secrets_reach_no_file_and_no_log(
        tmp_path: Path, s3_options: dict[str, Any], serve: Serve) -> None:
    server = serve(HeaderRecordingServer, dim=64, model=MODEL)
    endpoint = s3_options["client_kwargs"]["endpoint_url"]
    values = {name: planted(name) for name in (
        "in-key-id", "in-secret", "in-token", "out-key-id", "out-secret", "out-password",
        "gateway-key", "tenant")}

    def nested(prefix: str) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1",
                                  "aws_access_key_id": values[f"{prefix}-key-id"],
                                  "aws_secret_access_key": values[f"{prefix}-secret"]}}

    in_opts = nested("in")
    in_opts["client_kwargs"]["aws_session_token"] = values["in-token"]
    out_opts = nested("out")
    out_opts["config_kwargs"] = {"proxies": {"https": f"http://u:{values['out-password']}@h:1"},
                                 "connect_timeout": 5}

    root = "s3://corpus/in"
    write_corpus(root, s3_options)
    cfg = make_config(corpus_patterns(root), "s3://corpus/out/run", server.base_url,
                      cache={"path": "s3://corpus/cache"},
                      provider={"extra_headers": {"X-Gateway-Key": values["gateway-key"],
                                                  "X-Tenant": values["tenant"]}})
    data = cfg.model_dump(by_alias=True, mode="json")
    data["input"]["storage_options"] = in_opts
    data["output"]["storage_options"] = out_opts
    config = tmp_path / "config.json"  # holds the secrets: the one file not scanned
    config.write_text(json.dumps(data))
    run_tmp = tmp_path / "tmp"
    run_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["TMPDIR"] = str(run_tmp)

    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(config)],
        env=env, capture_output=True, timeout=300, check=False, cwd=REPO,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log.decode(errors="replace")[-4000:]

    # The options still work: the headers were sent, as given.
    assert ("x-gateway-key", values["gateway-key"]) in server.seen
    assert ("x-tenant", values["tenant"]) in server.seen

    s3 = boto3.client("s3", endpoint_url=endpoint)
    written: dict[str, bytes] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="corpus"):
        for obj in page.get("Contents", []):
            if not obj["Key"].startswith("in/"):
                written[f"s3://corpus/{obj['Key']}"] = s3.get_object(
                    Bucket="corpus", Key=obj["Key"])["Body"].read()
    assert any("/cache/" in k for k in written) and "s3://corpus/out/run/manifest.json" in written
    for path in run_tmp.rglob("*"):
        if path.is_file():
            written[str(path)] = path.read_bytes()

    leaks = {where: found for where, blob in {**written, "log": log}.items()
             if (found := scan(blob, values))}
    assert not leaks, leaks
    manifest = json.loads(written["s3://corpus/out/run/manifest.json"])
    assert manifest["status"] == "complete"
    kept = manifest["config"]
    assert kept["output"]["storage_options"]["client_kwargs"]["endpoint_url"] == endpoint
    assert kept["provider"]["extra_headers"] == {"X-Gateway-Key": "[REDACTED]",
                                                 "X-Tenant": "[REDACTED]"}


# -- provider.api_key_env set to the key itself -------------------------------------------------

KEYS_GIVEN_AS_NAMES = [
    f"sk-proj-{secrets.token_urlsafe(32)}",        # OpenAI
    secrets.token_hex(20),                          # a bare hex key
    f"ark_{secrets.token_hex(16)}",                 # underscores only: still a valid name
    "AbCdEfGh12345678IjKlMnOp90",                   # base62, mixed case and digits
]


@pytest.mark.parametrize("key", KEYS_GIVEN_AS_NAMES, ids=["sk", "hex", "ident", "base62"])
def test_a_key_given_as_api_key_env_is_refused_without_echoing_it(
        tmp_path: Path, embedding_server: EmbeddingServer, key: str) -> None:
    root = str(tmp_path / "corpus")
    write_corpus(root)
    with pytest.raises(ConfigError) as err:
        cfg = make_config(corpus_patterns(root), str(tmp_path / "out"),
                          embedding_server.base_url, provider={"api_key_env": key})
        execute(RunRequest(cfg, quiet=True))
    message = str(err.value)
    assert "provider.api_key_env" in message and "not the key itself" in message
    assert key not in message and key[4:16] not in message
    assert embedding_server.stats.requests == 0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "AZURE_OPENAI_API_KEY_20240501", "my_key",
                                  "EMBEDPIPE_TEST_KEY", "ARK_API_KEY", "GatewayToken"])
def test_ordinary_variable_names_are_accepted(name: str) -> None:
    cfg = make_config(["x/*.jsonl"], "out", "http://127.0.0.1:9/v1",
                      provider={"api_key_env": name})
    assert cfg.provider.api_key_env == name


def test_serve_local_refuses_a_key_given_as_its_variable(capsys: pytest.CaptureFixture) -> None:
    from pipeline.local_cli import serve_local_main

    key = KEYS_GIVEN_AS_NAMES[0]
    assert serve_local_main(["--port", "0", "--api-key-env", key]) == 2
    err = capsys.readouterr().err
    assert "looks like a key" in err and key not in err and key[8:20] not in err
