"""The output folder's life cycle: what a run deletes, the lease, and overwrite safety.

Every test runs the whole pipeline (``pipeline.run.execute``) against the loopback server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.local_server import EmbeddingServer, error_reply
from pipeline.output_dir import LEASE_NAME, LEASE_TTL_S
from pipeline.run import RunRequest, execute
from pipeline.verify import verify_output
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.harness import make_config
from transforms.errors import ConfigError


def _manifest(output: Path) -> dict:
    return json.loads((output / "manifest.json").read_text())


def _table_files(output: Path) -> set[str]:
    return {str(p) for kind in ("vectors", "usage", "rejects")
            for p in (output / kind).glob("*") if p.is_file()}


def _config(tmp_path: Path, server: EmbeddingServer, **sections: dict):
    root = str(tmp_path / "corpus")
    if not Path(root).exists():
        write_corpus(root)
    return make_config(corpus_patterns(root), str(tmp_path / "out"), server.base_url, **sections)


def test_a_file_embedpipe_did_not_write_is_never_deleted(
        tmp_path: Path, embedding_server: EmbeddingServer) -> None:
    output = tmp_path / "out"
    (output / "vectors").mkdir(parents=True)
    mine = output / "vectors" / "my-own-vectors.parquet"
    mine.write_bytes(b"the user's data")
    embedding_server.reset_stats()
    with pytest.raises(ConfigError, match=r"my-own-vectors\.parquet was not written by embedpipe"):
        execute(RunRequest(_config(tmp_path, embedding_server), quiet=True))
    assert mine.read_bytes() == b"the user's data"
    assert embedding_server.stats.requests == 0  # refused before anything was sent


def test_an_overwrite_that_fails_keeps_the_previous_run_readable(
        tmp_path: Path, embedding_server: EmbeddingServer) -> None:
    output = tmp_path / "out"
    assert execute(RunRequest(_config(tmp_path, embedding_server), quiet=True)) == 0
    first = _manifest(output)
    first_files = _table_files(output)
    assert all(first["run_id"] in Path(p).name for p in first_files)  # per-run names

    embedding_server.fail_always(error_reply(401, "invalid api key", code="invalid_api_key"))
    again = _config(tmp_path, embedding_server, output={"overwrite": True})
    assert execute(RunRequest(again, quiet=True)) == 3
    assert _manifest(output) == first  # still the complete run, untouched
    assert first_files <= _table_files(output)
    assert verify_output(str(output)) == []
    aborted = list(output.glob("aborted-*.json"))
    assert len(aborted) == 1 and json.loads(aborted[0].read_text())["status"] == "aborted"

    embedding_server.fail_always(None)
    assert execute(RunRequest(again, quiet=True)) == 0
    second = _manifest(output)
    assert second["status"] == "complete" and second["run_id"] != first["run_id"]
    # The replaced run's files are retired; what is left is exactly what the manifest lists.
    assert _table_files(output) == {f["path"] for f in second["files"]}
    assert not (first_files & _table_files(output))
    assert verify_output(str(output)) == []


def test_a_live_lease_refuses_a_second_run(tmp_path: Path,
                                           embedding_server: EmbeddingServer) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / LEASE_NAME).write_text(json.dumps({
        "run_id": "20261204T000000Z-livelive", "host": socket.gethostname(),
        "pid": os.getpid(), "heartbeat": time.time()}))
    embedding_server.reset_stats()
    with pytest.raises(ConfigError, match="being written by run 20261204T000000Z-livelive"):
        execute(RunRequest(_config(tmp_path, embedding_server), quiet=True))
    assert embedding_server.stats.requests == 0
    assert not (output / "manifest.json").exists()


@pytest.mark.parametrize("stale", ["dead_pid", "expired"])
def test_a_dead_runs_lease_and_leftovers_are_taken_over(
        tmp_path: Path, embedding_server: EmbeddingServer, stale: str) -> None:
    output = tmp_path / "out"
    (output / "_temporary" / "20261203T000000Z-deadbeef" / "vectors").mkdir(parents=True)
    (output / "_temporary" / "20261203T000000Z-deadbeef" / "vectors" / "part-x.parquet").write_bytes(b"x")
    (output / "vectors").mkdir()
    leftover = output / "vectors" / "part-20261203T000000Z-deadbeef-000000000000.parquet"
    leftover.write_bytes(b"half a file")
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lease = {"run_id": "20261203T000000Z-deadbeef", "host": socket.gethostname(),
             "pid": int(done.stdout), "heartbeat": time.time()}
    if stale == "expired":
        lease.update(host="another-host", pid=1, heartbeat=time.time() - LEASE_TTL_S - 5)
    (output / LEASE_NAME).write_text(json.dumps(lease))
    assert execute(RunRequest(_config(tmp_path, embedding_server), quiet=True)) == 0
    manifest = _manifest(output)
    assert manifest["status"] == "complete"
    assert not leftover.exists() and not (output / "_temporary").exists()
    assert not (output / LEASE_NAME).exists()  # released at the end
    assert _table_files(output) == {f["path"] for f in manifest["files"]}


def test_runs_in_sequence_never_mix_their_files(tmp_path: Path,
                                                embedding_server: EmbeddingServer) -> None:
    output = tmp_path / "out"
    cfg = _config(tmp_path, embedding_server, output={"overwrite": True, "rows_per_file": 7})
    run_ids = []
    for _ in range(3):
        assert execute(RunRequest(cfg, quiet=True)) == 0
        manifest = _manifest(output)
        run_ids.append(manifest["run_id"])
        files = _table_files(output)
        assert files == {f["path"] for f in manifest["files"]}
        assert all(Path(p).name.startswith(f"part-{manifest['run_id']}-") for p in files)
    assert len(set(run_ids)) == 3
