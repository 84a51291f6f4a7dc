"""The cache's key index and segments, without Beam: lookups, writes, collisions, old files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
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
    (_, first, no_sparse), (_, second, _) = groups
    assert no_sparse is None and groups[1].sparse is None  # a dense namespace carries none
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
    [(positions, got, _)] = CacheIndex(spec(tmp_path, "run-b")).lookup_groups([chunk(texts[5])])
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


# -- sparse namespaces (provider.sparse) ------------------------------------------------------


def sparse_spec(tmp_path: Path, run_id: str = "run-a") -> CacheSpec:
    return CacheSpec(url=str(tmp_path / "ns"), storage_options=(), run_id=run_id, model="m",
                     key="{}", sparse=True)


def sparse_for(texts: list[str]) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Row ``i``: ``i % 5`` entries (so some are empty), strictly increasing indices."""
    rng = np.random.default_rng(len(texts) + 1)
    return tuple((np.sort(rng.choice(250_000, i % 5, replace=False)).astype(np.int32),
                  rng.uniform(0.01, 2.0, i % 5).astype(np.float32))
                 for i in range(len(texts)))


def assert_sparse_equal(got: tuple, expected: tuple) -> None:
    assert len(got) == len(expected)
    for (gi, gv), (ei, ev) in zip(got, expected, strict=True):
        assert gi.dtype == np.int32 and gv.dtype == np.float32
        np.testing.assert_array_equal(gi, ei)
        np.testing.assert_array_equal(gv, ev)


def test_sparse_vectors_round_trip_through_segments(tmp_path: Path) -> None:
    """A sparse namespace's segments keep each row's sparse vector; a hit, in this process or
    the next, is served with it, in runs and scattered alike."""
    texts = [f"sparse text {i}" for i in range(40)]
    vectors, sparse = vectors_for(texts), sparse_for(texts)
    index = CacheIndex(sparse_spec(tmp_path))
    for start in (0, 20):  # two segments, one of them written as two batches
        part = tuple(chunk(t, start + i) for i, t in enumerate(texts[start:start + 20]))
        index.write([EmbeddedBatch(part[:7], "m", vectors[start:start + 7],
                                   sparse[start:start + 7]),
                     EmbeddedBatch(part[7:], "m", vectors[start + 7:start + 20],
                                   sparse[start + 7:start + 20])])
    [segment, _] = sorted((tmp_path / "ns").glob("seg-*.arrow"))
    schema = pa.ipc.open_file(pa.BufferReader(segment.read_bytes())).schema
    assert schema.names == ["content_sha256", "embedding", "sparse_indices", "sparse_values"]
    assert schema.field("sparse_indices").type == pa.list_(pa.int32())
    assert schema.field("sparse_values").type == pa.list_(pa.float32())
    order = [*range(3, 18), 39, 25, 21, 0]
    probe = [chunk(texts[i]) for i in order] + [chunk("not cached")]
    for reader in (index, CacheIndex(sparse_spec(tmp_path, "run-b"))):
        groups = reader.lookup_groups(probe)
        assert sorted(p for g in groups for p in g.positions.tolist()) == list(range(len(order)))
        for group in groups:
            rows = [order[p] for p in group.positions.tolist()]
            np.testing.assert_array_equal(group.vectors, vectors[rows])
            assert group.sparse is not None
            assert_sparse_equal(group.sparse, tuple(sparse[r] for r in rows))


def test_unusable_sparse_rows_are_misses(tmp_path: Path) -> None:
    """A row whose sparse vector is missing or not finite is sent again, as a bad dense one."""
    texts = ["fine", "no sparse", "nan value"]
    (tmp_path / "ns").mkdir()
    table = cache_table([sha(t) for t in texts], vectors_for(texts), sparse_for(texts))
    indices = pa.array([[1], None, [2, 3]], pa.list_(pa.int32()))
    values = pa.array([[0.5], None, [1.0, float("nan")]], pa.list_(pa.float32()))
    table = table.set_column(2, "sparse_indices", indices).set_column(3, "sparse_values", values)
    with pa.ipc.new_file(str(tmp_path / "ns" / "seg-x-000000000000.arrow"),
                         table.schema) as writer:
        writer.write_table(table)
    [group] = CacheIndex(sparse_spec(tmp_path)).lookup_groups([chunk(t) for t in texts])
    assert group.positions.tolist() == [0]
    assert group.sparse is not None
    assert_sparse_equal(group.sparse, ((np.array([1], np.int32), np.array([0.5], np.float32)),))


def test_a_sparse_namespace_segment_without_sparse_vectors_is_corrupt(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Never served without its sparse vectors: a warning names it, its texts are misses."""
    texts = ["dense only"]
    CacheIndex(spec(tmp_path)).write(
        [EmbeddedBatch((chunk(texts[0]),), "m", vectors_for(texts), sparse_for(texts))])
    [segment] = (tmp_path / "ns").glob("seg-*.arrow")
    with caplog.at_level("WARNING", logger="transforms.cache"):
        assert CacheIndex(sparse_spec(tmp_path, "run-b")).lookup_groups([chunk(texts[0])]) == []
    assert segment.name in caplog.text and "no sparse vectors" in caplog.text
    assert CacheIndex(spec(tmp_path, "run-c")).lookup([chunk(texts[0])])[0] == [0]


def test_a_dense_namespace_stores_no_sparse_columns(tmp_path: Path) -> None:
    texts = ["a", "b"]
    CacheIndex(spec(tmp_path)).write(
        [EmbeddedBatch(tuple(chunk(t, i) for i, t in enumerate(texts)), "m", vectors_for(texts),
                       sparse_for(texts))])
    [segment] = (tmp_path / "ns").glob("seg-*.arrow")
    schema = pa.ipc.open_file(pa.BufferReader(segment.read_bytes())).schema
    assert schema.names == ["content_sha256", "embedding"]
    assert cache_table([sha(t) for t in texts], vectors_for(texts)).schema == schema
