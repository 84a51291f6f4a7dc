"""End to end on the default (FnApiRunner) runner against a real OpenAI-dialect server on loopback.

Every test runs the whole pipeline through ``pipeline.run.execute`` and checks the committed
output against an independent oracle: the corpus builder's expectations and the server's own
embedder (:func:`tests.support.checks.assert_run_complete`).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest

from pipeline.local_server import EmbeddingServer, Reply
from pipeline.run import RunRequest, execute
from tests.support.checks import assert_run_complete
from tests.support.corpus import ExpectedCorpus, corpus_patterns, write_corpus
from tests.support.fixtures import Serve
from tests.support.harness import MODEL, make_config


def check_run(output: str, expected: ExpectedCorpus, server: EmbeddingServer,
              storage_options: dict[str, Any] | None = None, *, exact_usage: bool = True) -> dict:
    """The shared end-to-end invariants (every chunk a vector, aligned with its text, offsets,
    metadata and the server's vector; every bad record a reject; counts that add up), then
    usage against what the server itself counted."""
    run = assert_run_complete(output, expected, dim=server.dim, storage_options=storage_options)
    vectors = run.tables["vectors"]
    assert vectors is not None and "text" in vectors.column_names  # the runs include text

    # Usage: what the server counted is what the ok rows say.
    ok = run.ok_usage
    if exact_usage:
        assert sum(r["prompt_tokens"] for r in ok) == server.stats.tokens
        assert not any(r["tokens_estimated"] for r in ok)
    # Identical chunk texts are sent once (the CJK document repeats itself): + the preflight.
    assert sum(r["n_inputs"] for r in ok) == len(set(run.chunks.values())) + 1
    assert run.manifest["counts"]["chunks_failed"] == 0
    return run.manifest


def test_local_files_end_to_end(tmp_path: Path, embedding_server: EmbeddingServer) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    output = str(tmp_path / "out")
    cfg = make_config(corpus_patterns(root), output, embedding_server.base_url,
                      output={"include_text": True, "rows_per_file": 10})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    manifest = check_run(output, expected, embedding_server)
    vector_files = [f for f in manifest["files"] if f["kind"] == "vectors"]
    assert len(vector_files) > 1 and max(f["rows"] for f in vector_files) <= 10
    assert not (tmp_path / "out" / "_temporary").exists()


def test_s3_end_to_end(s3_options: dict[str, Any], embedding_server: EmbeddingServer) -> None:
    root = "s3://corpus/in"
    expected = write_corpus(root, s3_options)
    output = "s3://corpus/out/run-1"
    cfg = make_config(corpus_patterns(root), output, embedding_server.base_url, s3_options,
                      output={"include_text": True})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    check_run(output, expected, embedding_server, s3_options)
    manifest_text = fsspec.open(f"{output}/manifest.json", "r", **s3_options).open().read()
    assert '"secret": "[REDACTED]"' in manifest_text


class ShufflingServer(EmbeddingServer):
    """Answers in a random order and, on every third request, with one embedding too few."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rng = random.Random(7)
        self.lock = threading.Lock()
        self.answers = 0
        self.short_answers = 0

    def handle_embeddings(self, payload: dict[str, Any], headers) -> Reply:
        reply = super().handle_embeddings(payload, headers)
        body = dict(reply.body)
        data = list(body["data"])
        with self.lock:
            self.rng.shuffle(data)
            self.answers += 1
            if self.answers % 3 == 0 and len(data) > 1:
                data = data[:-1]
                self.short_answers += 1
        body["data"] = data
        return Reply(reply.status, body, reply.headers)


def test_shuffled_and_short_answers_stay_aligned(tmp_path: Path, serve: Serve) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    output = str(tmp_path / "out")
    srv = serve(ShufflingServer, dim=64, model=MODEL)
    cfg = make_config(corpus_patterns(root), output, srv.base_url,
                      output={"include_text": True})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    manifest = check_run(output, expected, srv, exact_usage=False)
    assert srv.short_answers > 0
    srv.stop()
    assert manifest["counts"]["retries"] >= srv.short_answers


def test_refuses_to_overwrite_a_complete_run(tmp_path: Path,
                                             embedding_server: EmbeddingServer) -> None:
    root = str(tmp_path / "corpus")
    write_corpus(root)
    output = str(tmp_path / "out")
    cfg = make_config(corpus_patterns(root), output, embedding_server.base_url)
    assert execute(RunRequest(cfg, quiet=True)) == 0
    from transforms.errors import ConfigError

    with pytest.raises(ConfigError, match="--overwrite"):
        execute(RunRequest(cfg, quiet=True))
    again = make_config(corpus_patterns(root), output, embedding_server.base_url,
                        output={"overwrite": True})
    assert execute(RunRequest(again, quiet=True)) == 0


def test_bad_key_exits_3_fast_and_never_shows_the_key(tmp_path: Path, serve: Serve) -> None:
    secret = "sk-test-THIS-KEY-MUST-NEVER-BE-LOGGED-0123456789"
    root = str(tmp_path / "corpus")
    write_corpus(root)
    output = tmp_path / "out"
    srv = serve(EmbeddingServer, dim=64, model=MODEL, api_key="sk-the-right-key-000000000000")
    config = tmp_path / "config.json"
    cfg = make_config(corpus_patterns(root), str(output), srv.base_url,
                      provider={"api_key_env": "EMBEDPIPE_TEST_KEY"})
    config.write_text(json.dumps(cfg.model_dump(by_alias=True, mode="json")))
    env = {**os.environ, "EMBEDPIPE_TEST_KEY": secret}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
        cwd=Path(__file__).parents[1],
    )
    elapsed = time.monotonic() - t0
    srv.stop()
    assert proc.returncode == 3, proc.stderr
    assert elapsed < 10
    assert "401" in proc.stderr and "EMBEDPIPE_TEST_KEY" in proc.stderr
    assert secret not in proc.stdout + proc.stderr
    for path in output.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
            assert secret[8:24].encode() not in path.read_bytes(), path
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "aborted"
    assert "401" in manifest["error"]


def test_unreachable_base_url_exits_3_with_a_hint(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = str(tmp_path / "corpus")
    write_corpus(root)
    cfg = make_config(corpus_patterns(root), str(tmp_path / "out"), f"http://127.0.0.1:{port}/v1")
    t0 = time.monotonic()
    assert execute(RunRequest(cfg, quiet=True)) == 3
    assert time.monotonic() - t0 < 10
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "aborted" and "reachable" in manifest["error"]
