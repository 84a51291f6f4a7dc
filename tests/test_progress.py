"""Progress lines: counts, throttles and the rate against this worker's limit."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from transforms.limits import RATE_HEADERS, RETRY_AFTER, Pauses
from transforms.progress import ProgressReporter
from transforms.types import UsageRecord


def usage(status: int, outcome: str, tokens: int) -> UsageRecord:
    return UsageRecord("r", None, "m", 4, tokens, tokens, False, 1, status, outcome, None, 5.0,
                       dt.datetime.now(dt.timezone.utc), "w")


def test_line_counts_chunks_requests_throttles_and_tokens() -> None:
    progress = ProgressReporter("host:1", tokens_per_minute=60_000, interval_s=60)
    progress.started()
    progress.started()
    progress.finished(8, 0, [usage(429, "retry", 0), usage(200, "ok", 1500)])
    line = progress.line(whole_run=True)
    progress.close()
    assert "8 chunks embedded, 0 failed" in line
    assert "2 requests, 1 throttled" in line
    assert "1.5k in all" in line
    assert "1 batches in flight" in line
    assert "of this worker's 60.0k limit" in line


def test_close_logs_a_final_line(caplog: pytest.LogCaptureFixture) -> None:
    progress = ProgressReporter("host:2", tokens_per_minute=1000, interval_s=60)
    progress.started()
    progress.finished(3, 1, [usage(200, "ok", 10)])
    with caplog.at_level(logging.INFO, logger="embedpipe.progress"):
        progress.close()
    assert any("3 chunks embedded, 1 failed" in r.getMessage() for r in caplog.records)


def test_eta_from_this_workers_share_and_pace() -> None:
    progress = ProgressReporter("host:3", tokens_per_minute=60_000, interval_s=60)
    progress.started()
    assert "ETA" not in progress.line()  # nothing known yet
    progress.expect(10_000)
    progress._started_at -= 10.0  # ten seconds in, a quarter of the share done
    progress.finished(4, 0, [usage(200, "ok", 2500)], est_tokens=2500)
    line = progress.line(whole_run=True)
    progress.close()
    assert line.endswith(("ETA 0m30s", "ETA 0m29s"))


def test_line_counts_throttling_whatever_its_source_and_the_requests_awaiting() -> None:
    """A pause asked by rate headers is throttling too; requests sent and unanswered show with
    the age of the oldest (a server that never answers showed "0 requests" for ten minutes)."""
    progress = ProgressReporter("host:4", tokens_per_minute=60_000, interval_s=60,
                                awaiting=lambda: (3, 42.7))
    progress.started()
    pauses = Pauses()
    pauses.add(RATE_HEADERS, 2.0)
    pauses.add(RETRY_AFTER, 1.5)
    progress.finished(8, 0, [usage(429, "retry", 0), usage(200, "ok", 1500)], pauses=pauses)
    line = progress.line(whole_run=True)
    progress.close()
    assert "2 requests, 2 throttled (4s paused)" in line, line
    assert "0 batches in flight; 3 requests awaiting an answer, the oldest for 42s" in line, line
