"""The content-addressed cache, end to end (issue 5: never pay twice for the same embedding).

Every test runs the whole pipeline on the default runner against an OpenAI-dialect server on
loopback and judges the result by independent oracles:

- the server's own record of every input text it answered (``stats.texts``), which is what a
  provider would bill;
- the splitter run directly on the corpus (``expected_chunks``), for ids and chunk texts;
- the server's embedder (``HashingEmbedder``), for the vector every chunk must carry.

Covered: a SIGKILL in the middle of embedding followed by the same command (resume), a re-run
with 5% of the documents changed (incremental), duplicated texts (dedup within a run), refusing
a complete output unless ``--overwrite``, and ``cache.enabled: false``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from pipeline.config import Config, parse_config
from pipeline.graph import cache_spec
from pipeline.local_server import EmbeddingServer, Reply
from pipeline.run import PREFLIGHT_TEXT, RunRequest, execute
from tests.support.checks import assert_run_complete, embedding_matrix
from tests.support.corpus import ExpectedCorpus
from tests.support.harness import MODEL, expected_chunks, make_config, read_output
from transforms.cache import read_segment
from transforms.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DIM = 64
PROCESS_TIMEOUT_S = 120.0
POLL_S = 0.05

WORDS = ["harbour", "lantern", "keeper", "ledger", "tide", "swell", "granite", "pier", "gull", "beacon", "fog", "signal", "rope", "anchor", "chart", "compass", "current", "reef", "shoal", "dune", "marsh", "heron", "willow", "meadow", "orchard", "barley", "millstone", "furnace", "anvil", "bellows", "copper", "tin", "bronze", "loom", "spindle", "wool", "dye", "indigo", "madder", "ochre", "kiln", "clay", "glaze", "ember", "quarry", "chisel", "mortar", "lintel", "rafter", "thatch", "gable", "cellar", "larder", "pantry", "hearth"]


# -- corpora ---------------------------------------------------------------------------------


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def short_documents(n: int, seed: int) -> dict[str, str]:
    """``n`` documents of one short sentence each, every text distinct (one chunk each)."""
    rng = random.Random(seed)
    return {f"doc-{i:04d}": f"Record {i}: {sentence(rng, rng.randint(10, 18))}" for i in range(n)}


def varied_documents(n: int, seed: int) -> dict[str, str]:
    """``n`` distinct documents of one to about three chunks (128-token chunks, 16 overlap)."""
    rng = random.Random(seed)
    docs = {}
    for i in range(n):
        sentences = [sentence(rng, rng.randint(8, 16)) for _ in range(rng.choice((1, 3, 12, 22)))]
        docs[f"doc-{i:04d}"] = f"Entry {i}. " + " ".join(sentences)
    return docs


LIGHTHOUSE = (
    "The lighthouse keeper wound the clock at dusk and logged every passing ship in the "
    "ledger, noting the wind, the swell and the colour of the sky over the harbour. "
) * 3


def duplicated_documents() -> dict[str, str]:
    """Texts shared between documents, and documents whose chunks repeat within themselves."""
    rng = random.Random(11)
    shared_long = " ".join(sentence(rng, 14) for _ in range(20))  # several chunks
    repeated = "\n\n".join([LIGHTHOUSE.strip()] * 4)  # chunks 1..3 are one text
    docs: dict[str, str] = {}
    for i in range(4):
        docs[f"shared-long-{i}"] = shared_long
    for i in range(5):
        docs[f"note-{i}"] = "Same short note about the tide tables."
    for i in range(2):
        docs[f"repeated-{i}"] = repeated
    for i in range(6):
        docs[f"unique-{i}"] = f"Unique {i}: " + " ".join(sentence(rng, 12) for _ in range(3))
    return docs


def write_jsonl(path: Path, documents: Mapping[str, str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc_id, text in documents.items():
            f.write(json.dumps({"id": doc_id, "text": text, "lang": "en"}) + "\n")
    return str(path)


# -- the server ------------------------------------------------------------------------------


class SlowServer(EmbeddingServer):
    """The local server with ``latency_s`` per request (requests are served in parallel).

    With ``hold_after``, a request that arrives once that many inputs have been served waits
    until :meth:`release` (at most ``PROCESS_TIMEOUT_S``): a run against it can never finish
    before the test has killed it, however fast or slow the machine is.
    """

    def __init__(self, *, latency_s: float, hold_after: int | None = None, **kwargs: Any) -> None:
        super().__init__(dim=DIM, model=MODEL, **kwargs)
        self.latency_s = latency_s
        self.hold_after = hold_after
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def handle_embeddings(self, payload: dict[str, Any], headers: Mapping[str, str]) -> Reply:
        time.sleep(self.latency_s)
        if self.hold_after is not None and self.stats.inputs >= self.hold_after:
            self._released.wait(PROCESS_TIMEOUT_S)
        return super().handle_embeddings(payload, headers)


def paid_texts(server: EmbeddingServer, since: int = 0) -> Counter[str]:
    """How often each text was served (billed) from position ``since`` on, preflight excluded."""
    return Counter(t for t in server.stats.texts[since:] if t != PREFLIGHT_TEXT)


def settle(server: EmbeddingServer, quiet_s: float = 0.5) -> None:
    """Wait until the server has served nothing for ``quiet_s`` (at most PROCESS_TIMEOUT_S)."""
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    seen, since = len(server.stats.texts), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.05)
        if len(server.stats.texts) != seen:
            seen, since = len(server.stats.texts), time.monotonic()


def preflights(server: EmbeddingServer, since: int = 0) -> int:
    return server.stats.texts[since:].count(PREFLIGHT_TEXT)


# -- config, runs and outputs ----------------------------------------------------------------


def config(corpus: str, output: Path, server: EmbeddingServer, /, **sections: dict) -> Config:
    """The harness's loopback config: 8 inputs per request, 4 in flight, text in the output."""
    cache = sections.pop("cache", {})
    sections["output"] = {"include_text": True, **sections.get("output", {})}
    cfg = make_config([corpus], str(output), server.base_url, **sections)
    return parse_config({**cfg.model_dump(by_alias=True, mode="json"), "cache": cache})


def run(cfg: Config) -> dict[str, Any]:
    """Run in process; the run must succeed. Returns the committed manifest."""
    assert execute(RunRequest(cfg, quiet=True)) == 0
    return json.loads((Path(cfg.output.path) / "manifest.json").read_text())


def rows_by_id(output: Path) -> dict[str, dict[str, Any]]:
    """The committed vectors (files the manifest lists) as id → row, ``embedding`` a numpy row."""
    manifest, tables = read_output(str(output))
    assert manifest["status"] == "complete"
    vectors = tables["vectors"]
    matrix = embedding_matrix(vectors)
    rows = vectors.drop_columns(["embedding"]).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "chunk ids must be unique"
    return {r["id"]: {**r, "embedding": matrix[i]} for i, r in enumerate(rows)}


def check_complete_and_aligned(output: Path, documents: dict[str, str]) -> dict[str, dict]:
    """Every chunk of ``documents`` exactly once, with its own text, offsets and vector (the
    shared end-to-end checks); the vectors as id → row, ``embedding`` a numpy row."""
    expected = ExpectedCorpus.of(documents, metadata=dict.fromkeys(documents, "en"))
    run = assert_run_complete(str(output), expected, dim=DIM)
    assert all("text" in row for row in run.vectors.values())  # the config includes text
    return run.vectors


def check_cache_counts(manifest: dict, rows: Mapping[str, dict], missed: set[str]) -> None:
    """The manifest's cache section against the rows and the distinct texts that were sent.

    hits: rows whose text was already cached; misses: distinct texts sent; duplicates: the other
    rows of those texts; tokens_saved: every row's tokens minus one row's per text sent.
    """
    cache = manifest["cache"]
    missed_rows = [r for r in rows.values() if r["text"] in missed]
    tokens_sent = {r["text"]: r["n_tokens"] for r in missed_rows}
    assert cache["enabled"] is True
    assert cache["misses"] == len(missed)
    assert cache["duplicates"] == len(missed_rows) - len(missed)
    assert cache["hits"] == len(rows) - len(missed_rows)
    assert cache["tokens_saved"] == (
        sum(r["n_tokens"] for r in rows.values()) - sum(tokens_sent.values()))


def cache_folder(root: Path) -> Path:
    """The one namespace folder under a cache root."""
    folders = [p for p in root.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def cached_shas(folder: Path, pattern: str = "seg-*.arrow") -> list[str]:
    fs = fsspec.filesystem("file")
    return [sha for path in sorted(folder.glob(pattern))
            for sha in read_segment(fs, str(path)).column("content_sha256").to_pylist()]


# -- 1. SIGKILL, then the same command --------------------------------------------------------


def test_sigkill_mid_embedding_then_same_command_resumes_paying_only_the_window(
    tmp_path: Path,
) -> None:
    """A run killed with SIGKILL half-way through embedding, then re-run with the same command,
    commits a complete, aligned output with unique ids, and the provider answered at most
    ``max_concurrency × max_inputs_per_request`` inputs twice: every batch finished before the
    kill was in the cache, and the re-run took it from there (``cache.hits`` > 0).
    """
    documents = short_documents(600, seed=1)
    chunks = expected_chunks(documents)
    assert len(chunks) == len(documents), "premise: one chunk per document"
    max_inputs, max_concurrency = 8, 4
    corpus = write_jsonl(tmp_path / "corpus" / "docs.jsonl", documents)
    output = tmp_path / "out"
    config_file = tmp_path / "config.json"
    command = [sys.executable, "-m", "pipeline", "run", "--config", str(config_file), "--quiet"]
    kill_at = int(0.3 * len(chunks)) + 1  # inputs served (the preflight is one of them)

    with SlowServer(latency_s=0.04, hold_after=int(0.6 * len(chunks))) as server:
        cfg = config(corpus, output, server,
                     provider={"max_inputs_per_request": max_inputs},
                     limits={"max_concurrency": max_concurrency})
        config_file.write_text(json.dumps(cfg.model_dump(by_alias=True, mode="json")))

        with (tmp_path / "run1.log").open("w") as log:
            proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + PROCESS_TIMEOUT_S
                while server.stats.inputs < kill_at:
                    assert proc.poll() is None, (
                        "the run ended before it could be killed:\n"
                        + (tmp_path / "run1.log").read_text())
                    assert time.monotonic() < deadline, "the run never got to 30% of the inputs"
                    time.sleep(POLL_S)
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait(PROCESS_TIMEOUT_S) == -signal.SIGKILL
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                server.release()
        # Requests the killed run had in flight may still finish on the server now that it is
        # released: let them land before counting, so they are not taken for the re-run's.
        settle(server)
        served_before_kill = server.stats.inputs - 1
        assert served_before_kill < len(chunks)

        # What the killed run left: no manifest (a run commits one only at its end), its lease
        # (which the re-run takes over: its process is gone), and the requests it finished,
        # already in the cache as one segment each, named by the killed run.
        assert not (output / "manifest.json").exists()
        killed = json.loads((output / "_lease.json").read_text())
        assert killed["pid"] == proc.pid
        folder = cache_folder(tmp_path / ".embedpipe-cache")
        survived = set(cached_shas(folder, f"seg-{killed['run_id']}-*.arrow"))
        assert survived, "no finished request batch reached the cache before the kill"

        mark = len(server.stats.texts)
        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                timeout=PROCESS_TIMEOUT_S, check=False)
        assert second.returncode == 0, second.stdout + second.stderr

        manifest = json.loads((output / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        assert manifest["run_id"] != killed["run_id"]
        rows = check_complete_and_aligned(output, documents)
        assert manifest["counts"]["chunks"] == manifest["counts"]["chunks_embedded"] == len(rows)

        # The partial output was superseded: every file left is one the manifest lists.
        listed = {Path(f["path"]).resolve() for f in manifest["files"]}
        on_disk = {p.resolve() for p in output.rglob("*.parquet")}
        assert on_disk == listed
        assert not (output / "_temporary").exists()

        # Paid twice: at most the request batches in flight at the kill.
        paid = paid_texts(server)
        assert set(paid) == set(chunks.values())
        served_twice = sum(n - 1 for n in paid.values() if n > 1)
        assert served_twice <= max_concurrency * max_inputs, served_twice
        assert preflights(server) == 2

        # The re-run took every surviving text from the cache and sent only the rest, once.
        resent = paid_texts(server, since=mark)
        assert max(resent.values()) == 1
        sha_of = {r["text"]: r["content_sha256"] for r in rows.values()}
        assert not {sha_of[t] for t in resent} & survived
        assert manifest["cache"]["hits"] == len(survived) > 0
        check_cache_counts(manifest, rows, set(resent))
    print(f"\nSIGKILL: {served_before_kill} inputs served to the killed run, "
          f"{len(survived)} cached, {served_twice} served twice, "
          f"run 2 hits={manifest['cache']['hits']} misses={manifest['cache']['misses']}")


# -- 2. incremental: 5% of documents changed --------------------------------------------------


def test_rerun_with_five_percent_changed_sends_only_their_new_chunks(tmp_path: Path) -> None:
    """A second run over a corpus where 5% of the documents changed (half rewritten, half
    extended at the end), sharing ``cache.path`` with the first, sends exactly the chunk texts
    the first run did not have, all from the changed documents, each once; its manifest counts
    them as misses and everything else as hits; and its output is identical, row for row and
    bit for bit, to a run with the cache turned off.
    """
    before = varied_documents(200, seed=2)
    changed_ids = sorted(random.Random(3).sample(sorted(before), 10))
    after = dict(before)
    rng = random.Random(4)
    for n, doc_id in enumerate(changed_ids):
        if n % 2:
            after[doc_id] = before[doc_id] + " Revised: " + sentence(rng, 14)
        else:
            after[doc_id] = f"Rewritten {doc_id}. " + " ".join(sentence(rng, 12) for _ in range(9))
    chunks_before, chunks_after = expected_chunks(before), expected_chunks(after)
    new_texts = set(chunks_after.values()) - set(chunks_before.values())
    changed_chunk_texts = {t for i, t in chunks_after.items() if i.split("#")[0] in changed_ids}
    assert new_texts <= changed_chunk_texts  # premise: unchanged documents keep their chunks
    assert all(any(chunks_after[i] in new_texts for i in chunks_after if i.startswith(d + "#"))
               for d in changed_ids)
    assert len(chunks_after) > 2 * len(after), "premise: multi-chunk documents"

    cache_root = tmp_path / "shared-cache"
    with SlowServer(latency_s=0.0) as server:
        first = run(config(write_jsonl(tmp_path / "v1" / "docs.jsonl", before),
                           tmp_path / "out-1", server, cache={"path": str(cache_root)}))
        rows_1 = check_complete_and_aligned(tmp_path / "out-1", before)
        check_cache_counts(first, rows_1, set(chunks_before.values()))
        assert paid_texts(server) == Counter(set(chunks_before.values()))

        corpus_2 = write_jsonl(tmp_path / "v2" / "docs.jsonl", after)
        mark = len(server.stats.texts)
        second = run(config(corpus_2, tmp_path / "out-2", server,
                            cache={"path": str(cache_root)}))
        paid = paid_texts(server, since=mark)
        assert paid == Counter(new_texts), "run 2 must send exactly the new chunk texts, once"
        assert preflights(server, since=mark) == 1
        rows_2 = check_complete_and_aligned(tmp_path / "out-2", after)
        check_cache_counts(second, rows_2, new_texts)
        assert second["cache"]["path"] == first["cache"]["path"]
        assert second["cache"]["path"].startswith(str(cache_root))

        clean = run(config(corpus_2, tmp_path / "out-clean", server, cache={"enabled": False}))
        assert clean["cache"] == {"enabled": False}
        rows_clean = rows_by_id(tmp_path / "out-clean")
    assert rows_2.keys() == rows_clean.keys()
    for chunk_id, row in rows_2.items():
        other = rows_clean[chunk_id]
        assert {k: v for k, v in row.items() if k != "embedding"} == {
            k: v for k, v in other.items() if k != "embedding"}
        assert np.array_equal(row["embedding"], other["embedding"]), chunk_id
    print(f"\nincremental: run 2 hits={second['cache']['hits']} "
          f"misses={second['cache']['misses']} tokens_saved={second['cache']['tokens_saved']} "
          f"of {len(rows_2)} chunks")


# -- 3. duplicated texts ------------------------------------------------------------------------


def test_each_distinct_text_is_sent_once(tmp_path: Path) -> None:
    """Documents that share their text, and a document whose chunks repeat, cost one input per
    distinct chunk text: the server sees each exactly once, every row carries its text's vector,
    the manifest counts the other rows as ``duplicates``, and the cache (by default beside the
    output, one segment per request) holds each text once.
    """
    documents = duplicated_documents()
    chunks = expected_chunks(documents)
    distinct = set(chunks.values())
    repeated_doc = [chunks[i] for i in chunks if i.startswith("repeated-0#")]
    assert len(set(repeated_doc)) < len(repeated_doc), "premise: chunks repeat within a document"
    assert len(chunks) - len(distinct) >= 15, "premise: many duplicated rows"

    output = tmp_path / "out"
    with SlowServer(latency_s=0.0) as server:
        manifest = run(config(write_jsonl(tmp_path / "docs.jsonl", documents), output, server))
        assert paid_texts(server) == Counter(distinct)
    rows = check_complete_and_aligned(output, documents)
    check_cache_counts(manifest, rows, distinct)
    assert manifest["cache"]["duplicates"] == len(rows) - len(distinct)
    assert manifest["cache"]["hits"] == 0

    _, tables = read_output(str(output))
    ok = [u for u in tables["usage"].to_pylist() if u["outcome"] == "ok"]
    assert sum(u["n_inputs"] for u in ok) == len(distinct) + 1  # + the preflight

    folder = cache_folder(tmp_path / ".embedpipe-cache")
    assert manifest["cache"]["path"] == str(folder)
    assert (folder / "namespace.json").exists()
    assert not list(folder.glob(".*.tmp")), "no segment is left half-written"
    stored = cached_shas(folder)
    assert Counter(stored) == Counter({r["content_sha256"] for r in rows.values()})


# -- 4. a complete output is refused unless --overwrite -----------------------------------------


def test_complete_output_refused_without_overwrite_then_replaced_from_the_cache(
    tmp_path: Path,
) -> None:
    """Running into a complete output is refused (``ConfigError`` naming ``--overwrite``; the
    CLI exits 2) before any API call and without touching the output; with ``--overwrite`` the
    run replaces it, and pays nothing but the preflight: every chunk comes from the cache.
    """
    documents = varied_documents(30, seed=5)
    output = tmp_path / "out"
    with SlowServer(latency_s=0.0) as server:
        cfg = config(write_jsonl(tmp_path / "docs.jsonl", documents), output, server)
        first = run(cfg)
        config_file = tmp_path / "config.json"
        config_file.write_text(json.dumps(cfg.model_dump(by_alias=True, mode="json")))
        mark = len(server.stats.texts)

        with pytest.raises(ConfigError, match="--overwrite"):
            execute(RunRequest(cfg, quiet=True))
        command = [sys.executable, "-m", "pipeline", "run", "--config", str(config_file),
                   "--quiet"]
        refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                 timeout=PROCESS_TIMEOUT_S, check=False)
        assert refused.returncode == 2, refused.stderr
        assert "--overwrite" in refused.stderr
        assert json.loads((output / "manifest.json").read_text()) == first
        check_complete_and_aligned(output, documents)
        assert server.stats.texts[mark:] == ()

        replaced = subprocess.run([*command, "--overwrite"], cwd=REPO, capture_output=True,
                                  text=True, timeout=PROCESS_TIMEOUT_S, check=False)
        assert replaced.returncode == 0, replaced.stdout + replaced.stderr
        assert server.stats.texts[mark:] == (PREFLIGHT_TEXT,)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["run_id"] != first["run_id"]
    rows = check_complete_and_aligned(output, documents)
    check_cache_counts(manifest, rows, set())
    assert manifest["cache"]["hits"] == len(rows)


# -- 5. cache.enabled: false --------------------------------------------------------------------


def test_cache_disabled_writes_nothing_dedups_nothing_and_pays_again(tmp_path: Path) -> None:
    """With ``cache.enabled: false`` nothing is cached or deduplicated: no cache folder appears
    (neither the default beside the output nor an explicit ``cache.path``), every chunk is sent,
    identical texts included, a re-run pays for everything again, and the manifest says
    ``{"enabled": false}``.
    """
    documents = duplicated_documents()
    chunks = expected_chunks(documents)
    every_chunk = Counter(chunks.values())
    assert max(every_chunk.values()) > 1, "premise: duplicated texts"
    corpus = write_jsonl(tmp_path / "corpus" / "docs.jsonl", documents)
    output = tmp_path / "out"
    explicit = tmp_path / "cache-off"
    with SlowServer(latency_s=0.0) as server:
        first = run(config(corpus, output, server, cache={"enabled": False}))
        assert paid_texts(server) == every_chunk
        mark = len(server.stats.texts)
        second = run(config(corpus, output, server, output={"overwrite": True},
                            cache={"enabled": False, "path": str(explicit)}))
        assert paid_texts(server, since=mark) == every_chunk
    for manifest in (first, second):
        assert manifest["cache"] == {"enabled": False}
    check_complete_and_aligned(output, documents)
    assert not (tmp_path / ".embedpipe-cache").exists()
    assert not explicit.exists()
    assert not list(tmp_path.rglob("namespace.json"))
    assert not list(tmp_path.rglob("run-*.parquet"))
    assert not list(tmp_path.rglob("seg-*.arrow"))


def test_namespace_separates_endpoints_on_one_host_and_request_parameters() -> None:
    """Two deployments behind one host, or other envelope parameters, never share vectors."""
    base = {"input": {"path": "x.jsonl"}, "output": {"path": "out/run"}}

    def namespace(**provider: Any) -> str:
        spec = cache_spec(parse_config({**base, "provider": provider}), "run")
        assert spec is not None
        return spec.url

    a = namespace(base_url="https://gw.example.com/a/v1")
    assert a == namespace(base_url="https://gw.example.com/a/v1/")
    assert a != namespace(base_url="https://gw.example.com/b/v1")
    envelope = {"kind": "envelope", "base_url": "https://api.example.com"}
    assert namespace(**envelope) != namespace(**envelope, parameters={"instruction": "query"})


def test_a_cache_file_deleted_after_listing_reads_as_empty(tmp_path: Path) -> None:
    """A segment removed by another run between our listing and our read is simply absent."""
    fs = fsspec.filesystem("file")
    assert read_segment(fs, str(tmp_path / "gone.arrow")) is None
    assert read_segment(fs, str(tmp_path / "gone.parquet")) is None
