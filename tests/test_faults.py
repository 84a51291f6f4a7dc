"""The whole pipeline against a server that breaks every promise at once, and one that runs dry.

Server faults come from :mod:`tests.support.fault_server` (seeded): rate limits with Retry-After, 500s,
HTML 503s, connection resets, answers slower than the timeout, truncated JSON, one embedding too
few, shuffled order, a poison marker that fails whole requests, and exhausted quota.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pipeline.run import PREFLIGHT_TEXT, RunRequest, execute
from tests.support.checks import assert_run_complete
from tests.support.corpus import (
    add_poisoned_document,
    add_short_documents,
    corpus_patterns,
    write_corpus,
)
from tests.support.fault_server import FaultPlan, FaultServer, Outcome
from tests.support.harness import MODEL, expected_chunks, make_config

POISON = "XPOISONX"




def test_every_fault_at_once(tmp_path: Path, fault_server: Callable[..., FaultServer]) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root).plus(add_poisoned_document(root, POISON)).plus(
        add_short_documents(root, 80))
    chunks = expected_chunks(expected.documents)
    poisoned = {i for i, text in chunks.items() if POISON in text}
    assert poisoned and len([i for i in chunks if i.startswith("poisoned#")]) > len(poisoned)

    # Only 40% of answers are intact (ok or shuffled): 40 attempts make a request that never
    # gets through a one-in-ten-million event, so every valid chunk must end embedded.
    plan = FaultPlan(seed=3, rpm=6000, tpm=400_000, burst_s=0.5, latency_s=0.005,
                     p_500=0.1, p_503_html=0.1, p_reset=0.1, p_slow=0.1, slow_s=2.0,
                     p_truncated=0.1, p_short=0.1, p_shuffle=0.15)
    server = fault_server(plan, dim=32, model=MODEL, poison=POISON)
    cfg = make_config(corpus_patterns(root), str(tmp_path / "out"), server.base_url,
                      provider={"timeout_s": 0.5, "max_inputs_per_request": 2},
                      retry={"max_attempts": 40, "max_wait_s": 0.1, "initial_wait_s": 0.01},
                      limits={"max_concurrency": 4},
                      output={"include_text": True})
    code = execute(RunRequest(cfg, quiet=True))
    stats = server.fault_stats
    time.sleep(plan.slow_s)  # let slow answers finish before the server stops
    server.stop()
    assert code == 1  # because of the poison

    # Every fault kind was met.
    for outcome in (Outcome.ERROR_500, Outcome.ERROR_503_HTML, Outcome.RESET, Outcome.SLOW,
                    Outcome.TRUNCATED, Outcome.SHORT, Outcome.SHUFFLED, Outcome.POISONED):
        assert stats.counts.get(outcome, 0) > 0, outcome

    # Every valid chunk has its own vector, once, aligned; the poison chunks alone are rejected.
    run = assert_run_complete(str(tmp_path / "out"), expected, dim=32, failed=poisoned)
    assert {r["reason"] for r in run.embed_rejects.values()} == {"provider_rejected"}

    # One usage row per HTTP attempt: as many as the server saw embedding requests.
    usage = run.tables["usage"].to_pylist()
    assert len(usage) == stats.requests
    assert len(run.ok_usage) == stats.served_requests
    # Each distinct text was served once (identical chunk texts are sent once).
    served = Counter(stats.served_texts)
    served[PREFLIGHT_TEXT] -= 1
    assert +served == Counter({text: 1 for i, text in chunks.items() if i not in poisoned})


def test_quota_exhausted_mid_run_aborts_and_keeps_finished_work(
        tmp_path: Path, fault_server: Callable[..., FaultServer]) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    chunks = expected_chunks(expected.documents)
    plan = FaultPlan(seed=1, latency_s=0.01, quota_after=4)  # the preflight and 3 requests
    server = fault_server(plan, dim=32, model=MODEL)
    cfg = make_config(corpus_patterns(root), str(tmp_path / "out"), server.base_url,
                      provider={"max_inputs_per_request": 4},
                      limits={"max_concurrency": 1}, output={"include_text": True})
    t0 = time.monotonic()
    code = execute(RunRequest(cfg, quiet=True))
    elapsed = time.monotonic() - t0
    server.stop()
    assert code == 3
    assert elapsed < 60
    # What finished before the quota ran out is committed, aligned and readable; nothing is
    # lost: every other chunk is an `aborted` reject.
    run = assert_run_complete(str(tmp_path / "out"), expected, dim=32, failed=None,
                              status="aborted")
    assert "quota" in run.manifest["error"]
    assert 0 < len(run.vectors) < len(chunks)
    assert {r["reason"] for r in run.embed_rejects.values()} == {"aborted"}
    # After the fatal answer, nothing more was sent.
    usage = run.tables["usage"].to_pylist()
    assert sum(1 for u in usage if u["http_status"] == 429) == 1
