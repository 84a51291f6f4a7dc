"""End to end on the default (FnApiRunner) runner against a real OpenAI-dialect server on loopback.

Every test runs the whole pipeline through ``pipeline.run.execute`` and checks the committed
output against an independent oracle: the corpus builder's expectations and the server's own
embedder.
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
import numpy as np
import pyarrow as pa
import pytest

from pipeline.local_server import EmbeddingServer, HashingEmbedder, Reply
from pipeline.run import RunRequest, execute
from tests.corpus import corpus_patterns, write_corpus
from tests.harness import MODEL, expected_chunks, make_config, read_output


def check_run(output: str, expected, server: EmbeddingServer,
              storage_options: dict[str, Any] | None = None, *, exact_usage: bool = True) -> dict:
    manifest, t = read_output(output, storage_options)
    vectors, usage, rejects = t["vectors"], t["usage"], t["rejects"]
    chunks = expected_chunks(expected.documents)

    # One row per chunk, unique ids, exactly the chunks of the valid documents.
    ids = vectors.column("id").to_pylist()
    assert len(ids) == len(set(ids))
    assert set(ids) == set(chunks)

    # Each vector is the server's vector for that chunk's text.
    texts = [chunks[i] for i in ids]
    assert vectors.column("text").to_pylist() == texts
    got = np.asarray(vectors.column("embedding").combine_chunks().flatten()).reshape(len(ids), -1)
    want = HashingEmbedder(dim=server.dim).embed(texts)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert vectors.schema.field("embedding").type == pa.list_(pa.float32(), server.dim)

    # Offsets slice the document text; metadata travels with the chunk.
    rows = vectors.select(["doc_id", "char_start", "char_end", "text", "lang"]).to_pylist()
    for row in rows:
        assert expected.documents[row["doc_id"]][row["char_start"]:row["char_end"]] == row["text"]
        assert row["lang"] == expected.metadata[row["doc_id"]]

    # Each bad record is in rejects with its reason and source.
    got_rejects = {r["source"]: r["reason"] for r in rejects.to_pylist()}
    assert got_rejects == expected.rejects

    # Usage: what the server counted is what the ok rows say.
    ok = [r for r in usage.to_pylist() if r["outcome"] == "ok"]
    if exact_usage:
        assert sum(r["prompt_tokens"] for r in ok) == server.stats.tokens
        assert not any(r["tokens_estimated"] for r in ok)
    # Identical chunk texts are sent once (the CJK document repeats itself): + the preflight.
    assert sum(r["n_inputs"] for r in ok) == len(set(texts)) + 1

    counts = manifest["counts"]
    assert manifest["status"] == "complete"
    assert counts["chunks"] == counts["chunks_embedded"] == vectors.num_rows
    assert counts["chunks_failed"] == 0
    assert counts["documents_read"] == expected.records
    assert counts["documents_rejected"] == rejects.num_rows == len(expected.rejects)
    assert counts["documents_valid"] == len(expected.documents)
    assert counts["requests"] == usage.num_rows
    assert manifest["usage"]["prompt_tokens"] == sum(r["prompt_tokens"] for r in ok)
    assert manifest["dimensions"] == server.dim
    return manifest


@pytest.fixture
def server():
    with EmbeddingServer(dim=64, model=MODEL) as srv:
        yield srv


def test_local_files_end_to_end(tmp_path: Path, server: EmbeddingServer) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    output = str(tmp_path / "out")
    cfg = make_config(corpus_patterns(root), output, server.base_url,
                      output={"include_text": True, "rows_per_file": 10})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    manifest = check_run(output, expected, server)
    vector_files = [f for f in manifest["files"] if f["kind"] == "vectors"]
    assert len(vector_files) > 1 and max(f["rows"] for f in vector_files) <= 10
    assert not (tmp_path / "out" / "_temporary").exists()


def test_s3_end_to_end(s3_options: dict[str, Any], server: EmbeddingServer) -> None:
    root = "s3://corpus/in"
    expected = write_corpus(root, s3_options)
    output = "s3://corpus/out/run-1"
    cfg = make_config(corpus_patterns(root), output, server.base_url, s3_options,
                      output={"include_text": True})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    check_run(output, expected, server, s3_options)
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


def test_shuffled_and_short_answers_stay_aligned(tmp_path: Path) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    output = str(tmp_path / "out")
    with ShufflingServer(dim=64, model=MODEL) as srv:
        cfg = make_config(corpus_patterns(root), output, srv.base_url,
                          output={"include_text": True})
        assert execute(RunRequest(cfg, quiet=True)) == 0
        manifest = check_run(output, expected, srv, exact_usage=False)
        assert srv.short_answers > 0
    assert manifest["counts"]["retries"] >= srv.short_answers


def test_refuses_to_overwrite_a_complete_run(tmp_path: Path, server: EmbeddingServer) -> None:
    root = str(tmp_path / "corpus")
    write_corpus(root)
    output = str(tmp_path / "out")
    cfg = make_config(corpus_patterns(root), output, server.base_url)
    assert execute(RunRequest(cfg, quiet=True)) == 0
    from transforms.errors import ConfigError

    with pytest.raises(ConfigError, match="--overwrite"):
        execute(RunRequest(cfg, quiet=True))
    again = make_config(corpus_patterns(root), output, server.base_url,
                        output={"overwrite": True})
    assert execute(RunRequest(again, quiet=True)) == 0


def test_bad_key_exits_3_fast_and_never_shows_the_key(tmp_path: Path) -> None:
    secret = "sk-test-THIS-KEY-MUST-NEVER-BE-LOGGED-0123456789"
    root = str(tmp_path / "corpus")
    write_corpus(root)
    output = tmp_path / "out"
    with EmbeddingServer(dim=64, model=MODEL, api_key="sk-the-right-key-000000000000") as srv:
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
