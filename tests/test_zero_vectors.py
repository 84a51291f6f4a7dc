"""All-zero vectors are never written nor cached: refused like a malformed answer (issue 11.6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipeline.local_server import EmbeddingServer
from pipeline.run import RunRequest, execute
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.fixtures import Serve
from tests.support.harness import MODEL, make_config, read_output
from transforms.errors import MalformedResponseError
from transforms.providers.base import check_vectors


class ZeroServer(EmbeddingServer):
    """Answers all-zero vectors to the first ``zero_answers`` embedding requests (-1: all)."""

    def __init__(self, *args: Any, zero_answers: int = -1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.zero_answers = zero_answers
        self.zeroed = 0

    def embedding_body(self, request):  # type: ignore[no-untyped-def]
        body = super().embedding_body(request)
        if self.zero_answers < 0 or self.zeroed < self.zero_answers:
            self.zeroed += 1
            zero = np.zeros(self.dim, dtype="<f4")
            for item in body["data"]:
                item["embedding"] = (__import__("base64").b64encode(zero.tobytes()).decode()
                                     if isinstance(item["embedding"], str) else zero.tolist())
        return body


def test_check_vectors_names_the_first_zero_row() -> None:
    vectors = np.ones((4, 3), dtype=np.float32)
    vectors[2] = 0
    with pytest.raises(MalformedResponseError, match=r"1 all-zero embedding.*index 2"):
        check_vectors(vectors, 4, 3)
    check_vectors(np.ones((4, 3), dtype=np.float32), 4, 3)


def _cache_rows(tmp_path: Path) -> pa.Table | None:
    segments = sorted((tmp_path / ".embedpipe-cache").rglob("seg-*.arrow"))
    tables = [pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in segments]
    return pa.concat_tables(tables) if tables else None


def test_zeros_every_time_are_rejected_and_never_cached(tmp_path: Path, serve: Serve) -> None:
    server = serve(ZeroServer, dim=32, model=MODEL, zero_answers=-1)
    root = str(tmp_path / "corpus")
    write_corpus(root)
    cfg = make_config(corpus_patterns(root), str(tmp_path / "out"), server.base_url,
                      provider={"preflight": False},
                      retry={"max_attempts": 2, "max_wait_s": 0.05, "initial_wait_s": 0.01})
    assert execute(RunRequest(cfg, quiet=True)) == 1
    manifest, tables = read_output(str(tmp_path / "out"))
    assert manifest["counts"]["chunks_embedded"] == 0
    assert manifest["counts"]["chunks_failed"] == manifest["counts"]["chunks"] > 0
    reasons = set(tables["rejects"].filter(
        pa.compute.equal(tables["rejects"].column("stage"), "embed")).column("detail").to_pylist())
    assert all("all-zero" in r for r in reasons)
    assert _cache_rows(tmp_path) is None  # nothing cached


def test_zeros_once_are_retried_and_the_good_vectors_kept(tmp_path: Path, serve: Serve) -> None:
    server = serve(ZeroServer, dim=32, model=MODEL, zero_answers=1)
    root = str(tmp_path / "corpus")
    write_corpus(root)
    # No preflight: the one zero answer goes to a request of the pipeline, whose chunks it held.
    cfg = make_config(corpus_patterns(root), str(tmp_path / "out"), server.base_url,
                      provider={"preflight": False},
                      retry={"max_attempts": 3, "max_wait_s": 0.05, "initial_wait_s": 0.01})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    assert server.zeroed == 1
    _, tables = read_output(str(tmp_path / "out"))
    vectors = tables["vectors"].column("embedding").combine_chunks().flatten().to_numpy()
    assert np.abs(vectors.reshape(tables["vectors"].num_rows, -1)).sum(axis=1).min() > 0
    cached = _cache_rows(tmp_path)
    assert cached is not None and cached.num_rows > 0
    matrix = cached.column("embedding").combine_chunks().flatten().to_numpy().reshape(
        cached.num_rows, -1)
    assert (np.abs(matrix).sum(axis=1) > 0).all()
