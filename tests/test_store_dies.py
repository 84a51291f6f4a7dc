"""Object storage dying mid-run stops the run within seconds (issue 11 item 8).

The output (and the cache beside it) is on a moto S3 server on loopback; a thread watches the
loopback embedding server's request counter and stops the S3 server mid-run. The run must stop
sending (only the requests already in flight, and a couple more, reach the API after the store
died), commit nothing, end within a bound, exit 4 and name the store that could not be written.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from pipeline.exit_codes import EXIT_CRASHED
from pipeline.local_server import EmbeddingServer
from pipeline.run import RunRequest, execute
from tests.support.fixtures import Serve
from tests.support.harness import make_config

MAX_CONCURRENCY = 4
STOP_AFTER = 12  # embedding requests answered before S3 is stopped
DOCUMENTS = 400


class SlowServer(EmbeddingServer):
    """Takes a little time per answer, so that a run lasts long enough to be cut mid-way."""

    def route(self, method, path, payload, headers):  # type: ignore[no-untyped-def]
        time.sleep(0.05)
        return super().route(method, path, payload, headers)


@pytest.fixture
def moto_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ThreadedMotoServer, dict]]:
    """A moto S3 server with a bucket of its own, and storage options to reach it.

    moto keeps its buckets in the process, across servers: each test has its own bucket.
    """
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = f"store-dies-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    state = {"stopped": False, "bucket": bucket}
    try:
        yield server, {"key": "testing", "secret": "testing",
                       "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
                       "_state": state}
    finally:
        if not state["stopped"]:
            server.stop()


def _corpus(root: Path) -> list[str]:
    root.mkdir()
    lines = [f'{{"id": "d{i}", "text": "document number {i} about topic {i % 37}"}}'
             for i in range(DOCUMENTS)]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return [str(root / "*.jsonl")]


@pytest.mark.parametrize("cache", ["beside", "off", "local"])
def test_the_store_dying_mid_run_stops_the_run_and_names_it(
        tmp_path: Path, serve: Serve, moto_s3: tuple[ThreadedMotoServer, dict], cache: str,
        caplog: pytest.LogCaptureFixture) -> None:
    moto, options = moto_s3
    state = options.pop("_state")
    output = f"s3://{state['bucket']}/out"
    server = serve(SlowServer, dim=32, model="local-hash-embedding")
    cache_section = {"beside": {}, "off": {"enabled": False},
                     "local": {"path": str(tmp_path / "cache")}}[cache]
    cfg = make_config(_corpus(tmp_path / "corpus"), output, server.base_url,
                      output={"storage_options": options},
                      provider={"max_inputs_per_request": 2},
                      limits={"max_concurrency": MAX_CONCURRENCY},
                      cache=cache_section)
    died: dict[str, Any] = {}

    def stop_s3_mid_run() -> None:
        deadline = time.monotonic() + 60
        while server.stats.requests < STOP_AFTER and time.monotonic() < deadline:
            time.sleep(0.005)
        moto.stop()
        state["stopped"] = True
        died.update(at=time.monotonic(), requests=server.stats.requests)

    watcher = threading.Thread(target=stop_s3_mid_run, daemon=True)
    watcher.start()
    caplog.set_level(logging.ERROR)
    code = execute(RunRequest(cfg, quiet=True))
    ended = time.monotonic()
    watcher.join(5)
    assert died, "the run ended before the store was stopped"
    sent_after = server.stats.requests - died["requests"]
    print(f"[{cache}] {sent_after} requests after the store died; "
          f"the run ended {ended - died['at']:.1f} s later, exit {code}")
    assert code == EXIT_CRASHED
    assert ended - died["at"] < 30, f"the run went on {ended - died['at']:.0f} s"
    assert sent_after <= MAX_CONCURRENCY + 2, f"{sent_after} requests sent after S3 died"
    named = [r.getMessage() for r in caplog.records if r.name == "embedpipe"
             and re.search(rf"the (cache|output) at s3://{state['bucket']}/\S* cannot be written",
                           r.getMessage())]
    assert named, caplog.text[-2000:]
    assert "Traceback" not in named[0]
