"""Emitting from ``finish_bundle``: what a DoFn yields there must carry its window itself.

Every stage that buffers (validate's id filter, the splitter's batched counts, the embed stage's
window of requests) flushes in ``finish_bundle``, where Beam has no current element to take a
window from. Everything embedpipe emits is in the global window (it is a batch job).
"""

from __future__ import annotations

import pickle
import typing
from collections.abc import Iterable, Iterator

from apache_beam import coders
from apache_beam.coders import coder_impl
from apache_beam.coders.coders import FastCoder
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindows


def in_global_window(outputs: Iterable[object]) -> Iterator[object]:
    """``outputs`` (main or tagged) as windowed values in the global window."""
    window = GlobalWindows.windowed_value
    for output in outputs:
        if isinstance(output, TaggedOutput):
            yield TaggedOutput(output.tag, window(output.value))
        else:
            yield window(output)


def _estimated_size(value: object) -> int:
    """A size for Beam's element-size counters, without encoding the element."""
    vectors = getattr(value, "vectors", None)
    if vectors is not None:  # an EmbeddedBatch: its vectors are nearly all of it
        return int(vectors.nbytes) + 256 * len(getattr(value, "chunks", ()))
    ids = getattr(value, "ids", None)
    return 64 * len(ids) if ids is not None else 256


class RecordCoder(FastCoder):
    """Pickle, as Beam's default; but a size estimate that does not pickle.

    Beam samples the size of elements on every output for its counters, and for a record it
    does that by encoding it: each sample of a request's vectors pickled megabytes (and a batch
    of document ids, hundreds of records), 5-7% of a re-run's time. Registered for the records
    that cross stages (``register_record_coders``), used where a transform declares them.
    """

    def _create_impl(self) -> coder_impl.CoderImpl:
        return coder_impl.CallbackCoderImpl(
            lambda value: pickle.dumps(value, pickle.HIGHEST_PROTOCOL), pickle.loads,
            _estimated_size)

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self) -> object:
        return typing.Any

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


def register_record_coders() -> None:
    """Use :class:`RecordCoder` for the records that travel in bulk between stages."""
    from transforms.types import DocumentIds, EmbeddedBatch, Reject, UsageRecord

    for record in (EmbeddedBatch, DocumentIds, Reject, UsageRecord):
        coders.registry.register_coder(record, RecordCoder)


register_record_coders()
