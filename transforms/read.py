"""The read stage: ``input.path`` patterns in, raw records and read rejects out.

Three steps, each after a reshuffle, so that Beam spreads the work over workers: ``MatchFiles``
expands each pattern into :class:`SourceFile` elements (one listing per pattern),
``PlanRanges`` cuts each file into :class:`FileRange` elements, and ``ReadRecords`` streams each
range into :class:`RawRecord` elements. Memory stays bounded by one JSON line, CSV row or Parquet
batch, except in ``text`` format, where a whole file is one document.

Why ranges: one file of several GB read by one worker serialises the run on Dataflow or Flink,
however many workers there are. An uncompressed JSONL or CSV file larger than ``range_bytes`` is
therefore cut at line (row) boundaries about every ``range_bytes``, and a Parquet file between
row groups; compressed files (a decompressing stream cannot seek) and text files (one document)
stay whole, as does every small file, planned without any I/O. Each record keeps the exact line
or row number it would have if the file were read whole: the planner finds the cuts with one
sequential scan that counts lines (bytes only, ``bytes.find`` and ``bytes.count``: far faster
than parsing) or CSV rows (a line with a quote through the csv module itself, so that quoted
newlines, blank lines and rows it rejects count exactly as the reader counts them), and gives
every range the number of its first line or row. The scan runs on a worker, after the first reshuffle, so that the files
of one pattern are scanned in parallel.

Why not Beam's splittable DoFn (a ``RestrictionProvider`` over an ``OffsetRange``): it runs on
the FnApiRunner and the PortableRunner here (tried on Beam 2.77: initial splits are processed,
all within the one SDK worker these runners start), but its splits are byte offsets, and a worker
that starts at a byte offset cannot know the number of the line it starts at. Exact sources need
the scan either way, and once the cuts are known a plain "plan, reshuffle, read" spreads them on
every runner alike, with no dependence on dynamic splitting, which only some runners do.

Reading is deliberately permissive: this stage only turns bytes into fields. Whether an id or a
text is acceptable is the validate stage's decision, so that every format shares one set of rules
and reason codes. What cannot become a record here (bytes that are not UTF-8, a line that is not a
JSON object, a file that cannot be opened or breaks off half-way) becomes a :class:`Reject` that
names the file and the 1-based line or row, and the run goes on: one bad file never fails it.

All I/O goes through fsspec URLs, so local paths, ``memory://``, ``s3://`` and ``gs://`` behave
alike; nothing here looks at a URL scheme.

Example::

    read = pipeline | "ReadCorpus" >> ReadCorpus(cfg.input)
    read["records"]  # PCollection[RawRecord]
    read["rejects"]  # PCollection[Reject]
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import itertools
import json
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import apache_beam as beam
import fsspec
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PBegin, PCollection, TaggedOutput
from fsspec.core import OpenFile, has_magic, url_to_fs
from fsspec.spec import AbstractFileSystem

from transforms.errors import InputError, redact
from transforms.sections import InputConfig
from transforms.types import (
    INVALID_UTF8,
    MALFORMED_RECORD,
    NO_FILES_MATCHED,
    STAGE_READ,
    UNREADABLE_FILE,
    FileRange,
    RawRecord,
    Reject,
    SourceFile,
    format_source,
)

REJECTS: Final = "rejects"
"""Tag of the reject outputs of this stage's DoFns."""

RANGE_BYTES: Final = 64 * 1024 * 1024
"""The size above which a JSONL, CSV or Parquet file is read in ranges, each about this large."""

UNKNOWN_FORMAT = "unknown"
"""The format ``format: auto`` gives a file whose name it cannot place. Such files stay in the
listing so that the read stage reports each one as a reject instead of skipping it unseen."""

_FORMAT_BY_EXTENSION = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".md": "text",
    ".text": "text",
    ".rst": "text",
    ".html": "text",
}

# Compression suffix -> fsspec codec. Spelled out rather than left to ``compression="infer"``
# because fsspec does not know ".zstd", and the format inference must strip the same suffixes.
_CODEC_BY_SUFFIX = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}

# Formats read front to back, which a decompressing stream can serve. Parquet compresses its own
# pages and needs random access to its footer, so a compressed Parquet file cannot be read.
_STREAMED_FORMATS = frozenset({"jsonl", "csv", "text"})

_PARQUET_BATCH_ROWS = 1024

# The planner's reads: large, so that counting newlines costs little more than the I/O.
_SCAN_BLOCK_BYTES = 8 * 1024 * 1024

# A range reader's buffer: a range is read front to back, in requests this large or larger.
_READ_BUFFER_BYTES = 1024 * 1024

# The csv module refuses fields over 128 KiB by default. Document size is the validate stage's
# rule (validate.max_document_bytes, reason too_large), so that CSV behaves like every other format.
_CSV_FIELD_LIMIT = 2**31 - 1

# UTF-8 that skips a leading byte-order mark, as Excel and Notepad write: left in, it would
# rename the first CSV column. JSONL lines keep plain UTF-8, decoded per line, where this codec
# costs ten times more; a marked first line is rejected with a message that says so.
_UTF8_SKIPPING_BOM = "utf-8-sig"

_JSON_TYPE_NAMES = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


# --- Listing -----------------------------------------------------------------------------------


def expand_pattern(
    pattern: str, storage_options: Mapping[str, Any], fmt: str
) -> list[SourceFile]:
    """The files one ``input.path`` entry names, sorted by URL so that every run sees one order.

    A glob (``*``, ``?``, ``[``) names the files it matches, a directory every file below it at
    any depth, anything else the one file. Directories, and the empty "folder" objects that
    object stores keep, are not files. ``fmt`` is ``input.format``: with ``auto`` each file's
    format comes from its extension once a compression suffix is removed, and a file it cannot
    place gets :data:`UNKNOWN_FORMAT`.

    An empty list means that nothing matched; the caller decides what that means. A listing that
    fails (no such bucket, no permission, unknown protocol) raises :class:`InputError`.

    Example::

        expand_pattern("s3://corpus/2024/**/*.jsonl.gz", {"anon": True}, "auto")
    """
    try:
        fs, path = url_to_fs(pattern, **storage_options)
        root, entries = _list(fs, path)
        return sorted(
            (
                SourceFile(
                    url=fs.unstrip_protocol(entry["name"]),
                    root=fs.unstrip_protocol(root),
                    format=fmt if fmt != "auto" else _infer_format(entry["name"]),
                    size=int(entry.get("size") or 0),
                )
                for entry in entries
                if _is_file(entry)
            ),
            key=lambda source: source.url,
        )
    # Backends raise OSError, their client's own errors, ValueError for an unknown protocol or
    # ImportError for a missing package: translate them all, once, here.
    except Exception as exc:
        raise InputError(f"cannot list {pattern}: {_describe(exc, storage_options)}") from exc


def _list(fs: AbstractFileSystem, path: str) -> tuple[str, Iterable[dict[str, Any]]]:
    """The root that text-document ids are relative to, and the entries ``path`` names."""
    if has_magic(path):
        literal = itertools.takewhile(lambda part: not has_magic(part), path.split("/"))
        return "/".join(literal) or fs.root_marker, fs.glob(path, detail=True).values()
    try:
        entry = fs.info(path)
    except FileNotFoundError:
        return posixpath.dirname(path), []
    if entry["type"] == "directory":
        return path, fs.find(path, detail=True).values()
    return posixpath.dirname(path), [entry]


def _is_file(entry: Mapping[str, Any]) -> bool:
    # Object stores list "folder/" placeholder keys as files; no real file name ends with "/".
    return entry["type"] == "file" and not entry["name"].endswith("/")


def _infer_format(path: str) -> str:
    stem, extension = posixpath.splitext(path.lower())
    compressed = extension in _CODEC_BY_SUFFIX
    if compressed:
        extension = posixpath.splitext(stem)[1]
    fmt = _FORMAT_BY_EXTENSION.get(extension, UNKNOWN_FORMAT)
    return UNKNOWN_FORMAT if compressed and fmt not in _STREAMED_FORMATS else fmt


# --- Reading -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Progress:
    """How far a reader got, so that a file that breaks off is reported where it broke.

    Readers set ``opened`` once the file is open and advance ``records`` to the position (line
    or row number) of each line or row they consume; a range starts them at the position before
    its first line or row. The text reader never touches it: a whole file has no position.
    """

    opened: bool = False
    records: int = 0

    @property
    def failed_at(self) -> int | None:
        """The first position not read, or None when the file never opened."""
        return self.records + 1 if self.opened else None


_Reader = Callable[[FileRange, InputConfig, _Progress], Iterator[RawRecord | Reject]]


def read_records(source: SourceFile, cfg: InputConfig) -> Iterator[RawRecord | Reject]:
    """Stream one whole file into raw records, with a reject for each part that cannot be read.

    Records come out in file order with their 1-based line (JSONL) or data row (CSV, Parquet)
    number. If the file fails part-way (corrupt compression, truncated Parquet, lost connection),
    the records already read stand and a single ``unreadable_file`` reject at the first position
    not read ends the file: the rest of the corpus is still read.
    """
    return read_range(FileRange(source), cfg)


def read_range(part: FileRange, cfg: InputConfig) -> Iterator[RawRecord | Reject]:
    """Stream one range of a file as :func:`read_records` streams the whole file.

    A range yields exactly the records and rejects, with the same positions, that reading its
    file whole yields for that part of the file. A range that fails is reported at its first
    position not read, even when it could not be opened: its file was open when it was planned.
    """
    source = part.source
    reader = _READERS.get(source.format)
    if reader is None:
        yield _reject(
            source.url,
            UNREADABLE_FILE,
            "the file name does not say its format; set input.format to one of "
            + ", ".join(sorted(_READERS)),
        )
        return
    progress = _Progress(opened=not part.whole, records=part.first_position - 1)
    try:
        yield from reader(part, cfg, progress)
    except Exception as exc:  # noqa: BLE001 - whatever breaks one file is that file's reject
        yield _reject(
            format_source(source.url, progress.failed_at),
            UNREADABLE_FILE,
            _describe(exc, cfg.storage_options),
        )


def _read_jsonl(
    part: FileRange, cfg: InputConfig, progress: _Progress
) -> Iterator[RawRecord | Reject]:
    url = part.source.url
    with _open(part.source, cfg) as f:
        progress.opened = True
        # Buffered, because zstandard's decompressing reader cannot iterate lines by itself; in
        # large reads, because each read of a compressed file releases the GIL in zlib and may
        # wait up to a switch interval to take it back from the request threads: at 8 KiB a
        # read that was a fifth of a run's wall time.
        for raw in io.BufferedReader(_OneReadAtATime(_window(f, part)), _READ_BUFFER_BYTES):
            progress.records += 1
            if raw.strip():
                yield _parse_json_line(raw, url, progress.records, cfg)


def _parse_json_line(raw: bytes, url: str, line: int, cfg: InputConfig) -> RawRecord | Reject:
    where = format_source(url, line)
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return _reject(
            where, INVALID_UTF8, f"line is not valid UTF-8: {exc.reason} at byte {exc.start}"
        )
    except json.JSONDecodeError as exc:
        return _reject(
            where, MALFORMED_RECORD, f"line is not valid JSON: {exc.msg} at column {exc.colno}"
        )
    except RecursionError:
        return _reject(where, MALFORMED_RECORD, "line is not valid JSON: nested too deeply")
    if not isinstance(value, dict):
        kind = _JSON_TYPE_NAMES[type(value)]
        return _reject(where, MALFORMED_RECORD, f"line is a JSON {kind}, not an object")
    return _record(url, line, value, cfg)


def _read_csv(
    part: FileRange, cfg: InputConfig, progress: _Progress
) -> Iterator[RawRecord | Reject]:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    url = part.source.url
    with _open(part.source, cfg) as f:
        # A range after the first reads the header from the file's start: every range needs it.
        header = _csv_header(f, part.start) if part.start else None
        rows = csv.reader(_csv_text(_window(f, part), at_start=not part.start))
        if header is None:
            header = next(rows, [])
        progress.opened = True
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as exc:
                # The reader has consumed the bad line and starts afresh on the next call.
                progress.records += 1
                yield _reject(
                    format_source(url, progress.records),
                    MALFORMED_RECORD,
                    f"row is not valid CSV: {exc}",
                )
                continue
            if row:  # a blank line is not a row, as in csv.DictReader
                progress.records += 1
                yield _parse_csv_row(header, row, url, progress.records, cfg)


def _csv_header(f: Any, end: int) -> list[str]:
    """The header row of an open CSV file, read from its start; it ends before ``end``."""
    return next(csv.reader(_csv_text(io.BufferedReader(_Window(f, 0, end)))), [])


def _csv_text(stream: Any, at_start: bool = True) -> io.TextIOWrapper:
    # surrogateescape keeps undecodable bytes as lone surrogates: a bad byte costs its row only.
    # Only a file's start may hold a byte-order mark; mid-file, U+FEFF is a character like any.
    return io.TextIOWrapper(
        stream,
        encoding=_UTF8_SKIPPING_BOM if at_start else "utf-8",
        errors="surrogateescape",
        newline="",
    )


def _parse_csv_row(
    header: list[str], row: list[str], url: str, position: int, cfg: InputConfig
) -> RawRecord | Reject:
    where = format_source(url, position)
    fields = dict(zip(header, row))
    record_id = _shown_id(fields.get(cfg.id_field))
    if len(row) > len(header):
        return _reject(
            where,
            MALFORMED_RECORD,
            f"row has {len(row)} fields but the header names {len(header)}",
            record_id,
        )
    # Only the fields the pipeline uses: a stray byte in an ignored column costs nothing.
    garbled = [name for name in _fields_read(cfg) if _has_undecodable(fields.get(name))]
    if garbled:
        return _reject(
            where, INVALID_UTF8, f"not valid UTF-8 in field(s) {', '.join(garbled)}", record_id
        )
    return _record(url, position, fields, cfg)


def _read_parquet(
    part: FileRange, cfg: InputConfig, progress: _Progress
) -> Iterator[RawRecord | Reject]:
    url = part.source.url
    with _open(part.source, cfg) as f:
        parquet = pq.ParquetFile(f)
        present = set(parquet.schema_arrow.names)
        # A column the file lacks reads as None, so the validate stage rejects (never drops) rows.
        columns = [name for name in dict.fromkeys(_fields_read(cfg)) if name in present]
        groups = None if part.end is None else range(part.start, part.end)
        progress.opened = True
        for batch in parquet.iter_batches(
            batch_size=_PARQUET_BATCH_ROWS, row_groups=groups, columns=columns
        ):
            first = progress.records + 1
            progress.records += batch.num_rows
            values = {name: batch.column(name).to_pylist() for name in columns}
            absent = [None] * batch.num_rows
            for position, doc_id, text, *metadata in zip(
                range(first, first + batch.num_rows),
                values.get(cfg.id_field, absent),
                values.get(cfg.text_field, absent),
                *(values.get(name, absent) for name in cfg.metadata_fields),
            ):
                yield RawRecord(
                    source_url=url,
                    position=position,
                    doc_id=doc_id,
                    text=text,
                    metadata=tuple(zip(cfg.metadata_fields, metadata)),
                )


def _read_text(
    part: FileRange, cfg: InputConfig, progress: _Progress
) -> Iterator[RawRecord | Reject]:
    # One document per file, identified by its path below the pattern's root. It has no
    # position, so ``progress`` stays unopened and a failure names the file alone. Text files
    # are never cut: ``part`` is always the whole file.
    source = part.source
    doc_id = _relative_path(source.url, source.root)
    with _open(source, cfg) as f:
        data = f.read()
    try:
        text = data.decode(_UTF8_SKIPPING_BOM)
    except UnicodeDecodeError as exc:
        yield _reject(
            source.url,
            INVALID_UTF8,
            f"file is not valid UTF-8: {exc.reason} at byte {exc.start}",
            _shown_id(doc_id),
        )
        return
    yield RawRecord(
        source_url=source.url,
        position=None,
        doc_id=doc_id,
        text=text,
        metadata=tuple((name, None) for name in cfg.metadata_fields),
    )


_READERS: dict[str, _Reader] = {
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "text": _read_text,
}


class _Window(io.RawIOBase):
    """Bytes ``[start, end)`` of a seekable binary file, as a stream that ends at ``end``.

    Closing it leaves the file open: the file belongs to whoever opened it.
    """

    def __init__(self, f: Any, start: int, end: int) -> None:
        super().__init__()
        f.seek(start)
        self._f = f
        self._left = end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._f.read(min(len(buffer), self._left)) if self._left > 0 else b""
        buffer[: len(data)] = data
        self._left -= len(data)
        return len(data)


class _OneReadAtATime(io.RawIOBase):
    """A stream whose reads return after one read of the stream below (``read1``).

    A large buffer over a decompressing file would otherwise ask it for the whole buffer at
    once, and a file that breaks off mid-way would take the records of that last buffer down
    with it; one read at a time, everything decoded before the break is kept.
    """

    def __init__(self, f: Any) -> None:
        super().__init__()
        self._read = getattr(f, "read1", f.read)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _window(f: Any, part: FileRange) -> Any:
    """The part of an open file that ``part`` covers: the file itself when it is whole."""
    if part.end is None:
        return f
    return io.BufferedReader(_Window(f, part.start, part.end), _READ_BUFFER_BYTES)


def _open(source: SourceFile, cfg: InputConfig, mode: str = "rb", **text_options: str) -> OpenFile:
    """Open a corpus file lazily, decompressing by its suffix when its format is streamed."""
    codec = _codec(source.url) if source.format in _STREAMED_FORMATS else None
    return fsspec.open(source.url, mode, compression=codec, **text_options, **cfg.storage_options)


def _codec(url: str) -> str | None:
    return _CODEC_BY_SUFFIX.get(posixpath.splitext(url.lower())[1])


def _fields_read(cfg: InputConfig) -> tuple[str, ...]:
    return (cfg.id_field, cfg.text_field, *cfg.metadata_fields)


def _record(url: str, position: int, fields: Mapping[str, Any], cfg: InputConfig) -> RawRecord:
    return RawRecord(
        source_url=url,
        position=position,
        doc_id=fields.get(cfg.id_field),
        text=fields.get(cfg.text_field),
        metadata=tuple((name, fields.get(name)) for name in cfg.metadata_fields),
    )


def _relative_path(url: str, root: str) -> str:
    """``url`` below ``root``, '/'-separated; both come from the same ``unstrip_protocol``."""
    return url.removeprefix(root if root.endswith("/") else root + "/")


def _has_undecodable(value: str | None) -> bool:
    """Whether a surrogateescape-decoded value held bytes that are not UTF-8."""
    if value is None:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _shown_id(value: str | None) -> str | None:
    """A record id fit for a reject row: non-empty and encodable, else None."""
    return value if value and not _has_undecodable(value) else None


def _reject(source: str, reason: str, detail: str, record_id: str | None = None) -> Reject:
    return Reject(
        id=record_id,
        doc_id=record_id,
        source=source,
        stage=STAGE_READ,
        reason=reason,
        detail=detail,
    )


def _describe(exc: BaseException, storage_options: Mapping[str, Any]) -> str:
    """``Type: message``, with every storage option value removed from the message.

    Storage options may hold credentials, and backends echo their arguments in error messages.
    """
    message = redact(str(exc), *_strings_in(storage_options))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings_in(item)


# --- Ranges ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Scan:
    """How far a planner got: ``opened`` once the file is open, ``end`` once it is all seen.

    ``end`` is the file's length in bytes, or its number of row groups for Parquet.
    """

    opened: bool = False
    end: int = 0


# Where a range starts (byte offset or row group index) and the position of its first record.
_Cut = tuple[int, int]
_Cutter = Callable[[SourceFile, InputConfig, int, _Scan], Iterator[_Cut]]


def plan_ranges(
    source: SourceFile, cfg: InputConfig, range_bytes: int = RANGE_BYTES
) -> list[FileRange] | list[Reject]:
    """The ranges, in file order, that tile one file; one whole-file range unless worth cutting.

    An uncompressed JSONL or CSV file larger than ``range_bytes`` is scanned once, front to back,
    and cut at the first line (row) boundary at or after every ``range_bytes``; a Parquet file
    that large is cut between row groups of about ``range_bytes`` together, from its footer.
    Anything else is one whole-file range, planned without I/O: small, compressed and text files,
    and files of unknown format, which the reader rejects. A file that cannot be opened is the
    same ``unreadable_file`` reject its reader would give; one that breaks off during the scan is
    one whole-file range, so that its reader reports exactly where it breaks.
    """
    cutter = _CUTTERS.get(source.format)
    if cutter is None or source.size <= range_bytes or _codec(source.url) is not None:
        return [FileRange(source)]
    scan = _Scan()
    try:
        cuts = list(cutter(source, cfg, range_bytes, scan))
    except Exception as exc:  # noqa: BLE001 - whatever breaks one file is that file's reject
        if scan.opened:
            return [FileRange(source)]
        return [_reject(source.url, UNREADABLE_FILE, _describe(exc, cfg.storage_options))]
    return _tile(source, cuts, scan.end)


def _tile(source: SourceFile, cuts: list[_Cut], end: int) -> list[FileRange]:
    starts = [(0, 1), *(cut for cut in cuts if cut[0] < end)]
    if len(starts) == 1:
        return [FileRange(source)]
    stops = [start for start, _ in starts[1:]] + [end]
    return [FileRange(source, start, stop, first) for (start, first), stop in zip(starts, stops)]


def _cut_jsonl(
    source: SourceFile, cfg: InputConfig, range_bytes: int, scan: _Scan
) -> Iterator[_Cut]:
    """Cut after the first newline at or past every ``range_bytes``.

    Lines are counted as the reader counts them: one for every ``b"\\n"``, blank ones included.
    """
    with _open(source, cfg) as f:
        scan.opened = True
        offset = lines = 0  # at the start of ``block``: the bytes and the newlines before it
        target = range_bytes  # no cut before this offset
        while block := f.read(_SCAN_BLOCK_BYTES):
            counted = 0  # the newlines of ``block[:counted]`` are in ``lines``
            while (newline := block.find(b"\n", max(target - offset, counted))) != -1:
                lines += block.count(b"\n", counted, newline + 1)
                counted = newline + 1
                target = offset + counted + range_bytes
                yield offset + counted, lines + 1
            lines += block.count(b"\n", counted)
            offset += len(block)
        scan.end = offset


def _cut_csv(
    source: SourceFile, cfg: InputConfig, range_bytes: int, scan: _Scan
) -> Iterator[_Cut]:
    """Cut after the first row that ends at or past every ``range_bytes``.

    Rows are counted as the reader counts them: the header and blank lines not, a row the csv
    module rejects too, and a cut never falls inside a quoted field. The scan reads Latin-1,
    where one character is one byte, so that the length of the lines read is the byte offset
    reached; it sees the reader's structure, as every character that shapes a row (comma,
    quote, CR, LF) is ASCII, and UTF-8 encodes nothing else with an ASCII byte.

    At a row boundary a line without a quote is one row, or blank: it ends where the line ends,
    whatever its commas. Only a line with a quote, which may open a field that goes on for
    lines, needs the csv module, which then reads exactly that row: it pulls lines only until
    the row is complete, and starts afresh on the next line after an error.
    """
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    with _open(source, cfg) as f:
        scan.opened = True
        # The reader drops a leading byte-order mark; left in, it could unquote a header field.
        bom = f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8
        f.seek(len(codecs.BOM_UTF8) if bom else 0)
        lines = _CountedLines(io.TextIOWrapper(f, encoding="latin-1", newline=""), f.tell())
        rest = iter(lines)
        next(csv.reader(rest), [])  # the header
        records = 0
        target = range_bytes
        for line in rest:
            if '"' in line:
                with contextlib.suppress(csv.Error):  # a row the reader rejects, and counts
                    next(csv.reader(itertools.chain((line,), rest)))
                records += 1
            elif line.strip("\r\n"):
                records += 1
            if lines.offset >= target:
                target = lines.offset + range_bytes
                yield lines.offset, records + 1
        scan.end = lines.offset


@dataclass(slots=True)
class _CountedLines:
    """The lines of a Latin-1 text, and the byte offset that the lines consumed so far reach."""

    text: Iterable[str]
    offset: int

    def __iter__(self) -> Iterator[str]:
        for line in self.text:
            self.offset += len(line)
            yield line


def _cut_parquet(
    source: SourceFile, cfg: InputConfig, range_bytes: int, scan: _Scan
) -> Iterator[_Cut]:
    """Cut before the first row group at or past every ``range_bytes`` of compressed data."""
    with _open(source, cfg) as f:
        scan.opened = True
        metadata = pq.ParquetFile(f).metadata
    rows = size = 0
    for index in range(metadata.num_row_groups):
        if size >= range_bytes:
            yield index, rows + 1
            size = 0
        group = metadata.row_group(index)
        size += sum(group.column(i).total_compressed_size for i in range(group.num_columns))
        rows += group.num_rows
    scan.end = metadata.num_row_groups


_CUTTERS: dict[str, _Cutter] = {
    "jsonl": _cut_jsonl,
    "csv": _cut_csv,
    "parquet": _cut_parquet,
}


# --- Beam --------------------------------------------------------------------------------------


class MatchFilesFn(beam.DoFn):
    """Expand one ``input.path`` pattern into its files; a pattern that names none is a reject.

    Listing runs in the pipeline, on a worker, so that a launcher without access to the bucket
    can still submit the job, and a large listing is not shipped inside the graph.
    """

    def __init__(self, cfg: InputConfig) -> None:
        super().__init__()
        self._cfg = cfg

    def process(
        self, pattern: str
    ) -> Iterator[SourceFile | TaggedOutput[Literal["rejects"], Reject]]:
        try:
            files = expand_pattern(pattern, self._cfg.storage_options, self._cfg.format)
        except InputError as exc:
            yield TaggedOutput(REJECTS, _reject(pattern, UNREADABLE_FILE, str(exc)))
            return
        if not files:
            yield TaggedOutput(
                REJECTS,
                _reject(
                    pattern,
                    NO_FILES_MATCHED,
                    "no file matches this pattern; check input.path and input.storage_options",
                ),
            )
        yield from files


class PlanRangesFn(beam.DoFn):
    """Cut one file into the ranges that workers read; a file it cannot open is a reject."""

    _files_read = Metrics.counter("embedpipe", "files_read")
    _file_ranges = Metrics.counter("embedpipe", "file_ranges")

    def __init__(self, cfg: InputConfig, range_bytes: int) -> None:
        super().__init__()
        self._cfg = cfg
        self._range_bytes = range_bytes

    def process(
        self, source: SourceFile
    ) -> Iterator[FileRange | TaggedOutput[Literal["rejects"], Reject]]:
        self._files_read.inc()
        for item in plan_ranges(source, self._cfg, self._range_bytes):
            if isinstance(item, Reject):
                yield TaggedOutput(REJECTS, item)
            else:
                self._file_ranges.inc()
                yield item


class ReadRecordsFn(beam.DoFn):
    """Stream one range of a file into raw records; its rejects go to the ``rejects`` output."""

    _records_read = Metrics.counter("embedpipe", "records_read")

    def __init__(self, cfg: InputConfig) -> None:
        super().__init__()
        self._cfg = cfg

    def process(
        self, part: FileRange
    ) -> Iterator[RawRecord | TaggedOutput[Literal["rejects"], Reject]]:
        for item in read_range(part, self._cfg):
            if isinstance(item, Reject):
                yield TaggedOutput(REJECTS, item)
            else:
                self._records_read.inc()
                yield item


class ReadCorpus(beam.PTransform):
    """Read every file that ``input.path`` names into raw records, and the read rejects.

    Returns ``{"records": PCollection[RawRecord], "rejects": PCollection[Reject]}``. Files are
    reshuffled after matching, so that many files are planned by many workers, and ranges after
    planning, so that many ranges (of many files, or of one huge file) are read by many workers.
    ``range_bytes`` is the size above which a file is cut, and about the size of each range.
    """

    def __init__(self, cfg: InputConfig, range_bytes: int = RANGE_BYTES) -> None:
        super().__init__()
        if range_bytes <= 0:
            raise ValueError(f"range_bytes must be positive, not {range_bytes}")
        self._cfg = cfg
        self._range_bytes = range_bytes

    def expand(self, pbegin: PBegin) -> dict[str, PCollection]:
        matched = (
            pbegin
            | "ListPatterns" >> beam.Create(self._cfg.paths)
            | "MatchFiles"
            >> beam.ParDo(MatchFilesFn(self._cfg)).with_outputs(REJECTS, main="files")
        )
        planned = (
            matched.files
            # One file matched by two patterns is read once (its two versions would otherwise
            # be duplicate ids of each other, with one source); the shuffle also spreads files.
            | "KeyByUrl" >> beam.Map(lambda source: (source.url, source))
            | "SpreadFiles" >> beam.GroupByKey()
            | "OncePerFile" >> beam.MapTuple(lambda _, same: min(same, key=lambda s: s.root))
            | "PlanRanges"
            >> beam.ParDo(PlanRangesFn(self._cfg, self._range_bytes)).with_outputs(
                REJECTS, main="ranges"
            )
        )
        read = (
            planned.ranges
            | "SpreadRanges" >> beam.Reshuffle()
            | "ReadRecords"
            >> beam.ParDo(ReadRecordsFn(self._cfg)).with_outputs(REJECTS, main="records")
        )
        rejects = (matched[REJECTS], planned[REJECTS], read[REJECTS]) | "MergeRejects" >> (
            beam.Flatten()
        )
        return {"records": read.records, "rejects": rejects}
