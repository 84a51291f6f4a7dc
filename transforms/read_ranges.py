"""Range planning for the read stage: where a large file is cut, so that several workers read it.

See :mod:`transforms.read` for why files are read in ranges and why not with a splittable DoFn.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from transforms import read_formats
from transforms.read_formats import (
    RANGE_BYTES,
    _codec,
    _describe,
    _file_reject,
    _open,
)
from transforms.sections import InputConfig
from transforms.types import (
    UNREADABLE_FILE,
    FileRange,
    Reject,
    SourceFile,
)

# --- Ranges ------------------------------------------------------------------------------------


# The planner's reads: large, so that counting newlines costs little more than the I/O.
_SCAN_BLOCK_BYTES = 8 * 1024 * 1024


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
        return [_file_reject(source.url, UNREADABLE_FILE, _describe(exc, cfg.storage_options))]
    return _tile(source, cuts, scan.end)


def _tile(source: SourceFile, cuts: list[_Cut], end: int) -> list[FileRange]:
    starts = [(0, 1), *(cut for cut in cuts if cut[0] < end)]
    if len(starts) == 1:
        return [FileRange(source)]
    stops = [start for start, _ in starts[1:]] + [end]
    return [FileRange(source, start, stop, first) for (start, first), stop in zip(starts, stops, strict=True)]


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
    csv.field_size_limit(read_formats._CSV_FIELD_LIMIT)
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
