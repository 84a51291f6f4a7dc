"""Per-process memory management of a worker: the collector tuning is paired and undone."""

from __future__ import annotations

import gc

from transforms.process_memory import (
    GC_YOUNG_THRESHOLD,
    release_freed_memory,
    restore_garbage_collector,
    tune_garbage_collector,
)


def test_the_collector_is_tuned_while_a_stage_holds_it_and_restored_after() -> None:
    before = gc.get_threshold()
    tune_garbage_collector()
    tune_garbage_collector()  # a second DoFn instance in the same process
    try:
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
        assert gc.get_threshold()[1:] == before[1:]  # cycles are still collected
        assert gc.get_freeze_count() > 0
        restore_garbage_collector()
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD  # the other one still holds it
    finally:
        restore_garbage_collector()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    restore_garbage_collector()  # an unpaired call changes nothing
    assert gc.get_threshold() == before


def test_release_freed_memory_is_safe_to_call_often() -> None:
    for _ in range(3):
        release_freed_memory()
