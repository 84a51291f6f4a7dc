"""How a worker process manages its memory: the garbage collector and the C heap.

A worker makes and drops millions of small records (a raw record, a document, a chunk and
their fields per line of the corpus) and megabyte-sized answers; the defaults of CPython's
collector and of glibc's allocator are tuned for neither. Both functions are per process and
idempotent; the embed stage calls them (its DoFn is in the fused stage of every worker).
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from typing import Any

#: Allocations between two young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 20_000

_holders = 0
_saved_threshold: tuple[int, int, int] | None = None
_tuned_lock = threading.Lock()


def tune_garbage_collector() -> None:
    """Freeze what exists now and collect the young generation less often, for this process.

    What a worker holds when its stages are set up (Beam, its modules, the graph, the
    tokenizer: about a million objects) lives as long as the process; without ``gc.freeze``
    every full collection walks all of it again, ~70 ms each, about once per 20k chunks (0.6 s
    of a 200k-chunk re-run, 1 s of a first run, with every thread stopped). Records die young,
    so a larger young threshold costs no memory to speak of and saves most young collections.
    Cycles are still collected: the older generations keep their default thresholds.

    Counted: every call is paired with :func:`restore_garbage_collector` (a DoFn's setup and
    teardown), and the last one restores the collector, so a process that runs several
    pipelines (tests, a notebook) gets its defaults back between them and leaks nothing.
    """
    global _holders, _saved_threshold
    with _tuned_lock:
        _holders += 1
        if _holders > 1:
            return
        _saved_threshold = gc.get_threshold()
        gc.collect()
        gc.freeze()
        _, middle, old = _saved_threshold
        gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def restore_garbage_collector() -> None:
    """Undo :func:`tune_garbage_collector` when its last caller is done."""
    global _holders
    with _tuned_lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders == 0 and _saved_threshold is not None:
            gc.unfreeze()
            gc.set_threshold(*_saved_threshold)


#: Seconds between two hand-backs of freed heap memory to the system (see below).
TRIM_INTERVAL_S = 2.0
_last_trim = 0.0


def release_freed_memory() -> None:
    """Give freed heap pages back to the system, at most every ``TRIM_INTERVAL_S``.

    Each answer is megabytes (body, decoded vectors) allocated on one of the request threads;
    glibc keeps freed blocks in per-thread arenas, and its adaptive mmap threshold soon serves
    such sizes from those arenas, so a process's RSS crept up by ~140 MB over a million chunks
    while the live Python heap stayed flat (tracemalloc). ``malloc_trim`` returns the free pages;
    elsewhere (no glibc) this does nothing.
    """
    global _last_trim
    now = time.monotonic()
    if now - _last_trim < TRIM_INTERVAL_S or _MALLOC_TRIM is None:
        return
    _last_trim = now
    _MALLOC_TRIM(0)


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()
