"""The faults of the local Batch API (:class:`pipeline.local_batch.BatchServer`), composable.

A batch client has more ways to go wrong than an online one: a whole batch can fail validation
or hit the token quota, expire with part of its work done, or lose its create answer (so the
client must find the batch by its metadata); single lines can be answered 500 or 400, and the
output comes back in any order. Each fault here is armed by a method, fires a set number of
times (or for the lines a predicate picks), and is counted in :attr:`BatchFaults.fired`, so a
test can assert that the fault it armed really happened.

Batch-level faults are decided when a batch is *created* (:meth:`BatchFaults.take_fate`): the
next N batches get them, whatever order they are later polled in.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BatchFate", "BatchFaults", "LinePredicate", "scripted_validation_error"]

#: ``predicate(custom_id, texts)``: whether a line is one a fault is meant for.
LinePredicate = Callable[[str, tuple[str, ...]], bool]


def scripted_validation_error() -> dict[str, Any]:
    """The default ``errors.data`` entry of a batch failed by :meth:`BatchFaults.fail_validation`."""
    return {
        "code": "invalid_request",
        "message": "scripted validation failure (BatchServer.fail_validation)",
        "param": None,
        "line": None,
    }


@dataclass(frozen=True, slots=True)
class BatchFate:
    """What the faults hold for one batch, fixed when it is created.

    ``validation_errors`` fails it at validation with these ``errors.data`` entries;
    ``token_limit`` fails it with ``token_limit_exceeded``; ``expire_fraction`` expires it once
    that fraction of its lines (rounded down) is done.
    """

    validation_errors: tuple[dict[str, Any], ...] | None = None
    token_limit: bool = False
    expire_fraction: float | None = None


class BatchFaults:
    """The armed faults of one batch server; thread-safe.

    >>> faults = BatchFaults()
    >>> faults.expire_next()
    >>> faults.take_fate().expire_fraction, faults.take_fate().expire_fraction
    (0.5, None)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._validation: list[tuple[dict[str, Any], ...]] = []
        self._token_limit = 0
        self._expire: list[float] = []
        self._lost_creates = 0
        self._fail_500_left = 0
        self._fail_500_predicates: list[LinePredicate] = []
        self._failed_500: set[tuple[str, ...]] = set()
        self.shuffle = False
        self._fired: Counter[str] = Counter()

    # -- arming ----------------------------------------------------------------------------

    def fail_validation(
        self, n: int = 1, errors: Sequence[dict[str, Any]] | None = None
    ) -> None:
        """Fail the next ``n`` batches created at validation, with ``errors`` as ``errors.data``."""
        entries = tuple(errors) if errors is not None else (scripted_validation_error(),)
        with self._lock:
            self._validation.extend([entries] * n)

    def fail_token_limit(self, n: int = 1) -> None:
        """Fail the next ``n`` batches created with ``token_limit_exceeded`` (the quota fault)."""
        with self._lock:
            self._token_limit += n

    def expire_next(self, n: int = 1, fraction: float = 0.5) -> None:
        """Expire the next ``n`` batches created once ``fraction`` of their lines are done."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {fraction}")
        with self._lock:
            self._expire.extend([fraction] * n)

    def lose_create_reply(self, n: int = 1) -> None:
        """Create the next ``n`` batches but drop the connection instead of answering.

        What a client sees when it dies, or the network does, between creating a batch and
        recording its id: it must find the batch again by its metadata.
        """
        with self._lock:
            self._lost_creates += n

    def fail_lines_500(self, n: int = 0, *, predicate: LinePredicate | None = None) -> None:
        """Answer the first attempt of some lines 500: the next ``n`` lines run, and every line
        ``predicate(custom_id, texts)`` picks.

        A line is known by its inputs, not its ``custom_id``, so a client that resubmits it
        under a new id gets it answered the second time.
        """
        with self._lock:
            self._fail_500_left += n
            if predicate is not None:
                self._fail_500_predicates.append(predicate)

    # -- firing ----------------------------------------------------------------------------

    @property
    def fired(self) -> dict[str, int]:
        """How often each fault fired: ``validation``, ``token_limit``, ``expire``,
        ``lost_create``, ``line_500``, ``poison`` (counted by the server) and ``shuffle``."""
        with self._lock:
            return dict(self._fired)

    def count(self, name: str, times: int = 1) -> None:
        """Count a fault the server applied itself (poison, shuffle)."""
        with self._lock:
            self._fired[name] += times

    def take_fate(self) -> BatchFate:
        """The fate of the batch being created; takes one use of each batch-level fault (an
        expiry only from a batch that will run)."""
        with self._lock:
            validation = self._validation.pop(0) if self._validation else None
            token_limit = validation is None and self._token_limit > 0
            if token_limit:
                self._token_limit -= 1
            # A batch that fails validation never runs: the expiry is kept for the next one.
            runs = validation is None and not token_limit
            expire = self._expire.pop(0) if self._expire and runs else None
            return BatchFate(validation, token_limit, expire)

    def note_fate(self, fate: BatchFate) -> None:
        """Count the batch-level fault that took effect (called when the batch reaches it)."""
        if fate.validation_errors is not None:
            self.count("validation")
        elif fate.token_limit:
            self.count("token_limit")

    def take_lost_create(self) -> bool:
        """Whether this create's answer is to be dropped (counted when it is)."""
        with self._lock:
            if self._lost_creates <= 0:
                return False
            self._lost_creates -= 1
            self._fired["lost_create"] += 1
            return True

    def take_line_500(self, custom_id: str, texts: tuple[str, ...]) -> bool:
        """Whether this line is answered 500; each distinct line at most once."""
        with self._lock:
            if texts in self._failed_500:
                return False
            picked = any(predicate(custom_id, texts) for predicate in self._fail_500_predicates)
            if not picked and self._fail_500_left > 0:
                self._fail_500_left -= 1
                picked = True
            if picked:
                self._failed_500.add(texts)
                self._fired["line_500"] += 1
            return picked
