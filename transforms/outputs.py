"""Emitting from ``finish_bundle``: what a DoFn yields there must carry its window itself.

Every stage that buffers (validate's id filter, the splitter's batched counts, the embed stage's
window of requests) flushes in ``finish_bundle``, where Beam has no current element to take a
window from. Everything embedpipe emits is in the global window (it is a batch job).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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
