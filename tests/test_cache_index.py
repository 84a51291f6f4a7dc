"""The cache's key index and segments, without Beam: lookups, writes, collisions, old files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.cache import CacheIndex, CacheSpec, cache_table, sha_prefixes
from transforms.sorted_runs import SortedRuns
from transforms.types import Chunk, EmbeddedBatch


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def chunk(text: str, n: int = 0) -> Chunk:
    return Chunk(chunk_id=f"d{n}#0", doc_id=f"d{n}", chunk_index=0, char_start=0,
                 char_end=len(text), n_tokens=len(text.split()), content_sha256=sha(text),
                 text=text, source=f"f.jsonl:{n + 1}")


def spec(tmp_path: Path, run_id: str = "run-a") -> CacheSpec:
    return CacheSpec(url=str(tmp_path / "ns"), storage_options=(), run_id=run_id, model="m",
                     key="{}")


def vectors_for(texts: list[str], dim: int = 8) -> np.ndarray:
    rng = np.random.default_rng(len(texts))
    return rng.standard_normal((len(texts), dim)).astype(np.float32)


def test_sha_prefixes_are_the_first_eight_bytes() -> None:
    shas = [sha(str(i)) for i in range(1000)] + [sha("x").upper()]
    assert sha_prefixes(shas).tolist() == [int(s[:16], 16) for s in shas]
    assert sha_prefixes([]).dtype == np.uint64


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2**64 - 1), max_size=40), max_size=12),
       st.lists(st.integers(0, 2**64 - 1), max_size=40))
def test_sorted_runs_find_what_was_added(batches: list[list[int]], probes: list[int]) -> None:
    runs = SortedRuns()
    where: dict[int, tuple[int, int]] = {}
    for b, keys in enumerate(batches):
        runs.add(np.array(keys, dtype=np.uint64), np.full(len(keys), b, dtype=np.uint32),
                 np.arange(len(keys), dtype=np.uint32))
        for r, key in enumerate(keys):
            where.setdefault(key, (b, r))  # the oldest entry wins
    keys = np.array(probes + list(where), dtype=np.uint64)
    found, batch, row = runs.find(keys) if len(runs) else (np.zeros(len(keys), bool), 0, 0)
    for i, key in enumerate(keys.tolist()):
        assert bool(found[i]) == (key in where)
        if key in where:
            assert (int(batch[i]), int(row[i])) == where[key]
    assert len(runs) == sum(len(b) for b in batches)


def test_written_segments_are_hits_for_this_process_and_the_next(tmp_path: Path) -> None:
    texts = [f"text number {i}" for i in range(600)]
    index = CacheIndex(spec(tmp_path))
    vectors = vectors_for(texts)
    for start in range(0, 600, 256):  # three requests, three segments
        part = [chunk(t, start + i) for i, t in enumerate(texts[start:start + 256])]
        index.write([EmbeddedBatch(tuple(part), "m", vectors[start:start + 256])])
    assert len(list((tmp_path / "ns").glob("seg-run-a-*.arrow"))) == 3
    probe = [chunk(t, i) for i, t in enumerate([*texts[::7], "never embedded"])]
    hits, got = index.lookup(probe)
    assert hits == list(range(len(probe) - 1))
    np.testing.assert_array_equal(got, vectors[::7])

    later = CacheIndex(spec(tmp_path, "run-b"))  # a new run reads the namespace from disk
    assert len(later) == 600
    hits, got = later.lookup(probe)
    assert hits == list(range(len(probe) - 1))
    np.testing.assert_array_equal(got, vectors[::7])


def test_a_cache_far_larger_than_the_run(tmp_path: Path) -> None:
    texts = [f"cached {i}" for i in range(20_000)]
    index = CacheIndex(spec(tmp_path))
    vectors = vectors_for(texts, dim=4)
    for start in range(0, len(texts), 2000):
        part = tuple(chunk(t, start + i) for i, t in enumerate(texts[start:start + 2000]))
        index.write([EmbeddedBatch(part, "m", vectors[start:start + 2000])])
    run = [chunk(texts[12_345]), chunk("new text"), chunk(texts[7])]
    hits, got = CacheIndex(spec(tmp_path, "run-b")).lookup(run)
    assert hits == [0, 2]
    np.testing.assert_array_equal(got, vectors[[12_345, 7]])


def test_a_prefix_collision_is_a_miss_not_a_wrong_vector(tmp_path: Path) -> None:
    index = CacheIndex(spec(tmp_path))
    stored = chunk("stored text")
    index.write([EmbeddedBatch((stored,), "m", vectors_for(["a"]))])
    impostor = Chunk(**{**{f: getattr(stored, f) for f in stored.__slots__},
                        "content_sha256": stored.content_sha256[:16] + "0" * 48,
                        "text": "another text"})
    assert index.lookup([impostor])[0] == []
    assert index.lookup([stored])[0] == [0]


@pytest.mark.parametrize("bad", [np.zeros(8), np.full(8, np.nan)], ids=["zeros", "nan"])
def test_unusable_cached_vectors_are_never_served(tmp_path: Path, bad: np.ndarray) -> None:
    index = CacheIndex(spec(tmp_path))
    item = chunk("broken vector")
    index.write([EmbeddedBatch((item,), "m", bad.reshape(1, -1).astype(np.float32))])
    assert index.lookup([item])[0] == []


def test_parquet_files_of_earlier_versions_are_still_read(tmp_path: Path) -> None:
    texts = ["old one", "old two"]
    (tmp_path / "ns").mkdir()
    pq.write_table(cache_table([sha(t) for t in texts], vectors_for(texts)),
                   tmp_path / "ns" / "part-20260101-00000.parquet")
    hits, got = CacheIndex(spec(tmp_path)).lookup([chunk("old two"), chunk("new")])
    assert hits == [0]
    np.testing.assert_array_equal(got, vectors_for(texts)[1:])


def test_the_index_reads_keys_files_and_falls_back_to_the_segments(tmp_path: Path) -> None:
    """Keys files make the index cheap to build; without one (older caches, a lost file) the
    segment's own column serves; a keys file whose segment never landed is ignored."""
    texts = [f"text {i}" for i in range(300)]
    index = CacheIndex(spec(tmp_path))
    vectors = vectors_for(texts)
    for start in (0, 150):
        part = tuple(chunk(t, start + i) for i, t in enumerate(texts[start:start + 150]))
        index.write([EmbeddedBatch(part, "m", vectors[start:start + 150])])
    folder = tmp_path / "ns"
    keys = sorted(folder.glob("seg-*.arrow.keys"))
    assert len(keys) == 2 and all(k.stat().st_size == 150 * 8 for k in keys)
    keys[0].unlink()
    (folder / "seg-run-x-000000000000.arrow.keys").write_bytes(b"\x01" * 80)  # no segment
    rebuilt = CacheIndex(spec(tmp_path, "run-b"))
    assert len(rebuilt) == 300
    hits, got = rebuilt.lookup([chunk(t, i) for i, t in enumerate(texts)])
    assert hits == list(range(300))
    np.testing.assert_array_equal(got, vectors)


def test_lookup_groups_are_views_of_segments_for_runs_and_copies_otherwise(
        tmp_path: Path) -> None:
    texts = [f"segment text {i}" for i in range(512)]
    vectors = vectors_for(texts)
    index = CacheIndex(spec(tmp_path))
    for start in (0, 256):  # two segments of 256 rows
        part = tuple(chunk(t, start + i) for i, t in enumerate(texts[start:start + 256]))
        index.write([EmbeddedBatch(part, "m", vectors[start:start + 256])])
    fresh = CacheIndex(spec(tmp_path, "run-b"))  # reads the segments from disk
    # A re-run's probe: a run of each segment, a miss between them, one row out of order.
    probe = [chunk(t) for t in texts[10:210]] + [chunk("not cached")] + [
        chunk(t) for t in (texts[300], texts[299], texts[301])]
    groups = sorted(fresh.lookup_groups(probe), key=lambda g: int(g[0][0]))
    assert [g[0].tolist() for g in groups] == [list(range(200)), [201, 202, 203]]
    (_, first), (_, second) = groups
    np.testing.assert_array_equal(first, vectors[10:210])
    assert first.base is not None and not first.flags.owndata  # a slice of the decoded segment
    np.testing.assert_array_equal(second, vectors[[300, 299, 301]])
    hits, matrix = fresh.lookup(probe)  # the joined form keeps the probe's order
    assert hits == [*range(200), 201, 202, 203]
    np.testing.assert_array_equal(matrix, vectors[[*range(10, 210), 300, 299, 301]])


def test_a_few_rows_of_a_segment_are_copied_not_pinned(tmp_path: Path) -> None:
    texts = [f"pinned text {i}" for i in range(256)]
    vectors = vectors_for(texts)
    index = CacheIndex(spec(tmp_path))
    index.write([EmbeddedBatch(tuple(chunk(t, i) for i, t in enumerate(texts)), "m", vectors)])
    [(positions, got)] = CacheIndex(spec(tmp_path, "run-b")).lookup_groups([chunk(texts[5])])
    assert positions.tolist() == [0]
    np.testing.assert_array_equal(got, vectors[5:6])
    assert got.flags.owndata or got.base.nbytes == got.nbytes  # not a window on 256 rows


def test_what_killed_runs_left_in_the_cache_is_removed_once_stale(tmp_path: Path) -> None:
    import os
    import time

    index = CacheIndex(spec(tmp_path))
    item = chunk("kept text")
    index.write([EmbeddedBatch((item,), "m", vectors_for(["a"]))])
    ns = tmp_path / "ns"
    old = time.time() - 2 * 3600
    half = ns / ".seg-deadrun-000000000000.arrow.tmp"
    orphan = ns / "seg-deadrun-111111111111.arrow.keys"
    fresh = ns / ".seg-liverun-222222222222.arrow.tmp"
    for path in (half, orphan, fresh):
        path.write_bytes(b"x")
    os.utime(half, (old, old))
    os.utime(orphan, (old, old))
    again = CacheIndex(spec(tmp_path, "run-b"))
    assert not half.exists() and not orphan.exists()
    assert fresh.exists()  # may belong to a live run: too young to touch
    assert again.lookup([item])[0] == [0]  # segments are never touched
