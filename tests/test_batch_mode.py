"""Batch mode end to end: a real Beam run against the loopback Files and Batches API, with faults.

The server (:class:`pipeline.local_batch.BatchServer`) fails a batch's validation, expires a
batch with half its lines done, answers lines 500 once, answers 400 for a poison input, and
shuffles both the output lines and each body's ``data``. Whatever it does, every valid chunk
must end with its own text's vector, the poison chunk alone rejected, usage tokens equal to what
the server billed, nothing embedded twice, and no batch left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline.local_batch import BatchServer
from pipeline.run import PREFLIGHT_TEXT, RunRequest, execute
from tests.support.checks import assert_run_complete
from tests.support.corpus import (
    add_poisoned_document,
    add_short_documents,
    corpus_patterns,
    write_corpus,
)
from tests.support.fakes import make_chunk
from tests.support.harness import MODEL, expected_chunks, make_config
from transforms.batch_session import BatchSession
from transforms.embed_session import EmbedSettings
from transforms.limits import RateLimits
from transforms.pack import make_request_batch
from transforms.providers.openai import OpenAIConfig
from transforms.retry import RetryPolicy

POISON = "XPOISONX"
DIM = 32
#: The preflight's one online input (pipeline.run): not a chunk of the corpus.
BATCH = {"mode": "batch", "batch_poll_interval_s": 0.02, "max_inputs_per_request": 4}




def batch_config(root: str, out: str, server: BatchServer, **provider: Any):
    return make_config(corpus_patterns(root), out, server.base_url,
                       provider={**BATCH, **provider}, output={"include_text": True})


def embedded_once(server: BatchServer, texts: set[str]) -> None:
    """Every text of ``texts`` embedded exactly once, online or in a batch; no other text
    but the preflight's (one per run)."""
    served = Counter(server.stats.texts)
    extra = {t: n for t, n in served.items() if t not in texts and t != PREFLIGHT_TEXT}
    assert not extra, extra
    twice = {t: n for t, n in served.items() if t in texts and n != 1}
    assert not twice, list(twice.items())[:3]
    assert set(served) >= texts


def test_every_batch_fault_at_once(tmp_path: Path) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root).plus(add_poisoned_document(root, POISON)).plus(
        add_short_documents(root, 60))
    chunks = expected_chunks(expected.documents)
    poisoned = {i for i, text in chunks.items() if POISON in text}
    assert poisoned and len([i for i in chunks if i.startswith("poisoned#")]) > len(poisoned)

    with BatchServer(dim=DIM, model=MODEL, poison=POISON, shuffle=True) as server:
        # The first batch fails validation, naming its second line (ours to fix: it goes
        # online); the next one expires with half its lines done; three lines answer 500 once.
        server.fail_validation(1, errors=[{"code": "invalid_request", "param": "body.input",
                                           "message": "line 2 is not acceptable", "line": 2}])
        server.expire_next(1)
        server.fail_lines_500(3)
        out = str(tmp_path / "out")
        cfg = batch_config(root, out, server, batch_max_inputs=60,
                           price_per_million_tokens=0.02)
        code = execute(RunRequest(cfg, quiet=True))
        stats = server.batch_stats
        running = server.running()
        online_tokens = server.stats.tokens

    assert code == 1  # the poison
    for fault in ("validation", "expire", "line_500", "poison", "shuffle"):
        assert stats.faults.get(fault, 0) > 0, (fault, stats.faults)
    assert running == []
    assert len(stats.batches) >= 4 and stats.by_status().get("completed", 0) >= 2

    # Every valid chunk has its own text's vector, once; the poison chunks alone are rejected.
    run = assert_run_complete(out, expected, dim=DIM, failed=poisoned)
    assert {r["reason"] for r in run.embed_rejects.values()} == {"provider_rejected"}
    embedded_once(server, {t for i, t in chunks.items() if i not in poisoned})

    # Usage: one row per line result; the ok rows' tokens are what the server billed.
    usage = run.tables["usage"].to_pylist()
    batch_rows = [u for u in usage if u["mode"] == "batch"]
    ok_batch = [u for u in batch_rows if u["outcome"] == "ok"]
    assert sum(u["prompt_tokens"] for u in ok_batch) == stats.tokens_billed
    assert len(ok_batch) == stats.lines["ok"]
    assert sum(u["prompt_tokens"] for u in run.ok_usage) == online_tokens
    assert {u["batch_id"] for u in batch_rows} <= set(stats.batch_ids)
    assert all(u["batch_id"] is None for u in usage if u["mode"] == "online")
    # The manifest's batch figures.
    section = run.manifest["batch"]
    assert section["lines"] == len(batch_rows)
    assert section["prompt_tokens"] == stats.tokens_billed
    assert section["batches"] == sorted({u["batch_id"] for u in batch_rows})
    assert section["cost"] == pytest.approx(
        (section["prompt_tokens"] * 0.5 + section["online_prompt_tokens"]) * 0.02 / 1e6)


@pytest.mark.parametrize("finished_while_dead", [False, True])
def test_a_run_killed_while_its_batch_is_in_flight_reattaches_instead_of_resubmitting(
        tmp_path: Path, finished_while_dead: bool) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root).plus(add_short_documents(root, 30))
    chunks = expected_chunks(expected.documents)
    out = str(tmp_path / "out")
    with BatchServer(dim=DIM, model=MODEL, shuffle=True) as server:
        server.hold()  # the batch stays in_progress until released
        cfg = batch_config(root, out, server)
        config = tmp_path / "config.json"
        config.write_text(json.dumps(cfg.model_dump(by_alias=True, mode="json")))
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "--config", str(config), "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 120
        while not any(b.status == "in_progress" for b in server.batch_stats.batches):
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "no batch reached in_progress"
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        before = server.batch_stats
        assert len(before.batches) == 1 and before.lines == {}  # nothing answered yet
        assert not (Path(out) / "manifest.json").exists()

        server.release()
        if finished_while_dead:  # the batch ended while no process waited for it
            server.complete_all()
        code = execute(RunRequest(cfg, quiet=True))
        after = server.batch_stats
        running = server.running()
        run = assert_run_complete(out, expected, dim=DIM)

        # Once committed, the batch is not taken again: a re-run is served from the cache.
        again = cfg.model_copy(update={"output": cfg.output.model_copy(update={"overwrite": True})})
        requests_before = server.stats.requests
        assert execute(RunRequest(again, quiet=True)) == 0
        assert server.batch_stats.batch_ids == before.batch_ids
        assert server.stats.requests - requests_before == 1  # its preflight alone

    assert code == 0
    # No second batch for the same inputs: the re-run waited for the first one.
    assert after.batch_ids == before.batch_ids
    assert running == []
    embedded_once(server, set(chunks.values()))
    assert run.manifest["batch"]["batches"] == list(before.batch_ids)
    ok_batch = [u for u in run.ok_usage if u["mode"] == "batch"]
    assert sum(u["prompt_tokens"] for u in ok_batch) == after.tokens_billed
    assert {u["batch_id"] for u in ok_batch} == set(before.batch_ids)


def test_a_create_whose_answer_is_lost_is_found_by_its_metadata(tmp_path: Path) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    out = str(tmp_path / "out")
    with BatchServer(dim=DIM, model=MODEL) as server:
        server.lose_create_reply(1)
        code = execute(RunRequest(batch_config(root, out, server, batch_max_inputs=40),
                                  quiet=True))
        stats = server.batch_stats
    assert code == 0
    assert stats.faults.get("lost_create") == 1
    # One batch per part: the lost answer's batch was found, not created again.
    parts = Counter((b.metadata or {}).get("embedpipe_part") for b in stats.batches)
    assert set(parts.values()) == {1}
    assert_run_complete(out, expected, dim=DIM)
    embedded_once(server, set(expected_chunks(expected.documents).values()))


def test_a_batch_failed_for_no_line_of_ours_aborts_and_leaves_nothing_running(
        tmp_path: Path) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    out = str(tmp_path / "out")
    with BatchServer(dim=DIM, model=MODEL, progress="poll", lines_per_step=1) as server:
        server.fail_validation(1)  # errors.data names no line: nothing for us to fix
        code = execute(RunRequest(batch_config(root, out, server, batch_max_inputs=30),
                                  quiet=True))
        running = server.running()
    assert code == 3
    assert running == []
    run = assert_run_complete(out, expected, dim=DIM, failed=None, status="aborted")
    assert "scripted validation failure" in run.manifest["error"]
    assert {r["reason"] for r in run.embed_rejects.values()} <= {"aborted"}


def test_more_than_50000_inputs_make_more_than_one_batch() -> None:
    """OpenAI's cap of 50,000 inputs per batch, at the session, against the real server."""
    texts = [f"w{i}" for i in range(50_010)]
    with BatchServer(dim=DIM, model=MODEL) as server:
        cfg = OpenAIConfig(base_url=server.base_url, model=MODEL, api_key_env=None,
                           mode="batch", batch_poll_interval_s=0.02,
                           max_inputs_per_request=1000)
        settings = EmbedSettings(
            run_id="cap-run", provider=cfg, limits=RateLimits(10_000, 10**9),
            max_concurrency=2, retry=RetryPolicy(3, 0.1, 0.01), progress_interval_s=None,
            batch_key="cap-test")
        session = BatchSession(settings, api_key=None)
        try:
            futures = [session.submit(make_request_batch(tuple(
                make_chunk(f"c{i}", 0, text) for i, text in enumerate(texts[start:start + 1000],
                                                                     start=start))))
                for start in range(0, len(texts), 1000)]
            session.flush()
            outcomes = [f.result(timeout=300) for f in futures]
        finally:
            session.close()
        stats = server.batch_stats
    assert [b.total for b in stats.batches] == [50, 1]  # lines: 50 of 1,000 inputs, then one
    assert sum(len(batch) for o in outcomes for batch in o.batches) == len(texts)
    assert not any(o.rejects for o in outcomes)
    assert stats.embedded == dict.fromkeys(texts, 1)


@pytest.mark.parametrize("beam_args", [
    pytest.param(["--runner=PortableRunner", "--job_endpoint=embed",
                  "--environment_type=LOOPBACK"], id="portable"),
    pytest.param(["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
                 id="two-processes"),
])
def test_batch_mode_on_other_runners(tmp_path: Path, beam_args: list[str]) -> None:
    """The graph is the online one: the portable runner (Flink's and Dataflow's path) and
    several worker processes, each with its own session and batches, lose nothing."""
    root = str(tmp_path / "corpus")
    expected = write_corpus(root).plus(add_short_documents(root, 40))
    out = str(tmp_path / "out")
    with BatchServer(dim=DIM, model=MODEL, shuffle=True) as server:
        cfg = batch_config(root, out, server, batch_max_inputs=40)
        code = execute(RunRequest(cfg, beam_args=beam_args, quiet=True))
        stats = server.batch_stats
        running = server.running()
    assert code == 0 and running == []
    run = assert_run_complete(out, expected, dim=DIM)
    embedded_once(server, set(expected_chunks(expected.documents).values()))
    assert len(stats.batches) >= 2
    ok_batch = [u for u in run.ok_usage if u["mode"] == "batch"]
    assert sum(u["prompt_tokens"] for u in ok_batch) == stats.tokens_billed


def test_a_full_token_queue_defers_the_batch_until_one_of_ours_ends(tmp_path: Path) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root).plus(add_short_documents(root, 20))
    out = str(tmp_path / "out")
    with BatchServer(dim=DIM, model=MODEL) as server:
        server.fail_token_limit(2)
        code = execute(RunRequest(batch_config(root, out, server, batch_max_inputs=40),
                                  quiet=True))
        stats = server.batch_stats
        running = server.running()
    assert code == 0 and running == []
    assert stats.faults.get("token_limit") == 2
    assert stats.by_status().get("failed") == 2
    run = assert_run_complete(out, expected, dim=DIM)
    embedded_once(server, set(expected_chunks(expected.documents).values()))
    # The refused lines' rows say why, and they were sent again in a later batch.
    retried = [u for u in run.tables["usage"].to_pylist() if u["outcome"] == "retry"]
    assert retried and all("token_limit_exceeded" in u["error"] for u in retried)
    assert {u["attempt"] for u in run.ok_usage if u["mode"] == "batch"} >= {2}


def test_the_key_reaches_no_file_log_or_uploaded_batch(tmp_path: Path) -> None:
    """Batch mode sends the key on every Files and Batches call: it must stay in the headers,
    never in the uploaded lines, the batches' metadata, the output, the cache or the log."""
    key = "sk-batch-" + "7f3a9c" * 6
    work = tmp_path / "work"
    root = str(work / "corpus")
    write_corpus(root)
    with BatchServer(dim=DIM, model=MODEL, api_key=key) as server:
        cfg = make_config(corpus_patterns(root), str(work / "out"), server.base_url,
                          provider={**BATCH, "api_key_env": "EMBEDPIPE_BATCH_TEST_KEY"})
        config = tmp_path / "config.json"
        config.write_text(json.dumps(cfg.model_dump(by_alias=True, mode="json")))
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "--config", str(config)],
            capture_output=True, timeout=300, check=False,
            env={**os.environ, "EMBEDPIPE_BATCH_TEST_KEY": key, "PYTHONUNBUFFERED": "1"})
        stats = server.batch_stats
        uploaded = [server.file_content(b.input_file_id) for b in stats.batches]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stats.batches and "batches:" in proc.stderr.decode()  # progress lines were logged
    files = {str(p): p.read_bytes() for p in work.rglob("*") if p.is_file()}
    files.update({"stdout": proc.stdout, "stderr": proc.stderr})
    files.update({f"upload {i}": data for i, data in enumerate(uploaded)})
    files.update({"metadata": json.dumps([b.metadata for b in stats.batches]).encode()})
    for where, data in files.items():
        assert key.encode() not in data and key[9:30].encode() not in data, where
