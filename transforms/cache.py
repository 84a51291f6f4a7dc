"""The content-addressed embedding cache: never pay twice for the same text.

A vector is determined by (provider kind, endpoint, model, dimensions, normalisation, request
parameters) and the chunk text. The first six name a *namespace*, a folder under ``cache.path``;
inside it, *segment* files hold ``(content_sha256, embedding)`` rows.

The design is driven by one constraint: no step may hold the corpus, its chunks or the cache in
memory, and nothing may wait for the whole corpus before the first request. So the lookup is not
a join (a join is a shuffle, and the in-process runner holds every shuffled element in memory
until the last one arrives); it is a probe of a compact per-process index:

- **The index** (:class:`CacheIndex`) maps the first 8 bytes of each cached text's sha256 to the
  segment and row that hold its vector: 16 bytes per cached vector, in sorted numpy arrays, built
  once per worker process from the ``content_sha256`` columns of the segments (the vectors are not
  read). Lookups are one vectorised ``searchsorted`` per group of chunks. The full sha256 of a hit
  is checked against the segment's row when its vector is read, so a prefix collision costs a
  request, never a wrong vector.
- **Keys files** (``seg-*.arrow.keys``) beside each segment hold its 8-byte prefixes, so the
  index of a million cached vectors is built from 8 MB, not from 6 GB of segments.
- **Segments** are Arrow IPC files, one per finished request (``seg-RUNID-*.arrow``), written by
  the embed stage as soon as the answer is in, under a temporary name and moved into place: a
  crash, a preemption or a SIGKILL loses at most the requests in flight, and re-running the same
  command finds everything else. Arrow IPC and not Parquet: a segment is written once and read
  whole, and IPC costs a memory copy either way (1.7 ms to write and 0.2 ms to read 256 vectors of
  1536 floats, against 26 ms to write dictionary-encoded zstd Parquet). Parquet files of earlier
  versions (``part-*.parquet``, ``run-*.parquet``) are still read.
- **Sparse vectors** (``provider.sparse``) are cached beside their dense vectors, in the
  segments of the sparse run's namespace (the namespace key holds the sparse flag, so no
  namespace mixes the two): two more columns, ``sparse_indices: list<int32>`` and
  ``sparse_values: list<float32>``, row for row, and a hit of such a namespace is served with
  both. Dense namespaces keep exactly the two-column format and the lookup path they had; the
  per-row work of splitting sparse vectors happens only in sparse namespaces (one record a
  request, so a few rows a segment). A segment of a sparse namespace without the sparse columns
  (or whose rows' indices and values differ in length) is treated as corrupt, as an unreadable
  segment is: a warning names it, and its texts are misses, sent again, never served without
  their sparse vectors. None exist in the wild (before sparse vectors were cached, a sparse run
  wrote no segment at all), so the stricter choice costs nothing; as the index keeps a text's
  oldest location, such a segment would shadow the newer copy of its texts until it is
  deleted, which the warning says.
- **New entries** join the index of the process that wrote them, so within one worker process an
  identical text that comes later is a hit; texts still in flight are handled by the embed stage
  (it sends one and gives the others its vector).

The store is append-only and any segment in it is valid, so concurrent runs may share a namespace;
a text cached twice is harmless (the index keeps one location).
"""

from __future__ import annotations

import logging
import posixpath
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.sorted_runs import SortedRuns
from transforms.types import Chunk, EmbeddedBatch, SparseVector

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".arrow"
KEYS_SUFFIX = ".keys"  # beside each segment: its 8-byte key prefixes, for building the index
LEGACY_SUFFIX = ".parquet"

#: Decoded segments kept per process for reading hits (a segment is read once per visit).
SEGMENT_CACHE_BYTES = 64 * 1024 * 1024

#: Threads that read segment keys while the index is built (object stores answer in parallel).
INDEX_READ_THREADS = 8

#: A temporary cache file (or a keys file without its segment) this old was left by a dead run.
STALE_AFTER_S = 3600.0


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """Where one namespace of the cache lives; picklable, no secrets beyond storage options."""

    url: str  # the namespace folder
    storage_options: tuple[tuple[str, Any], ...]
    run_id: str
    model: str
    key: str  # the namespace description, as JSON
    dim: int | None = None  # the run's vector dimension, when known: no other is ever served
    sparse: bool = False  # the namespace's vectors carry sparse vectors (provider.sparse)

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(self.url, **dict(self.storage_options))
        return fs, root.rstrip("/")


def default_cache_root(output_path: str) -> str:
    """Beside the output: ``.../runs/2026-11-22`` → ``.../runs/.embedpipe-cache``."""
    parent = posixpath.dirname(output_path.rstrip("/")) or "."
    return f"{parent}/.embedpipe-cache"


# -- keys --------------------------------------------------------------------------------------

_HEX_VALUE = np.zeros(256, dtype=np.uint64)
_HEX_VALUE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint64)
_HEX_VALUE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint64)
_NIBBLE_SHIFTS = np.arange(15, -1, -1, dtype=np.uint64) * np.uint64(4)


def sha_prefixes(shas: Sequence[str]) -> np.ndarray:
    """The first 8 bytes of each hex sha256, as ``uint64`` (vectorised: no per-item Python)."""
    if not len(shas):
        return np.zeros(0, dtype=np.uint64)
    head = "".join(s[:16] for s in shas).encode("ascii")
    return _prefixes_of(np.frombuffer(head, np.uint8).reshape(-1, 16))


def _prefixes_of(hex_digits: np.ndarray) -> np.ndarray:
    """``uint64`` keys from an ``(n, 16)`` array of ASCII hex digits."""
    return (_HEX_VALUE[hex_digits] << _NIBBLE_SHIFTS).sum(axis=1, dtype=np.uint64)


def sha_keys(shas: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each hex sha256 as 64 ASCII bytes (``S64``) and its 8-byte key, both vectorised.

    The full digests let a probe check every hit against the stored digest with one array
    comparison instead of a Python comparison per chunk.
    """
    joined = "".join(shas).encode("ascii", "replace")
    if len(joined) != 64 * len(shas):  # not all sha256 hex digests: compare what there is
        full = np.array([s.encode("ascii", "replace") for s in shas], dtype="S64")
        return full, sha_prefixes(shas)
    full = np.frombuffer(joined, dtype="S64")
    return full, _prefixes_of(full.view(np.uint8).reshape(-1, 64)[:, :16])


def _digests(column: pa.ChunkedArray) -> np.ndarray:
    """A ``content_sha256`` column as ``S64`` bytes, without a Python string per row."""
    array = column.combine_chunks()
    try:
        fixed = array.cast(pa.binary(64))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a digest of another length
        return np.array([s.encode("ascii", "replace") for s in array.to_pylist()], dtype="S64")
    return np.frombuffer(fixed.buffers()[1], dtype="S64", count=len(fixed),
                         offset=fixed.offset * 64)


# -- segments ----------------------------------------------------------------------------------


SPARSE_INDICES = "sparse_indices"
SPARSE_VALUES = "sparse_values"


def cache_table(shas: Sequence[str], vectors: np.ndarray,
                sparse: Sequence[SparseVector] | None = None) -> pa.Table:
    """A segment's table: ``content_sha256`` and ``embedding``, and with ``sparse`` (a sparse
    namespace) ``sparse_indices`` and ``sparse_values``, row for row."""
    dim = vectors.shape[1]
    columns: dict[str, pa.Array] = {
        "content_sha256": pa.array(shas, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)), dim),
    }
    if sparse is not None:
        if len(sparse) != len(shas):
            raise ValueError(f"{len(sparse)} sparse vectors for {len(shas)} texts: misaligned")
        flat = [(np.asarray(i, np.int32), np.asarray(v, np.float32)) for i, v in sparse]
        if any(len(i) != len(v) for i, v in flat):
            raise ValueError("a sparse vector's indices and values differ in length")
        lengths = np.fromiter((len(i) for i, _ in flat), np.int64, len(flat))
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        indices = np.concatenate([i for i, _ in flat]) if flat else np.zeros(0, np.int32)
        values = np.concatenate([v for _, v in flat]) if flat else np.zeros(0, np.float32)
        columns[SPARSE_INDICES] = pa.ListArray.from_arrays(offsets, pa.array(indices, pa.int32()))
        columns[SPARSE_VALUES] = pa.ListArray.from_arrays(offsets,
                                                          pa.array(values, pa.float32()))
    return pa.table(columns)


def read_segment(fs: fsspec.AbstractFileSystem, path: str,
                 columns: list[str] | None = None) -> pa.Table | None:
    """A segment (IPC, or Parquet of earlier versions); None if it is gone since the listing.

    Another run sharing the namespace may have removed its own temporary files between our
    listing and our read: that costs a hit (a request), never correctness.
    """
    try:
        if path.endswith(LEGACY_SUFFIX):
            with fs.open(path, "rb") as handle:
                return pq.read_table(handle, columns=columns)
        # One read of the whole segment (one GET on an object store), parsed in place.
        table = pa.ipc.open_file(pa.BufferReader(fs.cat_file(path))).read_all()
        return table.select(columns) if columns else table
    except FileNotFoundError:
        return None


def _write_atomically(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write under a temporary name and move into place: readers never see half a file."""
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.tmp"
    with fs.open(tmp, "wb") as handle, pa.ipc.new_file(handle, table.schema) as writer:
        writer.write_table(table)
    fs.mv(tmp, path)


def _is_segment(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return not name.startswith(".") and name.endswith((SEGMENT_SUFFIX, LEGACY_SUFFIX))


#: A sparse namespace's decoded sparse vectors: row ``r``'s indices and values are
#: ``indices[offsets[r]:offsets[r + 1]]`` and ``values[...]`` of the same slice.
_SparseColumns = tuple[np.ndarray, np.ndarray, np.ndarray]  # offsets, indices, values

#: digests (S64), vectors, usable rows, and in a sparse namespace the sparse columns.
_Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, _SparseColumns | None]


class CachedGroup(NamedTuple):
    """Hits of one segment: their positions in the probe, their vectors, and in a sparse
    namespace their sparse vectors (None in a dense one)."""

    positions: np.ndarray
    vectors: np.ndarray
    sparse: tuple[SparseVector, ...] | None = None


class _CorruptSegment(ValueError):
    """A segment that reads but cannot be served (a sparse namespace's, without sparse vectors)."""


def _sparse_columns(table: pa.Table, usable: np.ndarray) -> _SparseColumns:
    """A sparse segment's sparse vectors as flat arrays (vectorised: no per-row Python).

    Rows without a sparse vector, or with a value that is not finite, become unusable (misses),
    as a dense vector that is not finite does. Raises :class:`_CorruptSegment` for a segment
    that has no sparse columns, or whose indices and values do not pair up.
    """
    if SPARSE_INDICES not in table.column_names or SPARSE_VALUES not in table.column_names:
        raise _CorruptSegment("it has no sparse vectors (sparse_indices, sparse_values)")
    indices = table.column(SPARSE_INDICES).combine_chunks()
    values = table.column(SPARSE_VALUES).combine_chunks()
    lengths = indices.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    if not np.array_equal(lengths, values.value_lengths().fill_null(0).to_numpy(
            zero_copy_only=False)):
        raise _CorruptSegment("its sparse indices and values differ in length")
    usable &= ~(indices.is_null().to_numpy(zero_copy_only=False)
                | values.is_null().to_numpy(zero_copy_only=False))
    flat_indices = indices.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    flat_values = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    bad = ~np.isfinite(flat_values)
    if bad.any():
        usable[np.repeat(np.arange(len(lengths)), lengths)[bad]] = False
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, flat_indices, flat_values


class CacheIndex:
    """One namespace, as one worker process sees it: the key index, segment reads and writes.

    Thread-safe: the embed stage's request threads write segments while its DoFn thread looks
    chunks up. Built lazily by :func:`open_cache` (one per process and run).
    """

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self._fs, self._root = spec.filesystem()
        self._lock = threading.Lock()
        self._segments: list[str] = []
        self._keys = SortedRuns()
        self._decoded: OrderedDict[int, _Decoded] = OrderedDict()
        self._decoded_bytes = 0
        self._prefetching: dict[int, Future[_Decoded | None]] = {}
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="embedpipe-cache-read")
        self._fs.makedirs(self._root, exist_ok=True)
        key_file = f"{self._root}/namespace.json"
        if not self._fs.exists(key_file):
            with self._fs.open(key_file, "w") as handle:
                handle.write(spec.key + "\n")
        self._load()

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        """Stop reading ahead and drop the decoded segments."""
        self._prefetcher.shutdown(wait=True)
        with self._lock:
            self._decoded.clear()
            self._decoded_bytes = 0

    def _load(self) -> None:
        """Index every segment present now from its keys file (its key column where it has none).

        A segment's keys file (``seg-*.arrow.keys``: the 8-byte prefixes, little-endian) is a
        few KB, so a namespace of a million vectors is indexed by reading 8 MB, not the 6 GB of
        its segments. A keys file without its segment (a crash between the two) is ignored.
        """
        names = set(self._fs.find(self._root, maxdepth=1))
        paths = sorted(p for p in names if _is_segment(p))
        self._remove_stale(names)

        def keys_of(path: str) -> np.ndarray | None:
            if path + KEYS_SUFFIX in names:
                try:
                    return np.frombuffer(self._fs.cat_file(path + KEYS_SUFFIX), dtype="<u8")
                except (FileNotFoundError, ValueError):
                    pass
            table = read_segment(self._fs, path, ["content_sha256"])
            return None if table is None else sha_prefixes(
                table.column("content_sha256").to_pylist())

        with ThreadPoolExecutor(INDEX_READ_THREADS, thread_name_prefix="embedpipe-index") as pool:
            found = list(pool.map(keys_of, paths))
        keys, segments, rows = [], [], []
        for path, prefixes in zip(paths, found, strict=True):
            if prefixes is None or not len(prefixes):
                continue
            segments.append(np.full(len(prefixes), len(self._segments), dtype=np.uint32))
            rows.append(np.arange(len(prefixes), dtype=np.uint32))
            keys.append(prefixes.astype(np.uint64))
            self._segments.append(path)
        if keys:
            self._keys.add(np.concatenate(keys), np.concatenate(segments), np.concatenate(rows))

    def _remove_stale(self, names: set[str]) -> None:
        """Delete what killed runs left: half-written segments, keys files without a segment.

        Only files older than :data:`STALE_AFTER_S`: a live run (this one or another sharing
        the namespace) moves a temporary file into place, and writes a segment after its keys
        file, within milliseconds. Never a segment: any segment in the store is valid.
        """
        stale = [p for p in names
                 if (p.rsplit("/", 1)[-1].startswith(".") and p.endswith(".tmp"))
                 or (p.endswith(KEYS_SUFFIX) and p[:-len(KEYS_SUFFIX)] not in names)]
        now = time.time()
        for path in stale:
            try:
                modified = self._fs.modified(path).timestamp()
                if now - modified > STALE_AFTER_S:
                    self._fs.rm_file(path)
            except (FileNotFoundError, NotImplementedError, OSError):
                continue  # gone already, or a store that cannot tell: leave it

    # -- lookup --------------------------------------------------------------------------------

    def lookup(self, chunks: Sequence[Chunk]) -> tuple[list[int], np.ndarray]:
        """The positions in ``chunks`` whose text is cached, and their vectors (one per hit).

        :meth:`lookup_groups` joined into one matrix in the order of ``chunks``: for tests and
        callers that want one answer; the embed stage takes the groups as they are (and only
        they carry a sparse namespace's sparse vectors).
        """
        groups = self.lookup_groups(chunks)
        if not groups:
            return [], np.zeros((0, 0), dtype=np.float32)
        taken = np.concatenate([group.positions for group in groups])
        order = np.argsort(taken, kind="stable")
        return taken[order].tolist(), np.concatenate([g.vectors for g in groups])[order]

    def lookup_groups(self, chunks: Sequence[Chunk]) -> list[CachedGroup]:
        """The cached texts among ``chunks``, as ``(positions, vectors, sparse)`` per segment hit.

        One group per segment, so a re-run's vectors are never copied into one matrix and
        reordered: a group whose rows are a run over most of its segment (the usual case in a
        re-run, segments are hit in the order they were written) is a view of the decoded
        segment, with no copy at all; a scattered group is gathered (a view would pin a whole
        segment for a few rows). A hit whose full sha256 differs (a prefix collision) or whose
        stored vector is unusable (not finite, or all zeros; in a sparse namespace also a row
        without a finite sparse vector) is a miss. ``sparse`` is None in a dense namespace: its
        path does no per-row work.
        """
        if not chunks:
            return []
        digests, keys = sha_keys([c.content_sha256 for c in chunks])
        with self._lock:
            if not len(self._keys):
                return []
            found, segment, row = self._keys.find(keys)
        positions = np.flatnonzero(found)
        groups: list[CachedGroup] = []
        for number in np.unique(segment[positions]):
            decoded = self._segment(int(number))
            if decoded is None:
                continue
            stored, matrix, usable, sparse_columns = decoded
            at = positions[segment[positions] == number]
            rows = row[at].astype(np.intp)
            keep = rows < len(stored)
            keep[keep] &= stored[rows[keep]] == digests[at[keep]]
            keep[keep] &= usable[rows[keep]]
            if not keep.any():
                continue
            at, rows = at[keep], rows[keep]
            # A view keeps the whole decoded segment alive until the rows are written: only
            # worth it (and only safe for memory) when the rows are most of the segment.
            whole_run = 2 * len(rows) >= len(matrix) and bool(np.all(np.diff(rows) == 1))
            vectors = matrix[rows[0]:rows[-1] + 1] if whole_run else matrix[rows]
            if sparse_columns is None:
                groups.append(CachedGroup(at, vectors))
                continue
            offsets, indices, values = sparse_columns
            groups.append(CachedGroup(at, vectors, tuple(
                (indices[start:end].copy(), values[start:end].copy())
                for start, end in zip(offsets[rows].tolist(), offsets[rows + 1].tolist(),
                                      strict=True))))
        return groups

    def _segment(self, number: int) -> _Decoded | None:
        """A segment's shas, vectors and usable-row mask, decoded once and kept while recent.

        The next segment is decoded meanwhile on a thread of its own: hits of a re-run come in
        the order the segments were written, and reading and checking vectors (Arrow, numpy)
        runs mostly without the GIL, beside the stage's own thread.
        """
        with self._lock:
            decoded = self._decoded.get(number)
            if decoded is not None:
                self._decoded.move_to_end(number)
            pending = self._prefetching.get(number)
            following = number + 1
            if following < len(self._segments) and following not in self._decoded and (
                    following not in self._prefetching):
                self._prefetching[following] = self._prefetcher.submit(self._decode, following)
        if decoded is not None:
            return decoded
        if pending is not None:
            return pending.result()
        return self._decode(number)

    def _decode(self, number: int) -> _Decoded | None:
        path = self._segments[number]
        decoded: _Decoded | None = None
        try:
            table = read_segment(self._fs, path)
        except Exception:
            log.warning("embedpipe: cache segment %s cannot be read; its texts are sent again",
                        path, exc_info=True)
            table = None
        try:
            decoded = None if table is None else self._decoded_table(table)
        except _CorruptSegment as exc:
            log.warning("embedpipe: cache segment %s of a sparse namespace cannot be served: %s; "
                        "its texts are sent again (delete it to have them cached anew)", path,
                        exc)
        if decoded is None:
            with self._lock:
                self._prefetching.pop(number, None)
            return None
        with self._lock:
            self._prefetching.pop(number, None)
            self._decoded[number] = decoded
            self._decoded_bytes += _nbytes(decoded)
            while self._decoded_bytes > SEGMENT_CACHE_BYTES and len(self._decoded) > 1:
                _, old = self._decoded.popitem(last=False)
                self._decoded_bytes -= _nbytes(old)
        return decoded

    def _decoded_table(self, table: pa.Table) -> _Decoded:
        column = table.column("embedding").combine_chunks()
        matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(
            table.num_rows, column.type.list_size)
        # Finite and not all zeros, in one pass: a squared norm is NaN or inf if any value is
        # (or if one is huge: such a vector is not served either), and 0 only for all zeros.
        norms = np.einsum("ij,ij->i", matrix, matrix)
        usable = np.isfinite(norms) & (norms > 0)
        if self.spec.dim is not None and matrix.shape[1] != self.spec.dim:
            usable[:] = False  # written by a server of another dimension: never served here
        sparse = _sparse_columns(table, usable) if self.spec.sparse else None
        return (_digests(table.column("content_sha256")), matrix, usable, sparse)

    # -- writing -------------------------------------------------------------------------------

    def write(self, batches: Sequence[EmbeddedBatch]) -> None:
        """Store one request's vectors as a segment, and index them for this process.

        In a sparse namespace the batches' sparse vectors are stored too; a batch without them
        is not cached (its texts would be served without sparse vectors): a provider answers a
        sparse run with them, so this is a guard, not a path.
        """
        batches = [b for b in batches if len(b) and (not self.spec.sparse or b.sparse is not None)]
        if not batches:
            return
        shas = [c.content_sha256 for b in batches for c in b.chunks]
        vectors = batches[0].vectors if len(batches) == 1 else np.vstack(
            [b.vectors for b in batches])
        sparse = [row for b in batches for row in (b.sparse or ())] if self.spec.sparse else None
        name = f"{SEGMENT_PREFIX}{self.spec.run_id}-{uuid.uuid4().hex[:12]}{SEGMENT_SUFFIX}"
        path = f"{self._root}/{name}"
        keys = sha_prefixes(shas)
        # The keys first: the segment is the commit point, and a keys file alone is ignored.
        self._fs.pipe_file(path + KEYS_SUFFIX, keys.astype("<u8").tobytes())
        _write_atomically(self._fs, path, cache_table(shas, vectors, sparse))
        with self._lock:
            number = len(self._segments)
            self._segments.append(path)
            self._keys.add(keys, np.full(len(keys), number, dtype=np.uint32),
                           np.arange(len(keys), dtype=np.uint32))


def _nbytes(decoded: _Decoded) -> int:
    """What a decoded segment holds in memory: its vectors, and its sparse vectors if any."""
    sparse = decoded[3]
    return decoded[1].nbytes + (0 if sparse is None else sum(a.nbytes for a in sparse))


# -- the per-process registry ------------------------------------------------------------------
#
# Deliberate module-level state, as for the embed session: one index per (process, namespace,
# run), built by the first DoFn that needs it, so the key index is read once per process.

_INDEXES: dict[tuple[str, str], CacheIndex] = {}
_INDEXES_LOCK = threading.Lock()


def open_cache(spec: CacheSpec) -> CacheIndex:
    """This process's index of ``spec``'s namespace, built on first use."""
    with _INDEXES_LOCK:
        key = (spec.url, spec.run_id)
        index = _INDEXES.get(key)
        if index is None:
            index = _INDEXES[key] = CacheIndex(spec)
            log.info("embedpipe: cache %s holds %d vectors", spec.url, len(index))
        return index


def close_cache(spec: CacheSpec) -> None:
    """Forget this process's index of ``spec`` (when the run's embed session closes)."""
    with _INDEXES_LOCK:
        index = _INDEXES.pop((spec.url, spec.run_id), None)
    if index is not None:
        index.close()
