"""A server that changes its vectors' dimension never poisons the cache nor crashes a run
(issue 11 item 7): the cache is keyed by the dimension served, and a change mid-run aborts the
run (exit 3) with both dimensions named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.local_model import HashingEmbedder
from pipeline.local_server import EmbeddingServer
from pipeline.run import RunRequest, execute
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.fixtures import Serve
from tests.support.harness import MODEL, make_config, read_output


class SwitchingServer(EmbeddingServer):
    """Serves ``dim`` for the first ``switch_after`` embedding requests, then ``then_dim``."""

    def __init__(self, *args: Any, then_dim: int, switch_after: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._then = HashingEmbedder(then_dim)
        self._switch_after = switch_after
        self._answered = 0

    def embedding_body(self, request):  # type: ignore[no-untyped-def]
        self._answered += 1
        if self._answered > self._switch_after:
            self.embedder = self._then
        return super().embedding_body(request)


def _config(tmp_path: Path, server: EmbeddingServer, out: str, **sections: Any):
    root = tmp_path / "corpus"
    if not root.exists():
        write_corpus(str(root))
    return make_config(corpus_patterns(str(root)), str(tmp_path / out), server.base_url,
                       cache={"path": str(tmp_path / "cache")}, **sections)


def _dims(tmp_path: Path, out: str) -> set[int]:
    _, tables = read_output(str(tmp_path / out))
    vectors = tables["vectors"]
    return {vectors.schema.field("embedding").type.list_size}


def test_a_server_restarted_with_another_dimension_gets_a_namespace_of_its_own(
        tmp_path: Path, serve: Serve) -> None:
    first = serve(EmbeddingServer, dim=32, model=MODEL)
    assert execute(RunRequest(_config(tmp_path, first, "one"), quiet=True)) == 0
    first.stop()
    second = serve(EmbeddingServer, dim=48, model=MODEL)  # the same model name
    assert execute(RunRequest(_config(tmp_path, second, "two"), quiet=True)) == 0
    assert _dims(tmp_path, "one") == {32} and _dims(tmp_path, "two") == {48}
    namespaces = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(namespaces) == 2
    keys = [json.loads((tmp_path / "cache" / n / "namespace.json").read_text())
            for n in namespaces]
    assert sorted(k["served_dimensions"] for k in keys) == [32, 48]
    # And the 48-dimension run is served from its own cache the next time.
    second.reset_stats()
    assert execute(RunRequest(_config(tmp_path, second, "three"), quiet=True)) == 0
    assert second.stats.requests == 1  # the preflight alone


def test_a_dimension_change_mid_run_aborts_with_both_dimensions_named(
        tmp_path: Path, serve: Serve) -> None:
    server = serve(SwitchingServer, dim=32, model=MODEL, then_dim=48, switch_after=4)
    cfg = _config(tmp_path, server, "out", limits={"max_concurrency": 1},
                  retry={"max_attempts": 2, "max_wait_s": 0.05, "initial_wait_s": 0.01})
    assert execute(RunRequest(cfg, quiet=True)) == 3
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "aborted"
    assert "48" in manifest["error"] and "32" in manifest["error"]
    _, tables = read_output(str(tmp_path / "out"))
    vectors = tables["vectors"]
    if vectors is not None and vectors.num_rows:  # what was committed before is kept, at 32
        assert vectors.schema.field("embedding").type.list_size == 32
        matrix = vectors.column("embedding").combine_chunks().flatten().to_numpy()
        assert np.isfinite(matrix).all()
