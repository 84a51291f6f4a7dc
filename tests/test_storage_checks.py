"""Storage that cannot work is a config error (exit 2) before any request, never a traceback.

Each case runs the real command line in a subprocess against a loopback embedding server and
checks the exit code, that the message names the key, the location and what to do, that no
traceback was printed, and that the server saw no request at all (not even the preflight).

- a missing filesystem package (``s3fs`` hidden from the interpreter by a meta path finder;
  ``gcsfs`` and ``adlfs`` are not installed here): the extra to install;
- an output or cache location that cannot be written: under a regular file, an existing file,
  a read-only mount (a private mount namespace, as root), clashing S3 credentials.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.local_server import EmbeddingServer
from pipeline.run import RunRequest, execute
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.harness import make_config
from transforms.errors import ConfigError

REPO = Path(__file__).parents[1]

# Run the CLI with some top-level packages made unimportable, as if they were not installed.
HIDING_CLI = """
import sys
hidden = set(sys.argv[1].split(","))

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
from pipeline.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def run_cli(tmp_path: Path, data: dict[str, Any], *, hide: str = "",
            prefix: list[str] | None = None, command_name: str = "run",
            ) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(data))
    command = [sys.executable, "-c", HIDING_CLI, hide, command_name, "--config", str(config)]
    return subprocess.run([*(prefix or []), *command], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO)


def config_data(tmp_path: Path, server: EmbeddingServer, **sections: dict) -> dict[str, Any]:
    root = str(tmp_path / "corpus")
    write_corpus(root)
    cfg = make_config(corpus_patterns(root), str(tmp_path / "out"), server.base_url, **sections)
    return cfg.model_dump(by_alias=True, mode="json")


def assert_refused(proc: subprocess.CompletedProcess[str], server: EmbeddingServer,
                   *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])
    assert server.stats.requests == 0


# -- item 12: a missing filesystem package ----------------------------------------------------

@pytest.mark.parametrize("where", ["input.path", "output.path", "cache.path"])
def test_s3_without_s3fs_is_exit_2_naming_the_extra(
        tmp_path: Path, embedding_server: EmbeddingServer, where: str) -> None:
    data = config_data(tmp_path, embedding_server)
    section, key = where.split(".")
    data[section][key] = ["s3://corpus/in/*.jsonl"] if where == "input.path" else "s3://corpus/x"
    proc = run_cli(tmp_path, data, hide="s3fs")
    assert_refused(proc, embedding_server, where, "s3://corpus/", "pip install 'embedpipe[s3]'")
    assert not (tmp_path / "out").exists()


def test_plan_of_s3_input_without_s3fs_is_exit_2_naming_the_extra(
        tmp_path: Path, embedding_server: EmbeddingServer) -> None:
    data = config_data(tmp_path, embedding_server)
    data["input"]["path"] = ["s3://corpus/in/*.jsonl"]
    proc = run_cli(tmp_path, data, hide="s3fs", command_name="plan")
    assert_refused(proc, embedding_server, "input.path", "pip install 'embedpipe[s3]'")


@pytest.mark.parametrize(("url", "extra", "package"), [
    ("gs://bucket/corpus/*.jsonl", "gcs", "gcsfs"),
    ("gcs://bucket/corpus/*.jsonl", "gcs", "gcsfs"),
    ("az://container/corpus/*.jsonl", "azure", "adlfs"),
    ("abfs://container/corpus/*.jsonl", "azure", "adlfs"),
])
def test_other_object_stores_without_their_package_name_the_extra(
        tmp_path: Path, embedding_server: EmbeddingServer, url: str, extra: str,
        package: str) -> None:
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    for section in ("input", "output"):
        cfg = make_config([url] if section == "input" else [str(tmp_path / "in")],
                          url.rsplit("/", 1)[0] if section == "output" else str(tmp_path / "o"),
                          embedding_server.base_url)
        with pytest.raises(ConfigError, match=rf"{section}\.path") as err:
            execute(RunRequest(cfg, quiet=True))
        assert f"pip install 'embedpipe[{extra}]'" in str(err.value)
    assert embedding_server.stats.requests == 0


def test_an_unknown_protocol_is_exit_2(tmp_path: Path,
                                       embedding_server: EmbeddingServer) -> None:
    cfg = make_config(["nosuchfs://bucket/*.jsonl"], str(tmp_path / "o"),
                      embedding_server.base_url)
    with pytest.raises(ConfigError, match=r"input\.path.*nosuchfs"):
        execute(RunRequest(cfg, quiet=True))


# -- item 13: an output or cache that cannot be written ----------------------------------------

def test_output_under_a_regular_file_is_exit_2(tmp_path: Path,
                                               embedding_server: EmbeddingServer) -> None:
    (tmp_path / "file.txt").write_text("not a folder")
    data = config_data(tmp_path, embedding_server)
    data["output"]["path"] = str(tmp_path / "file.txt" / "out")
    proc = run_cli(tmp_path, data)
    assert_refused(proc, embedding_server, "output.path", str(tmp_path / "file.txt"),
                   "is a file")
    assert (tmp_path / "file.txt").read_text() == "not a folder"


def test_output_that_is_an_existing_file_is_exit_2(tmp_path: Path,
                                                   embedding_server: EmbeddingServer) -> None:
    (tmp_path / "results.parquet").write_bytes(b"PAR1 someone's data")
    data = config_data(tmp_path, embedding_server)
    data["output"]["path"] = str(tmp_path / "results.parquet")
    proc = run_cli(tmp_path, data)
    assert_refused(proc, embedding_server, "output.path", str(tmp_path / "results.parquet"),
                   "is a file")
    assert (tmp_path / "results.parquet").read_bytes() == b"PAR1 someone's data"


def test_cache_path_that_is_a_file_is_exit_2_before_reading(
        tmp_path: Path, embedding_server: EmbeddingServer) -> None:
    (tmp_path / "cache").write_text("a file")
    data = config_data(tmp_path, embedding_server, cache={"path": str(tmp_path / "cache")})
    proc = run_cli(tmp_path, data)
    assert_refused(proc, embedding_server, "cache.path", str(tmp_path / "cache"), "is a file")
    assert not (tmp_path / "out").exists()


def test_read_only_output_is_exit_2(tmp_path: Path, embedding_server: EmbeddingServer) -> None:
    """A read-only mount: root ignores file modes, so as root the folder is a read-only tmpfs
    mounted in a private mount namespace of the run (nothing outside the run sees it)."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    data = config_data(tmp_path, embedding_server, cache={"enabled": False})
    data["output"]["path"] = str(readonly / "out")
    prefix = None
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("root without unshare: no way to make a folder read-only for root")
        mount = f"mount -t tmpfs -o ro tmpfs {readonly} && exec \"$@\""
        prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh"]
        probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs in a private mount namespace here")
    else:
        readonly.chmod(0o555)
    proc = run_cli(tmp_path, data, prefix=prefix)
    assert_refused(proc, embedding_server, "output.path", str(readonly / "out"))
    assert "Read-only file system" in proc.stderr or "Permission denied" in proc.stderr


def test_clashing_s3_credentials_are_exit_2_without_the_secret(
        tmp_path: Path, s3_options: dict[str, Any], embedding_server: EmbeddingServer) -> None:
    secret = "clash-9f8e7d6c5b4a39281706"
    data = config_data(tmp_path, embedding_server, cache={"enabled": False})
    data["output"]["path"] = "s3://corpus/out"
    data["output"]["storage_options"] = {
        "key": "AKIAFIRST", "secret": secret,
        "client_kwargs": {**s3_options["client_kwargs"], "aws_access_key_id": "AKIASECOND"}}
    proc = run_cli(tmp_path, data)
    assert_refused(proc, embedding_server, "output.path", "s3://corpus/out",
                   "aws_access_key_id")
    assert secret not in proc.stderr
