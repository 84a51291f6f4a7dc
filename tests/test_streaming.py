"""End to end, the streaming design: duplicate ids across files and across the byte ranges of
one file, a cache far larger than the run, and two worker processes with the cache on.

The run streams from read to write (no shuffle on the data path), so duplicate ids are settled in
two tiers: at once where a worker has already let an earlier version through, and exactly at
commit for the rest (:mod:`transforms.dedup`). Whatever the order in which ranges and files are
read, and by however many workers, the output must be the same: the version of each id from the
earliest ``(file, line)`` and a ``duplicate_id`` reject for every other version.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.local_server import EmbeddingServer
from pipeline.run import PREFLIGHT_TEXT, RunRequest, execute
from pipeline.verify import verify_output
from tests.support.checks import assert_run_complete
from tests.support.corpus import ExpectedCorpus
from tests.support.fixtures import Serve
from tests.support.harness import MODEL, make_config

MULTI = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
WORDS = ["orbit", "comet", "nebula", "galaxy", "sauce", "butter", "garlic", "bond", "yield",
         "ledger", "audit", "stadium", "keeper", "season", "river", "delta", "harbor"]


def sentence(seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=12)) + f" {seed}."


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))


def duplicated_corpus(root: Path) -> tuple[list[str], dict[str, tuple[str, str]], set[str]]:
    """Three files with ids repeated within one file (far apart: other byte ranges) and across
    files, with identical and with different texts. Returns the patterns, id → (winning
    source, its text), and the sources of every losing version."""
    files: dict[str, list[tuple[str, str]]] = {
        "a.jsonl": [(f"a-{n:04d}", sentence(n)) for n in range(400)],
        "b.jsonl": [(f"b-{n:04d}", sentence(1000 + n)) for n in range(60)],
        "c.jsonl": [(f"c-{n:04d}", sentence(2000 + n)) for n in range(60)],
    }
    plant = [  # (id, file, line index, text)
        ("dup-1", "a.jsonl", 10, "first version, early in a"),
        ("dup-1", "a.jsonl", 390, "second version, late in a: another byte range"),
        ("dup-2", "a.jsonl", 50, "identical copies"),
        ("dup-2", "b.jsonl", 3, "identical copies"),
        ("dup-3", "c.jsonl", 1, "c's version, which loses to b"),
        ("dup-3", "b.jsonl", 5, "b's version"),
        ("dup-4", "c.jsonl", 7, "c's early line loses to a's late one"),
        ("dup-4", "a.jsonl", 200, "a's version of dup-4"),
        ("dup-5", "b.jsonl", 20, "three versions: b"),
        ("dup-5", "c.jsonl", 30, "three versions: c"),
        ("dup-5", "a.jsonl", 300, "three versions: a"),
    ]
    for doc_id, name, line, text in plant:
        files[name][line] = (doc_id, text)
    versions: dict[str, list[tuple[str, int, str]]] = {}
    for name, rows in files.items():
        write_jsonl(root / name, rows)
        for line, (doc_id, text) in enumerate(rows, start=1):
            versions.setdefault(doc_id, []).append(((root / name).as_uri(), line, text))
    winners, losers = {}, set()
    for doc_id, found in versions.items():
        ordered = sorted(found)
        winners[doc_id] = (f"{ordered[0][0]}:{ordered[0][1]}", ordered[0][2])
        losers |= {f"{url}:{line}" for url, line, _ in ordered[1:]}
    assert len(losers) == 6
    return [str(root / "*.jsonl")], winners, losers


def run_once(patterns: list[str], output: Path, server: EmbeddingServer, beam_args: list[str],
             **sections: dict) -> dict:
    sections.setdefault("input", {})
    cfg = make_config(patterns, str(output), server.base_url,
                      output={"include_text": True, "rows_per_file": 97}, **sections)
    assert execute(RunRequest(cfg, beam_args=beam_args, quiet=True)) == 0
    return json.loads((output / "manifest.json").read_text())


@pytest.mark.parametrize("beam_args", [[], MULTI], ids=["one_process", "two_processes"])
def test_duplicate_ids_across_files_and_ranges_keep_the_earliest_version(
        tmp_path: Path, beam_args: list[str], serve: Serve) -> None:
    patterns, winners, losers = duplicated_corpus(tmp_path / "corpus")
    server = serve(EmbeddingServer, dim=16, model=MODEL)
    manifest = run_once(patterns, tmp_path / "out", server, beam_args,
                        input={"range_bytes": 2048, "metadata_fields": []})
    server.stop()
    # Every winning version is one aligned vector, every losing one a duplicate_id reject.
    expected = ExpectedCorpus.of({doc_id: text for doc_id, (_, text) in winners.items()},
                                 rejects=dict.fromkeys(losers, "duplicate_id"))
    run = assert_run_complete(str(tmp_path / "out"), expected, dim=16)
    vectors = list(run.vectors.values())
    assert sorted(r["doc_id"] for r in vectors) == sorted(winners)  # one chunk each
    for row in vectors:
        assert (row["source"], row["text"]) == winners[row["doc_id"]], row["doc_id"]

    rejects = run.tables["rejects"].to_pylist()
    assert all(r["id"] == r["doc_id"] for r in rejects)
    assert manifest["counts"]["chunks"] == len(winners)
    assert manifest["counts"]["chunks_failed"] == 0
    assert manifest["rejects_by_reason"] == {"duplicate_id": len(losers)}
    assert verify_output(str(tmp_path / "out")) == []
    assert not (tmp_path / "out" / "_temporary").exists()


def test_a_cache_far_larger_than_the_run_serves_every_hit(tmp_path: Path, serve: Serve) -> None:
    big = [(f"doc-{n:05d}", sentence(n)) for n in range(1500)]
    write_jsonl(tmp_path / "big" / "docs.jsonl", big)
    small = big[700:800] + [(f"new-{n}", sentence(90_000 + n)) for n in range(20)]
    write_jsonl(tmp_path / "small" / "docs.jsonl", small)
    cache = {"cache": {"path": str(tmp_path / "cache")}}
    server = serve(EmbeddingServer, dim=16, model=MODEL)
    run_once([str(tmp_path / "big" / "docs.jsonl")], tmp_path / "out1", server, [], **cache)
    mark = len(server.stats.texts)
    manifest = run_once([str(tmp_path / "small" / "docs.jsonl")], tmp_path / "out2", server,
                        [], **cache)
    sent = Counter(t for t in server.stats.texts[mark:] if t != PREFLIGHT_TEXT)
    server.stop()
    assert sent == Counter(text for doc_id, text in small if doc_id.startswith("new-"))
    assert manifest["cache"]["hits"] == 100 and manifest["cache"]["misses"] == 20
    # Hits and misses alike: every document one aligned vector, the server's own.
    run = assert_run_complete(str(tmp_path / "out2"), ExpectedCorpus.of(dict(small)), dim=16)
    assert sorted(r["doc_id"] for r in run.vectors.values()) == sorted(d for d, _ in small)


def test_two_worker_processes_with_the_cache_on_embed_every_chunk(tmp_path: Path,
                                                                 serve: Serve) -> None:
    """The configuration that once committed a complete manifest with whole requests missing.
    Now every chunk is a vector, the counts add up, and a second run is all hits."""
    docs = [(f"doc-{n:05d}", sentence(n)) for n in range(3000)]
    write_jsonl(tmp_path / "corpus" / "docs.jsonl", docs)
    patterns = [str(tmp_path / "corpus" / "docs.jsonl")]
    server = serve(EmbeddingServer, dim=16, model=MODEL)
    first = run_once(patterns, tmp_path / "out", server, MULTI,
                     input={"range_bytes": 16 * 1024})
    mark = len(server.stats.texts)
    second = run_once(patterns, tmp_path / "out2", server, MULTI,
                      input={"range_bytes": 16 * 1024},
                      cache={"path": str(tmp_path / ".embedpipe-cache")})
    resent = [t for t in server.stats.texts[mark:] if t != PREFLIGHT_TEXT]
    server.stop()
    for manifest, output in ((first, "out"), (second, "out2")):
        counts = manifest["counts"]
        assert counts["chunks"] == counts["chunks_embedded"] == len(docs), counts
        assert verify_output(str(tmp_path / output)) == []
        run = assert_run_complete(str(tmp_path / output), ExpectedCorpus.of(dict(docs)), dim=16)
        assert sorted(r["doc_id"] for r in run.vectors.values()) == [d for d, _ in docs]
    assert second["cache"]["hits"] == len(docs) and resent == []


def test_an_output_that_misses_chunks_is_never_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        serve: Serve) -> None:
    """The guard behind the fix: should any stage or runner lose vector rows (as Beam's runner
    did in multi_processing), the commit step refuses: exit 4, no manifest committed, and
    the log says how many chunks are missing. Here the writer drops one request's vectors."""
    from transforms import write

    docs = [(f"doc-{n:04d}", sentence(n)) for n in range(200)]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    real = write.vectors_table

    def lossy(batches, spec):
        return real(batches[1:] if len(batches) > 1 else batches, spec)

    import dataclasses

    from pipeline import graph

    monkeypatch.setattr(graph, "VECTORS", dataclasses.replace(write.VECTORS, to_table=lossy))
    server = serve(EmbeddingServer, dim=16, model=MODEL)
    cfg = make_config([str(tmp_path / "docs.jsonl")], str(tmp_path / "out"),
                      server.base_url, output={"rows_per_file": 1000})
    assert execute(RunRequest(cfg, quiet=True)) == 4
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing committed
    found = re.search(r"made (\d+) chunks but wrote (\d+) vector rows", caplog.text)
    assert found and int(found.group(1)) == len(docs), caplog.text[-2000:]
    assert 0 < int(found.group(2)) < len(docs)  # the writer (a pickled copy) dropped one request
    assert verify_output(str(tmp_path / "out"))  # and verify says it is not complete
