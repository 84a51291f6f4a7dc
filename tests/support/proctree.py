"""The memory and CPU of a process tree, from ``/proc``: what ``make bench-scale`` measures.

A Beam run is a launcher and its worker processes, so its cost is that of the whole tree:
:class:`TreeSampler` samples the summed RSS of a process and all its descendants (which
over-counts pages shared between them: small when workers are fresh interpreters) and keeps the
peak; :func:`cpu_seconds` reads one live process's CPU time. Linux only.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SAMPLE_INTERVAL_S", "TreeSampler", "cpu_seconds", "process_tree"]

SAMPLE_INTERVAL_S = 0.1
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0  # gone between listing and reading


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one live process so far, from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _children_by_ppid() -> dict[int, list[int]]:
    """Every process's children, from the ppid field of ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (in parentheses) may hold spaces: fields resume after the last ")".
        fields = stat[stat.rfind(b")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _children_files(pid: int) -> list[int] | None:
    """Children from ``/proc/PID/task/*/children`` (CONFIG_PROC_CHILDREN); None if unavailable."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            return None
        except OSError:
            continue
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants alive now."""
    use_files = _children_files(root) is not None
    by_ppid = {} if use_files else _children_by_ppid()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend((_children_files(pid) or []) if use_files else by_ppid.get(pid, []))
    return tree


class TreeSampler:
    """Samples the summed RSS of a process tree every ``interval`` seconds, keeps the peak."""

    def __init__(self, root: int, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.root = root
        self.interval = interval
        self.peak_rss = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            tree = process_tree(self.root)
            self.peak_rss = max(self.peak_rss, sum(_rss_bytes(pid) for pid in tree))
            self.peak_processes = max(self.peak_processes, len(tree))
            if self._stop.wait(self.interval):
                return
