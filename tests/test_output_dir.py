"""The output folder's life cycle: what a run deletes, the lease, and overwrite safety.

Every test runs the whole pipeline (``pipeline.run.execute``) against the loopback server.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.local_server import EmbeddingServer, error_reply
from pipeline.output_dir import LEASE_NAME, LEASE_TTL_S
from pipeline.run import PREFLIGHT_TEXT, RunRequest, execute
from pipeline.verify import verify_output, verify_report
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.harness import MODEL, make_config
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


# -- item 3: only embedpipe's own files, by their per-run names --------------------------------


@pytest.mark.parametrize("name", [
    "part-00000-1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718-c000.snappy.parquet",  # Spark's
    "part-0.parquet",  # pandas / Dask
    "part-20261204T000000Z-0a1b2c3d.parquet",  # a run id, but not a name embedpipe gives
])
def test_another_tools_part_file_is_never_deleted(
        tmp_path: Path, embedding_server: EmbeddingServer, name: str) -> None:
    """``part-*.parquet`` is not a name only embedpipe gives: Spark, Dask and pandas write
    such files too. Only ``part-RUN_ID-*.parquet`` is embedpipe's."""
    output = tmp_path / "out"
    (output / "vectors").mkdir(parents=True)
    theirs = output / "vectors" / name
    theirs.write_bytes(b"another tool's data")
    embedding_server.reset_stats()
    args = ["run", "--config", str(_config_file(tmp_path, embedding_server)), "--quiet"]
    assert main(args) == 2
    assert theirs.read_bytes() == b"another tool's data"
    assert embedding_server.stats.requests == 0
    assert not (output / "manifest.json").exists()


def test_a_complete_outputs_stray_file_refuses_an_overwrite(
        tmp_path: Path, embedding_server: EmbeddingServer) -> None:
    output = tmp_path / "out"
    cfg = _config(tmp_path, embedding_server, output={"overwrite": True})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    first = _manifest(output)
    theirs = output / "usage" / "part-00000.snappy.parquet"
    theirs.write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"part-00000\.snappy\.parquet was not written"):
        execute(RunRequest(cfg, quiet=True))
    assert theirs.read_bytes() == b"mine" and _manifest(output) == first
    assert {f["path"] for f in first["files"]} <= _table_files(output)


def _config_file(tmp_path: Path, server: EmbeddingServer, **sections: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_config(tmp_path, server, **sections).model_dump(
        by_alias=True, mode="json")))
    return path


# -- item 4: a run never touches the manifest before it until it commits -----------------------


def test_a_run_that_dies_leaves_the_manifest_before_it_in_place(
        tmp_path: Path, embedding_server: EmbeddingServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An aborted output is resumed by running again (no --overwrite); if that run dies, the
    aborted run's manifest and files are still what the folder holds, not a ``partial`` stub
    that would make the next run delete the aborted run's files."""
    output = tmp_path / "out"
    cfg = _config(tmp_path, embedding_server)
    embedding_server.fail_always(error_reply(401, "invalid api key", code="invalid_api_key"))
    assert execute(RunRequest(cfg, quiet=True)) == 3
    embedding_server.fail_always(None)
    aborted = _manifest(output)
    assert aborted["status"] == "aborted" and aborted["files"]

    import pipeline.run

    def crash(*_: object) -> None:
        raise RuntimeError("the runner fell over")

    monkeypatch.setattr(pipeline.run, "build_pipeline", crash)
    with pytest.raises(RuntimeError, match="fell over"):
        execute(RunRequest(cfg, quiet=True))
    assert _manifest(output) == aborted
    assert {f["path"] for f in aborted["files"]} <= _table_files(output)
    assert not (output / LEASE_NAME).exists()  # released on the way out


def test_while_a_run_works_the_folder_shows_only_the_run_before(
        tmp_path: Path, serve) -> None:
    """What a reader sees mid-run: no manifest on a fresh output (nothing committed yet), and
    the lease naming the run under way."""
    seen: list[tuple[bool, dict]] = []
    output = tmp_path / "out"

    class Watching(EmbeddingServer):
        def handle_embeddings(self, payload, headers):
            if not seen and payload.get("input") != [PREFLIGHT_TEXT]:
                seen.append(((output / "manifest.json").exists(),
                             json.loads((output / LEASE_NAME).read_text())))
            return super().handle_embeddings(payload, headers)

    server = serve(Watching, dim=16, model=MODEL)
    assert execute(RunRequest(_config(tmp_path, server), quiet=True)) == 0
    (manifest_seen, lease), = seen
    assert not manifest_seen
    assert lease["run_id"] == _manifest(output)["run_id"] and lease["pid"] == os.getpid()


# -- item 14: what killed runs leave is cleared, under the lease -------------------------------


def test_what_a_killed_commit_left_is_cleared(tmp_path: Path,
                                              embedding_server: EmbeddingServer) -> None:
    """A commit killed mid-way leaves a rewrite in progress and a manifest half written: both
    are embedpipe's names, cleared by the next run (not taken for the user's files)."""
    output = tmp_path / "out"
    (output / "vectors").mkdir(parents=True)
    dead = "20261203T000000Z-deadbeef"
    left = [output / "vectors" / f".part-{dead}-000000000000.parquet.dedup",
            output / ".manifest.json.tmp", output / f".aborted-{dead}.json.tmp",
            output / "_temporary" / dead / "ids" / f"part-{dead}-111111111111.parquet"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert execute(RunRequest(_config(tmp_path, embedding_server), quiet=True)) == 0
    assert not any(p.exists() for p in left)
    assert not (output / "_temporary").exists()


def test_a_legacy_outputs_files_are_recognised_by_its_manifest(
        tmp_path: Path, embedding_server: EmbeddingServer) -> None:
    """Versions before per-run names wrote ``part-<20 hex>.parquet`` and a ``partial`` manifest
    at the start: such leftovers are embedpipe's where that manifest says so, not elsewhere."""
    output = tmp_path / "out"
    (output / "vectors").mkdir(parents=True)
    legacy = output / "vectors" / "part-0123456789abcdef0123.parquet"
    legacy.write_bytes(b"old shard")
    with pytest.raises(ConfigError, match="was not written by embedpipe"):
        execute(RunRequest(_config(tmp_path, embedding_server), quiet=True))
    assert legacy.exists()
    (output / "manifest.json").write_text(json.dumps({"status": "partial", "run_id": "x"}))
    assert execute(RunRequest(_config(tmp_path, embedding_server), quiet=True)) == 0
    assert not legacy.exists()


# -- verify: files the manifest does not list --------------------------------------------------


def test_verify_names_files_the_manifest_does_not_list(
        tmp_path: Path, embedding_server: EmbeddingServer, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "out"
    assert execute(RunRequest(_config(tmp_path, embedding_server), quiet=True)) == 0
    manifest = _manifest(output)
    run_id = manifest["run_id"]
    listed = next(Path(f["path"]) for f in manifest["files"] if f["kind"] == "vectors")
    assert verify_report(str(output)).warnings == []

    crashed = output / "vectors" / f"part-20261203T000000Z-deadbeef-{'0' * 12}.parquet"
    shutil.copy(listed, crashed)  # a run that never committed: a warning, exit 0
    report = verify_report(str(output))
    assert report.problems == []
    assert len(report.warnings) == 1 and "run 20261203T000000Z-deadbeef never committed" in (
        report.warnings[0])
    assert main(["verify", str(output)]) == 0
    assert "warning" in capsys.readouterr().err

    same_run = output / "vectors" / f"part-{run_id}-{'f' * 12}.parquet"
    shutil.copy(listed, same_run)  # would be read by a part-RUN_ID-* selection: a problem
    foreign = output / "rejects" / "notes.parquet"
    foreign.write_bytes(b"x")  # read by a rejects/*.parquet glob: a problem
    problems = verify_output(str(output))
    assert len(problems) == 2
    assert any(str(same_run) in p and "not listed by its manifest" in p for p in problems)
    assert any(str(foreign) in p and "not written by embedpipe" in p for p in problems)
    assert main(["verify", str(output), "--json"]) == 1
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["problems"]) == 2 and len(shown["warnings"]) == 1


def test_a_reader_that_selects_the_manifests_run_never_mixes_two_runs(
        tmp_path: Path, embedding_server: EmbeddingServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Run A commits; an --overwrite run B writes its shards and then fails its commit (exit 4).
    The folder holds both runs' vectors, and the documented reads of A (its run id, or the
    manifest's list) see A's rows once each; only a bare glob would mix them."""
    duckdb = pytest.importorskip("duckdb")
    import dataclasses

    from pipeline import graph
    from transforms import write

    output = tmp_path / "out"
    cfg = _config(tmp_path, embedding_server, output={"overwrite": True, "rows_per_file": 7})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    first = _manifest(output)
    real = write.vectors_table

    def lossy(batches, spec):  # every file B writes misses its first row: B cannot commit
        return real(batches, spec).slice(1)

    monkeypatch.setattr(graph, "VECTORS", dataclasses.replace(write.VECTORS, to_table=lossy))
    assert execute(RunRequest(cfg, quiet=True)) == 4
    assert _manifest(output) == first
    runs = {Path(p).name[len("part-"):len("part-") + 25] for p in _table_files(output)}
    assert len(runs) == 2  # B's shards are there, beside A's

    con = duckdb.connect()
    by_run_id = con.execute(f"select count(*), count(distinct id) from "
                            f"'{output}/vectors/part-{first['run_id']}-*.parquet'").fetchone()
    listed = [f["path"] for f in first["files"] if f["kind"] == "vectors"]
    by_manifest = con.execute("select count(*), count(distinct id) from read_parquet(?)",
                              [listed]).fetchone()
    embedded = first["counts"]["chunks_embedded"]
    assert by_run_id == by_manifest == (embedded, embedded)
    everything = con.execute(f"select count(*) from '{output}/vectors/*.parquet'").fetchone()
    assert everything[0] > embedded  # why the docs say never to glob them all
    report = verify_report(str(output))
    assert report.problems == [] and report.warnings
    assert all("never committed" in w for w in report.warnings)
