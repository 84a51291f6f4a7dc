"""One live run per output (issue 11 item 5): the lease, on a local disk and on S3.

The end-to-end tests run real runs: two ``embedpipe run`` processes against one output and a
loopback server that holds the first run's requests, and in-process runs whose lease is taken
from them mid-run. The others exercise :class:`pipeline.output_dir.OutputLease` on the stores
it must work on: a local disk (``O_EXCL``), S3 (moto on loopback: a conditional write), and a
store with no exclusive create at all (written, then read back).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest

from pipeline import output_dir
from pipeline.local_server import EmbeddingServer
from pipeline.output_dir import LEASE_NAME, LEASE_TTL_S, OutputLease
from pipeline.run import PREFLIGHT_TEXT, RunRequest, execute
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.harness import MODEL, make_config
from transforms.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120.0


def _config(tmp_path: Path, server: EmbeddingServer, **sections: dict):
    root = str(tmp_path / "corpus")
    if not Path(root).exists():
        write_corpus(root)
    return make_config(corpus_patterns(root), str(tmp_path / "out"), server.base_url, **sections)


def _table_files(output: Path) -> set[str]:
    return {str(p) for kind in ("vectors", "usage", "rejects")
            for p in (output / kind).glob("*") if p.is_file()}


class HoldingServer(EmbeddingServer):
    """Answers the preflight; holds every other request until :meth:`release`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(dim=16, model=MODEL, **kwargs)
        self.held = threading.Event()
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def handle_embeddings(self, payload, headers):
        if payload.get("input") != [PREFLIGHT_TEXT]:
            self.held.set()
            self._released.wait(TIMEOUT_S)
        return super().handle_embeddings(payload, headers)


def test_a_second_run_is_refused_while_the_first_runs(tmp_path: Path, serve) -> None:
    """Two ``embedpipe run`` processes, one output (with ``--overwrite``, which does not let a
    run past a live one): the second exits 2 naming the first and sends nothing; the first
    commits, and the folder holds its files alone."""
    server = serve(HoldingServer)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config(tmp_path, server, output={"overwrite": True})
                                 .model_dump(by_alias=True, mode="json")))
    command = [sys.executable, "-m", "pipeline", "run", "--config", str(config), "--quiet"]
    output = tmp_path / "out"
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert server.held.wait(TIMEOUT_S), (tmp_path / "first.log").read_text()
            holder = json.loads((output / LEASE_NAME).read_text())
            assert holder["pid"] == first.pid
            served = len(server.stats.texts)

            second = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                    timeout=TIMEOUT_S, check=False)
            assert second.returncode == 2, second.stderr
            assert f"being written by run {holder['run_id']}" in second.stderr
            assert f"pid {first.pid}" in second.stderr
            assert server.stats.texts[served:].count(PREFLIGHT_TEXT) == 0  # it sent nothing
            assert json.loads((output / LEASE_NAME).read_text()) == holder
        finally:
            server.release()
            code = first.wait(TIMEOUT_S)
    assert code == 0, (tmp_path / "first.log").read_text()
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["run_id"] == holder["run_id"]
    assert _table_files(output) == {f["path"] for f in manifest["files"]}
    assert not (output / LEASE_NAME).exists()


def test_a_run_that_lost_its_lease_does_not_commit(
        tmp_path: Path, serve, caplog: pytest.LogCaptureFixture) -> None:
    """A run that stalled past its lease's expiry while another took the output over must not
    commit over the other's work: the commit step checks the lease last (exit 4)."""
    output = tmp_path / "out"
    taker = {"run_id": "20261204T000000Z-7a4e0ver", "host": "another-host", "pid": 4242,
             "heartbeat": time.time() + 3600}

    class TakenOver(EmbeddingServer):
        def handle_embeddings(self, payload, headers):
            if payload.get("input") != [PREFLIGHT_TEXT]:
                (output / LEASE_NAME).write_text(json.dumps(taker))
            return super().handle_embeddings(payload, headers)

    server = serve(TakenOver, dim=16, model=MODEL)
    assert execute(RunRequest(_config(tmp_path, server), quiet=True)) == 4
    assert not (output / "manifest.json").exists()
    assert json.loads((output / LEASE_NAME).read_text()) == taker  # left to its holder
    assert "no longer holds the lease" in caplog.text
    assert taker["run_id"] in caplog.text


def test_a_shard_of_a_retried_bundle_is_not_left_beside_the_run(
        tmp_path: Path, embedding_server: EmbeddingServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner that retries a bundle (Dataflow, Flink) may leave the failed attempt's shard
    under its final name; its rows are in the retry's shard too. The commit removes it, so
    ``part-RUN_ID-*`` selects exactly the files the manifest lists."""
    from transforms import write

    real = write._OpenShard.commit
    copies: list[str] = []

    def commit_and_leave_a_copy(self, kind):
        written = real(self, kind)
        if kind == "vectors" and not copies:
            # The same run's name with another random part, as the retry's shard has.
            copies.append(written.path.rsplit("-", 1)[0] + "-0123456789ab.parquet")
            shutil.copy(written.path, copies[0])
        return written

    monkeypatch.setattr(write._OpenShard, "commit", commit_and_leave_a_copy)
    output = tmp_path / "out"
    assert execute(RunRequest(_config(tmp_path, embedding_server), quiet=True)) == 0
    manifest = json.loads((output / "manifest.json").read_text())
    assert copies and Path(copies[0]).name.startswith(f"part-{manifest['run_id']}-")
    assert not Path(copies[0]).exists()
    listed = {f["path"] for f in manifest["files"] if f["kind"] == "vectors"}
    assert {str(p) for p in (output / "vectors").glob(f"part-{manifest['run_id']}-*")} == listed


# -- the lease itself --------------------------------------------------------------------------


def test_a_renewal_never_overwrites_another_runs_lease(tmp_path: Path) -> None:
    mine = OutputLease(str(tmp_path / "out"), {}, "20261204T000000Z-0000a111")
    mine.acquire()
    try:
        assert mine.renew() and mine.lost is None
        theirs = {"run_id": "20261204T000000Z-0000b222", "host": "another-host", "pid": 1,
                  "heartbeat": time.time()}
        (tmp_path / "out" / LEASE_NAME).write_text(json.dumps(theirs))
        assert not mine.renew()
        assert "20261204T000000Z-0000b222" in (mine.lost or "")
        assert json.loads((tmp_path / "out" / LEASE_NAME).read_text()) == theirs
    finally:
        mine.release()
    assert json.loads((tmp_path / "out" / LEASE_NAME).read_text()) == theirs  # not ours to drop
    assert [p.name for p in (tmp_path / "out").iterdir()] == [LEASE_NAME]  # no temporary left


def test_an_unreadable_lease_counts_as_live_until_it_is_old(tmp_path: Path) -> None:
    """A lease read while being rewritten, or a stray file in its place, is never taken for a
    dead run's: it is judged by its age, like a heartbeat."""
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_NAME).write_text('{"run_id": "20261204T0')
    lease = OutputLease(str(out), {}, "20261204T000000Z-0000c333")
    with pytest.raises(ConfigError, match="not a lease embedpipe can read"):
        lease.acquire()
    old = time.time() - LEASE_TTL_S - 5
    os.utime(out / LEASE_NAME, (old, old))
    with lease:
        assert json.loads((out / LEASE_NAME).read_text())["run_id"] == lease.run_id
    assert not (out / LEASE_NAME).exists()


def _exclusive_and_taken_over(url: str, opts: dict[str, Any]) -> None:
    """Run A holds the lease: B is refused naming A; once A is gone, B takes it; a lease whose
    heartbeat expired is taken over."""
    a = OutputLease(url, opts, "20261204T000000Z-0000aaaa")
    b = OutputLease(url, opts, "20261204T000000Z-0000bbbb")
    a.acquire()
    with pytest.raises(ConfigError, match="being written by run 20261204T000000Z-0000aaaa"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()
    fs, root = fsspec.core.url_to_fs(url, **opts)
    fs.pipe_file(f"{root}/{LEASE_NAME}", json.dumps({
        "run_id": "20261204T000000Z-0000dead", "host": "another-host", "pid": 1,
        "heartbeat": time.time() - LEASE_TTL_S - 5}).encode())
    with OutputLease(url, opts, "20261204T000000Z-0000cccc"):
        assert json.loads(fs.cat_file(f"{root}/{LEASE_NAME}"))["run_id"] == (
            "20261204T000000Z-0000cccc")
    assert not fs.exists(f"{root}/{LEASE_NAME}")


def test_the_lease_is_exclusive_on_s3(s3_options: dict[str, Any],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output_dir, "SETTLE_S", 0.05)
    _exclusive_and_taken_over("s3://corpus/leased", s3_options)


def test_the_lease_on_a_store_without_exclusive_create(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``open(..., "xb")`` is refused, the lease is written and read back."""
    monkeypatch.setattr(output_dir, "SETTLE_S", 0.05)
    fs = fsspec.filesystem("memory")
    real_open = fs.open

    def no_exclusive(path, mode="rb", *args, **kwargs):
        if "x" in mode:
            raise ValueError(f"mode {mode!r} is not supported here")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(fs, "open", no_exclusive)
    _exclusive_and_taken_over(f"memory://{tmp_path.name}/out", {})


def test_an_s3_output_is_leased_and_reconciled_end_to_end(
        s3_options: dict[str, Any], embedding_server: EmbeddingServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs into one S3 output (the second with ``--overwrite``): each lists exactly the
    files in the folder, and the first run's are retired once the second commits."""
    monkeypatch.setattr(output_dir, "SETTLE_S", 0.05)
    write_corpus("s3://corpus/in", s3_options)
    output = "s3://corpus/out/leased"
    cfg = make_config(corpus_patterns("s3://corpus/in"), output, embedding_server.base_url,
                      s3_options, output={"overwrite": True})
    fs, root = fsspec.core.url_to_fs(output, **s3_options)
    run_ids = []
    for _ in range(2):
        assert execute(RunRequest(cfg, quiet=True)) == 0
        fs.invalidate_cache()
        manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
        run_ids.append(manifest["run_id"])
        on_store = {p for kind in ("vectors", "usage", "rejects")
                    for p in fs.find(f"{root}/{kind}")}
        assert on_store == {fs._strip_protocol(f["path"]) for f in manifest["files"]}
        assert not fs.exists(f"{root}/{LEASE_NAME}")
    assert run_ids[0] != run_ids[1]
