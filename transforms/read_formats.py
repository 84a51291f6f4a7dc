"""How each input format becomes records: opening, JSONL, CSV, Parquet and text readers.

Split from :mod:`transforms.read` (the stage and its DoFns) so that each module reads in one sitting;
the reasons for the reading rules are in that module's docstring. Listing is in
:mod:`transforms.read_listing`.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import fsspec
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import OpenFile

from transforms.errors import option_strings, redact
from transforms.sections import InputConfig
from transforms.types import (
    INVALID_UTF8,
    MALFORMED_RECORD,
    MISSING_FIELD,
    STAGE_READ,
    UNREADABLE_FILE,
    FileRange,
    RawRecord,
    Reject,
    SourceFile,
    format_source,
)

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

# A range reader's buffer: a range is read front to back, in requests this large or larger.
_READ_BUFFER_BYTES = 1024 * 1024

# The csv module refuses fields over 128 KiB by default. Document size is the validate stage's
# rule (validate.max_document_bytes, reason too_large), so that CSV behaves like every other format.
_CSV_FIELD_LIMIT = 2**31 - 1

# UTF-8 that skips a leading byte-order mark, as Excel and Notepad write: left in, it would
# rename the first CSV column. JSONL lines keep plain UTF-8, decoded per line, where this codec
# costs ten times more: the JSONL reader drops a mark from the file's first line itself.
_UTF8_SKIPPING_BOM = "utf-8-sig"

_JSON_TYPE_NAMES = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


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
        yield _file_reject(
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
        yield _file_reject(
            source.url, UNREADABLE_FILE, _describe(exc, cfg.storage_options), progress.failed_at
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
        lines = io.BufferedReader(_OneReadAtATime(_window(f, part)), _READ_BUFFER_BYTES)
        first = b"" if part.start else lines.readline()
        for raw in itertools.chain((first.removeprefix(codecs.BOM_UTF8),) if first else (), lines):
            progress.records += 1
            if raw.strip():
                yield _parse_json_line(raw, url, progress.records, cfg)


def _parse_json_line(raw: bytes, url: str, line: int, cfg: InputConfig) -> RawRecord | Reject:
    try:
        # orjson first: a third of the time of json for a clean line, on the one loop that
        # runs once per record of the corpus. Anything it refuses (bad UTF-8, lone surrogates,
        # NaN, bad JSON) or may read differently goes through json, whose answer and error
        # messages are the reference: records and reject reasons do not depend on the parser.
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _parse_json_line_slowly(raw, url, line, cfg)
    if not isinstance(value, dict) or any(
            isinstance(_field(value, name), _MAYBE_NOT_AS_JSON_READS) for name in _fields_read(cfg)):
        return _parse_json_line_slowly(raw, url, line, cfg)
    return _record(url, line, value, cfg)


#: What orjson may read otherwise than json: an integer past 64 bits becomes a float (and can
#: hide in a list or an object). A line whose read fields hold one is parsed again by json.
_MAYBE_NOT_AS_JSON_READS = (float, list, dict)


def _parse_json_line_slowly(raw: bytes, url: str, line: int, cfg: InputConfig) -> RawRecord | Reject:
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
        missing = [name for name in (cfg.id_field, cfg.text_field) if name not in header]
        if header and missing:  # one reject for the file, from its first range
            if not part.start:
                yield _file_reject(url, MISSING_FIELD, _missing_detail(missing, "column", header, cfg))
            return
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
    fields = dict(zip(header, row, strict=False))
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
        schema = parquet.schema_arrow
        paths = {name: _arrow_path(schema, name) for name in dict.fromkeys(_fields_read(cfg))}
        problem = _parquet_problem(schema, paths, cfg)
        if problem is not None:  # one reject for the file, from its first range
            if not part.start:
                yield _file_reject(url, MISSING_FIELD, problem)
            return
        # A metadata column the file lacks reads as None: metadata is optional.
        columns = list(dict.fromkeys(path[0] for path in paths.values() if path))
        groups = None if part.end is None else range(part.start, part.end)
        progress.opened = True
        for batch in parquet.iter_batches(
            batch_size=_PARQUET_BATCH_ROWS, row_groups=groups, columns=columns
        ):
            first = progress.records + 1
            progress.records += batch.num_rows
            values = {name: _column(batch, path).to_pylist()
                      for name, path in paths.items() if path}
            absent = [None] * batch.num_rows
            images = values.get(cfg.image_field, absent) if cfg.image_field else absent
            for position, doc_id, text, image, *metadata in zip(
                range(first, first + batch.num_rows),
                values.get(cfg.id_field, absent),
                values.get(cfg.text_field, absent),
                images,
                *(values.get(name, absent) for name in cfg.metadata_fields),
                strict=True,
            ):
                yield RawRecord(
                    source_url=url,
                    position=position,
                    doc_id=doc_id,
                    text=text,
                    metadata=tuple(zip(cfg.metadata_fields, metadata, strict=True)),
                    image=image,
                )


def _arrow_path(schema: pa.Schema, name: str) -> list[str] | None:
    """The column, then the struct fields, that ``name`` names; None when the file has none.

    A column named ``name`` itself comes first; only then is a dotted name a path into structs.
    """
    if name in schema.names:
        return [name]
    top, *rest = name.split(".")
    if not rest or schema.get_field_index(top) < 0:
        return None
    kind = schema.field(top).type
    for part in rest:
        if not pa.types.is_struct(kind) or kind.get_field_index(part) < 0:
            return None
        kind = kind.field(part).type
    return [top, *rest]


def _arrow_type(schema: pa.Schema, path: list[str]) -> pa.DataType:
    kind = schema.field(path[0]).type
    for part in path[1:]:
        kind = kind.field(part).type
    return kind


def _parquet_problem(
    schema: pa.Schema, paths: Mapping[str, list[str] | None], cfg: InputConfig
) -> str | None:
    """Why no row of this file can be a document (a missing id or text, a text not text)."""
    missing = [name for name in (cfg.id_field, cfg.text_field) if paths[name] is None]
    if missing:
        return _missing_detail(missing, "column", schema.names, cfg)
    text = _arrow_type(schema, paths[cfg.text_field] or [])
    if isinstance(text, pa.DictionaryType):
        text = text.value_type
    if not (pa.types.is_string(text) or pa.types.is_large_string(text)
            or pa.types.is_string_view(text) or pa.types.is_null(text)):
        return (f"column {cfg.text_field!r} (input.text_field) is {text}, not a string: "
                "the file has no text to embed; set input.text_field to its text column")
    return None


def _column(batch: pa.RecordBatch, path: list[str]) -> pa.Array:
    column = batch.column(path[0])
    for part in path[1:]:
        column = pc.struct_field(column, part)
    return column


def _missing_detail(missing: list[str], kind: str, names: Iterable[str], cfg: InputConfig) -> str:
    """``no column 'text' (input.text_field) in the file; its columns are: id, body``."""
    wanted = ", ".join(
        f"{name!r} (input.{'id_field' if name == cfg.id_field else 'text_field'})"
        for name in missing)
    shown = list(names)
    listed = ", ".join(shown[:50]) + (f", ... ({len(shown)} in all)" if len(shown) > 50 else "")
    return f"no {kind} {wanted} in the file; its {kind}s are: {listed or 'none'}"


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
    image = (cfg.image_field,) if cfg.image_field else ()
    return (cfg.id_field, cfg.text_field, *image, *cfg.metadata_fields)


def _record(url: str, position: int, fields: Mapping[str, Any], cfg: InputConfig) -> RawRecord:
    return RawRecord(
        source_url=url,
        position=position,
        doc_id=_field(fields, cfg.id_field),
        text=_field(fields, cfg.text_field),
        metadata=tuple((name, _field(fields, name)) for name in cfg.metadata_fields),
        image=_field(fields, cfg.image_field) if cfg.image_field else None,
    )


_ABSENT: Final = object()


def _field(fields: Mapping[str, Any], name: str) -> Any:
    """The value ``name`` names: a key of that name, else a dotted path into nested objects."""
    value = fields.get(name, _ABSENT)
    if value is not _ABSENT:
        return value
    if "." not in name:
        return None
    value = fields
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


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


def _file_reject(url: str, reason: str, detail: str, position: int | None = None) -> Reject:
    """A reject of a whole file (or of its rest, from ``position``): the URL is its id.

    Such a reject has no record id, and readers that select rejects by id must still find it.
    """
    return _reject(format_source(url, position), reason, detail, url)


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
    message = redact(str(exc), *option_strings(storage_options))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


