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

from collections.abc import Iterator
from typing import Literal

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PBegin, PCollection, TaggedOutput

from transforms import tags
from transforms.errors import InputError
from transforms.read_formats import (
    RANGE_BYTES,
    UNKNOWN_FORMAT,
    _file_reject,
    _reject,
    read_range,
    read_records,
)
from transforms.read_listing import expand_pattern
from transforms.read_ranges import _CUTTERS, plan_ranges

__all__ = [
    "RANGE_BYTES", "UNKNOWN_FORMAT", "_CUTTERS", "MatchFilesFn", "PlanRangesFn", "ReadCorpus",
    "ReadRecordsFn", "expand_pattern", "plan_ranges", "read_range", "read_records",
]
from transforms.sections import InputConfig
from transforms.types import (
    NO_FILES_MATCHED,
    UNREADABLE_FILE,
    FileRange,
    RawRecord,
    Reject,
    SourceFile,
)

"""Tag of the reject outputs of this stage's DoFns."""


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
            yield TaggedOutput(tags.REJECTS, _file_reject(pattern, UNREADABLE_FILE, str(exc)))
            return
        if not files:
            yield TaggedOutput(
                tags.REJECTS,
                _reject(
                    pattern,
                    NO_FILES_MATCHED,
                    "no file matches this pattern; check input.path and input.storage_options",
                ),
            )
        for item in files:
            yield TaggedOutput(tags.REJECTS, item) if isinstance(item, Reject) else item


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
                yield TaggedOutput(tags.REJECTS, item)
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
                yield TaggedOutput(tags.REJECTS, item)
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
            >> beam.ParDo(MatchFilesFn(self._cfg)).with_outputs(tags.REJECTS, main=tags.FILES)
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
                tags.REJECTS, main=tags.RANGES
            )
        )
        read = (
            planned.ranges
            | "SpreadRanges" >> beam.Reshuffle()
            | "ReadRecords"
            >> beam.ParDo(ReadRecordsFn(self._cfg)).with_outputs(tags.REJECTS, main=tags.RECORDS)
        )
        side = (matched[tags.REJECTS], planned[tags.REJECTS], read[tags.REJECTS])
        rejects = side | "MergeRejects" >> beam.Flatten()
        return {tags.RECORDS: read.records, tags.REJECTS: rejects}
