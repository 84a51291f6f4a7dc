"""Shared fixtures: real servers on loopback (S3 through moto here; the embedding APIs in
:mod:`tests.support.fixtures`, registered below as a plugin)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

pytest_plugins = ["tests.support.fixtures"]


@pytest.fixture
def s3_options(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Storage options for a moto S3 server on loopback, with a bucket named ``corpus``."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="corpus")
        yield {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
    finally:
        server.stop()
