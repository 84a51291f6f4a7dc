"""A set of 64-bit keys with payload columns, in sorted numpy runs: an index that stays small.

The cache index (one entry per cached vector) and the duplicate-id filter (one per document)
must answer membership for millions of keys at a few bytes each and in vectorised batches; a
Python dict costs ~100 bytes an entry and a call per key. Runs are appended sorted and merged
when two neighbours are of a size (the log-structured layout), so appends stay cheap and a
lookup touches O(log n) runs, up to :data:`FROZEN_RUN` entries a run.
"""

from __future__ import annotations

import numpy as np

#: A run this long is never merged again: merging copies both runs (and sorts them), and at a
#: million entries that transient copy was most of the index's memory. Lookups then touch one
#: run per half-million entries plus O(log n) small ones.
FROZEN_RUN = 1 << 19


class SortedRuns:
    """``uint64`` keys with parallel payload columns; ``find`` is one ``searchsorted`` a run.

    Not thread-safe: callers hold their own lock.
    """

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, ...]] = []

    def __len__(self) -> int:
        return sum(len(run[0]) for run in self._runs)

    def add(self, keys: np.ndarray, *payload: np.ndarray) -> None:
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        self._runs.append(tuple(column[order] for column in (keys, *payload)))
        while (len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0])
               and len(self._runs[-2][0]) < FROZEN_RUN):
            newer, older = self._runs.pop(), self._runs.pop()
            merged = [np.concatenate((o, n)) for o, n in zip(older, newer, strict=True)]
            order = np.argsort(merged[0], kind="stable")
            self._runs.append(tuple(column[order] for column in merged))

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(found, *payload)`` for each key: the payload of its oldest entry where found."""
        found = np.zeros(len(keys), dtype=bool)
        if not self._runs:
            return (found,)
        payload = [np.zeros(len(keys), dtype=column.dtype) for column in self._runs[0][1:]]
        for run_keys, *run_payload in self._runs:
            position = np.minimum(np.searchsorted(run_keys, keys), len(run_keys) - 1)
            hit = ~found & (run_keys[position] == keys)
            found |= hit
            for out, column in zip(payload, run_payload, strict=True):
                out[hit] = column[position[hit]]
        return (found, *payload)
