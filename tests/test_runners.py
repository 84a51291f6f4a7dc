"""The same job on other Beam runners: the portable path, multi-process workers, Dataflow's graph.

Every run goes through ``pipeline.run.execute`` with Beam options, exactly as ``embedpipe run
... --runner=...`` does, against an embedding server on loopback that requires an API key. The
key is only ever in process environments (this process's ``os.environ``, inherited by worker
subprocesses, or the ``env`` of the worker pool we start); never in Beam options.

Each runner's committed output must equal the output of the default in-memory FnApiRunner run on
the same corpus: the same chunk rows, the same vectors, the same rejects and a complete manifest
with the same counts (only the number of requests may differ: packing follows the runner's
bundles). Every run writes under its own folder, so its content-addressed cache (beside the
output, ``<output parent>/.embedpipe-cache``) is its own and no run is served from another's.

Runner configurations (all offline, all on this machine):

- ``in_memory``: the default FnApiRunner, the reference;
- ``portable_embedded``: ``--runner=PortableRunner --job_endpoint=embed
  --environment_type=LOOPBACK`` (job service and SDK worker inside this process);
- ``portable_job_server``: a separate job-server process
  (``apache_beam.runners.portability.local_job_service_main``) and an EXTERNAL worker pool
  process (``apache_beam.runners.worker.worker_pool_main``) that starts SDK worker processes;
  this is the stand-in for Flink's (and Spark's) portable job servers, which hand work to the
  same kind of worker pool. Beam's Python job server starts one SDK worker per job, so
  ``portable_job_server_2_workers`` also runs it with ``--direct_num_workers`` honoured: two
  SDK worker processes of the pool split the work;
- ``multi_processing``: the FnApiRunner with ``--direct_running_mode=multi_processing
  --direct_num_workers=2`` (two SDK worker subprocesses).

And the converse: with the key in the launcher's environment but not in the worker pool's, the
run aborts (exit 3) naming the variable: nothing carries the key from launcher to workers.

``test_dataflow_graph_translates_offline`` proves without a network that the graph built from
``configs/dataflow.yaml`` for the DataflowRunner translates to the runner API proto and back,
that every pickled DoFn, CombineFn and coder in it unpickles and pickles again, and that the API
key is in none of them, nor in the proto or the options. ``test_dataflow_runner_dry_run`` runs
the DataflowRunner's own translation (``--dry_run``) where ``apache-beam[gcp]`` is installed.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.pipeline_utils import group_by_key_input_visitor
from apache_beam.runners.portability.fn_api_runner import translations
from apache_beam.transforms import environments

from pipeline.config import load_config
from pipeline.graph import RunContext, build_pipeline, embed_settings
from pipeline.local_server import EmbeddingServer
from pipeline.run import RunRequest, beam_options, execute, resolve_workers
from tests.support.beam_services import (
    JOB_SERVER_HONOURING_NUM_WORKERS,
    WorkerPool,
    env_without,
    start_job_server,
    start_worker_pool,
)
from tests.support.checks import assert_run_complete
from tests.support.corpus import ExpectedCorpus, corpus_patterns, write_corpus
from tests.support.harness import MODEL, expected_chunks, make_config, read_output
from tests.support.pickle_scan import contains_key, unpickled_objects
from transforms.manifest import utc_now

KEY_ENV = "EMBEDPIPE_RUNNERS_TEST_KEY"
API_KEY = f"sk-runners-{secrets.token_hex(16)}"  # fresh per session: any trace of it is a leak
DIM = 64
RUN_TIMEOUT_S = 180.0
THIS_PROCESS = f"{socket.gethostname()}:{os.getpid()}"  # the `worker` of in-process usage rows

CHUNK_COLUMNS = ("id", "doc_id", "chunk_index", "char_start", "char_end", "n_tokens",
                 "content_sha256")


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_key() -> Iterator[str]:
    """The key in this process's environment: the launcher's preflight reads it here, and the
    in-process and multi-processing SDK workers (subprocesses of this one) inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, API_KEY)
        yield API_KEY


@pytest.fixture(scope="module")
def server(api_key: str) -> Iterator[EmbeddingServer]:
    with EmbeddingServer(dim=DIM, model=MODEL, api_key=api_key) as srv:
        yield srv


@dataclass
class Corpus:
    root: Path
    patterns: list[str]
    expected: ExpectedCorpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    expected = write_corpus(str(root))
    return Corpus(root, corpus_patterns(str(root)), expected)


@dataclass
class RunOutput:
    exit_code: int
    seconds: float
    manifest: dict
    tables: dict[str, pa.Table]
    workers: set[str]  # distinct `worker` values of the pipeline's usage rows (not the preflight)
    output: Path


def run_with(tmp_path_factory: pytest.TempPathFactory, name: str, corpus: Corpus,
             server: EmbeddingServer, beam_args: list[str], **sections: dict) -> RunOutput:
    """One run through ``execute``, in its own folder (output and cache), read back.

    The run goes on a daemon thread so that a runner that hangs fails the test after
    RUN_TIMEOUT_S instead of hanging the suite (the fixtures then stop its servers).
    """
    assert not any(API_KEY in arg for arg in beam_args)
    base = tmp_path_factory.mktemp(name)
    output = base / "out"
    cfg = make_config(corpus.patterns, str(output), server.base_url,
                      provider={"api_key_env": KEY_ENV}, **sections)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["code"] = execute(RunRequest(cfg, beam_args=beam_args, quiet=True))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=target, name=f"embedpipe-{name}", daemon=True)
    thread.start()
    thread.join(RUN_TIMEOUT_S)
    seconds = time.monotonic() - t0
    if thread.is_alive():
        pytest.fail(f"{name}: the run did not finish in {RUN_TIMEOUT_S:.0f}s")
    if "error" in outcome:
        raise outcome["error"]
    code = outcome["code"]
    manifest, tables = read_output(str(output))
    workers: set[str] = set()
    for entry in manifest["files"]:
        if entry["kind"] == "usage" and not entry["path"].endswith("-preflight.parquet"):
            workers |= set(pq.read_table(entry["path"]).column("worker").to_pylist())
    print(f"\n{name}: exit {code} in {seconds:.1f}s, {len(workers)} worker process(es) "
          f"in usage rows: {sorted(workers)}")
    return RunOutput(code, seconds, manifest, tables, workers, output)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus,
              server: EmbeddingServer) -> RunOutput:
    """The default runner (in-memory FnApiRunner): what every other runner must reproduce."""
    ref = run_with(tmp_path_factory, "in_memory", corpus, server, [])
    assert ref.exit_code == 0
    assert_run_complete(str(ref.output), corpus.expected, dim=DIM)  # every chunk, aligned
    assert ref.workers == {THIS_PROCESS}
    return ref


@pytest.fixture(scope="module")
def worker_pool(tmp_path_factory: pytest.TempPathFactory, api_key: str) -> Iterator[WorkerPool]:
    """An EXTERNAL SDK worker pool process on loopback; each worker it starts is a process.

    It is the only process given the API key, in its environment, and its SDK worker processes
    (which run the DoFns) inherit it. The pool starts workers as ``python -c ...`` from ``PATH``,
    so this venv's ``bin`` goes first.
    """
    yield from start_worker_pool(tmp_path_factory.mktemp("worker-pool"),
                                 {**env_without(KEY_ENV), KEY_ENV: api_key})


@pytest.fixture(scope="module")
def job_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Beam's own job server, as shipped."""
    yield from start_job_server(tmp_path_factory.mktemp("job-server"),
                                [sys.executable, "-m",
                                 "apache_beam.runners.portability.local_job_service_main"],
                                env_without(KEY_ENV))  # the job server runs no DoFn: no key


@pytest.fixture(scope="module")
def job_server_n_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Beam's job server that starts ``--direct_num_workers`` SDK workers per environment."""
    yield from start_job_server(tmp_path_factory.mktemp("job-server-n"),
                                [sys.executable, "-c", JOB_SERVER_HONOURING_NUM_WORKERS],
                                env_without(KEY_ENV))


# -- comparing two runs --------------------------------------------------------------------------


def chunk_rows(run: RunOutput) -> set[tuple]:
    table = run.tables["vectors"].select(list(CHUNK_COLUMNS))
    return {tuple(r[c] for c in CHUNK_COLUMNS) for r in table.to_pylist()}


def vectors_by_id(run: RunOutput) -> tuple[list[str], np.ndarray]:
    table = run.tables["vectors"].sort_by("id")
    matrix = table.column("embedding").combine_chunks().flatten().to_numpy()
    return table.column("id").to_pylist(), matrix.reshape(table.num_rows, -1)


def reject_rows(run: RunOutput) -> Counter[tuple[str, str]]:
    return Counter((r["source"], r["reason"]) for r in run.tables["rejects"].to_pylist())


def assert_same_output(run: RunOutput, ref: RunOutput, corpus: Corpus) -> None:
    assert run.exit_code == 0
    assert_run_complete(str(run.output), corpus.expected, dim=DIM)  # complete and aligned
    assert run.manifest["run_id"] != ref.manifest["run_id"]
    assert chunk_rows(run) == chunk_rows(ref)
    ids, got = vectors_by_id(run)
    ref_ids, want = vectors_by_id(ref)
    assert ids == ref_ids
    assert got.shape == want.shape == (len(ids), DIM)
    assert np.allclose(got, want, atol=1e-6)
    assert reject_rows(run) == reject_rows(ref)

    def comparable(manifest: dict) -> dict:
        # Requests (and their retries) follow the runner's bundles; everything else must not.
        counts = {k: v for k, v in manifest["counts"].items()
                  if k not in ("requests", "retries", "throttled")}
        return {"counts": counts, "rejects_by_reason": manifest["rejects_by_reason"],
                "usage": manifest["usage"], "cache": manifest.get("cache", {}) | {"path": None},
                "dimensions": manifest["dimensions"], "model": manifest["model"]}

    assert comparable(run.manifest) == comparable(ref.manifest)
    cache = run.manifest.get("cache") or {}
    if cache:  # each run has its own cache, beside its own output: nothing was served from it
        assert cache.get("hits") == 0 and cache["path"].startswith(str(run.output.parent))
    # However the requests were cut, the same texts were sent once each (+ the preflight).
    def inputs_sent(r: RunOutput) -> int:
        return sum(u["n_inputs"] for u in r.tables["usage"].to_pylist() if u["outcome"] == "ok")

    assert inputs_sent(run) == inputs_sent(ref)
    # The key is in no file of the output (nor in the run's cache).
    for path in run.output.parent.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert API_KEY.encode() not in data and API_KEY[8:24].encode() not in data, path


# -- the runners ---------------------------------------------------------------------------------


def test_portable_runner_embedded_job_service(tmp_path_factory, corpus, server, reference):
    """PortableRunner, job service embedded in this process, LOOPBACK SDK worker (a thread here)."""
    run = run_with(tmp_path_factory, "portable_embedded", corpus, server,
                   ["--runner=PortableRunner", "--job_endpoint=embed",
                    "--environment_type=LOOPBACK"])
    assert_same_output(run, reference, corpus)
    # LOOPBACK runs the SDK worker in the launching process: one process, this one.
    assert run.workers == {THIS_PROCESS}


def test_portable_runner_job_server_and_external_worker_pool(tmp_path_factory, corpus, server,
                                                             reference, job_server, worker_pool):
    """A separate job-server process hands the work to an SDK worker of an EXTERNAL worker pool.

    Beam's Python job server starts one SDK worker per environment whatever the options say
    (``--sdk_worker_parallelism`` is for Flink and Spark), so all the work is in one process.
    """
    run = run_with(tmp_path_factory, "portable_job_server", corpus, server,
                   ["--runner=PortableRunner", f"--job_endpoint={job_server}",
                    "--environment_type=EXTERNAL", f"--environment_config={worker_pool.address}",
                    "--sdk_worker_parallelism=2"])
    assert_same_output(run, reference, corpus)
    # The DoFns ran in the pool's worker process, which read the key from its environment.
    assert len(run.workers) >= 1 and THIS_PROCESS not in run.workers


def test_portable_runner_job_server_two_external_workers(tmp_path_factory, corpus, server,
                                                         reference, job_server_n_workers,
                                                         worker_pool):
    """The same, with the job server running two SDK worker processes from the pool."""
    run = run_with(tmp_path_factory, "portable_job_server_2_workers", corpus, server,
                   ["--runner=PortableRunner", f"--job_endpoint={job_server_n_workers}",
                    "--environment_type=EXTERNAL", f"--environment_config={worker_pool.address}",
                    "--direct_num_workers=2"],
                   limits={"workers": 2})  # the PortableRunner's options do not say it
    assert_same_output(run, reference, corpus)
    assert run.manifest["config"]["limits"]["workers"] == 2
    assert THIS_PROCESS not in run.workers
    assert len(run.workers) >= 2, run.workers


def test_workers_without_the_key_abort_even_though_the_launcher_has_it(
        tmp_path_factory, corpus, server, job_server):
    """The key does not travel with the job: the launcher has it (its preflight passes), the
    worker pool does not, so the workers stop at once, exit 3, naming the variable."""
    logs = tmp_path_factory.mktemp("worker-pool-without-key")
    pool = start_worker_pool(logs, env_without(KEY_ENV))
    address = next(pool).address
    try:
        run = run_with(tmp_path_factory, "portable_job_server_no_key", corpus, server,
                       ["--runner=PortableRunner", f"--job_endpoint={job_server}",
                        "--environment_type=EXTERNAL", f"--environment_config={address}"])
    finally:
        pool.close()
    assert run.exit_code == 3
    # Nothing embedded, nothing lost: every chunk is an `aborted` reject.
    checked = assert_run_complete(str(run.output), corpus.expected, dim=DIM, status="aborted",
                                  failed=expected_chunks(corpus.expected.documents))
    assert f"environment variable {KEY_ENV} is not set on worker" in run.manifest["error"]
    assert {r["reason"] for r in checked.embed_rejects.values()} == {"aborted"}
    reasons = Counter(run.tables["rejects"].column("reason").to_pylist())
    assert reasons["aborted"] == run.manifest["counts"]["chunks"]
    assert run.workers == set()  # no request left a worker: only the preflight's usage row


def test_fn_api_runner_multi_processing_two_workers(tmp_path_factory, corpus, server, reference):
    """The default runner with two SDK worker subprocesses (they inherit the key from this
    process's environment); it splits each stage's input between them.

    Not ``--runner=DirectRunner``: Beam 2.77's DirectRunner first tries to download Prism and
    runs there when it can (here, offline, it falls back to this same FnApiRunner).
    """
    args = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    run = run_with(tmp_path_factory, "multi_processing", corpus, server, args)
    assert_same_output(run, reference, corpus)
    assert THIS_PROCESS not in run.workers
    assert len(run.workers) >= 2, run.workers
    # Each process took half of the rate budget.
    cfg = make_config(corpus.patterns, "x", server.base_url)
    assert resolve_workers(cfg, beam_options(args)) == 2


# -- Dataflow, offline ---------------------------------------------------------------------------

REPO = Path(__file__).parents[1]
WORKER_IMAGE = "us-central1-docker.pkg.dev/my-project/embedpipe/worker:0.1.0"
DATAFLOW_ARGS = [
    "--runner=DataflowRunner", "--project=my-project", "--region=us-central1",
    "--temp_location=gs://my-bucket/tmp",  # Beam validates bucket and project names
    f"--sdk_container_image={WORKER_IMAGE}", "--sdk_location=container",
    "--max_num_workers=8", "--experiments=no_use_multiple_sdk_containers",
]
# Never submitted. Where apache-beam[gcp] is installed, building a Pipeline for Dataflow asks GCS
# about the temp bucket (minutes of timeouts offline) unless it is a dry run.
OFFLINE_DATAFLOW_ARGS = [*DATAFLOW_ARGS, "--dry_run=True"]

def test_dataflow_graph_translates_offline(api_key: str) -> None:
    """configs/dataflow.yaml, built for the DataflowRunner and translated without submitting.

    What ``DataflowRunner.run_pipeline`` does before it calls the service needs
    ``apache-beam[gcp]``; the steps that matter for our graph are done here with public Beam
    APIs: KV-typed deterministic keys for every GroupByKey, the runner API proto with the worker
    container as environment, Dataflow's batch optimisation phases, a round trip through the
    proto, and every pickled DoFn / CombineFn / coder unpickled and pickled again.
    """
    cfg = load_config(REPO / "configs" / "dataflow.yaml")
    assert all(p.startswith("gs://") for p in cfg.input.paths)
    assert cfg.output.path.startswith("gs://") and cfg.provider.api_key_env == "OPENAI_API_KEY"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cfg.provider.api_key_env, api_key)  # as if the launcher had it
        options = PipelineOptions(OFFLINE_DATAFLOW_ARGS)
        workers = resolve_workers(cfg, options)
        assert workers == 8  # --max_num_workers: each worker process takes 1/8 of the budget
        ctx = RunContext(run_id="dataflow-offline", started_at=utc_now(), workers=workers)
        pipeline = beam.Pipeline(options=options)
        assert type(pipeline.runner).__name__ == "DataflowRunner"
        build_pipeline(pipeline, cfg, ctx)  # no I/O: nothing touches gs:// here

        pipeline.visit(group_by_key_input_visitor(True))  # as DataflowRunner does (runner v2)
        environment = environments.DockerEnvironment.from_container_image(WORKER_IMAGE)
        proto = pipeline.to_runner_api(default_environment=environment)
        optimized = translations.optimize_pipeline(
            proto, phases=[translations.pack_combiners, translations.sort_stages],
            known_runner_urns=frozenset(), partial=True)

        # The proto holds the whole graph, every stage in the worker container.
        names = {t.unique_name for t in proto.components.transforms.values()}
        for stage in ("ReadCorpus", "ValidateDocuments", "SplitChunks", "EmbedChunks",
                      "WriteVectors", "WriteUsage", "WriteIds", "WriteReadRejects",
                      "WriteValidateRejects", "WriteSplitRejects", "WriteEmbedRejects",
                      "CommitManifest"):
            assert stage in names
        assert {e.urn for e in proto.components.environments.values()} == {
            common_urns.environments.DOCKER.urn}
        for env in proto.components.environments.values():
            payload = beam_runner_api_pb2.DockerPayload.FromString(env.payload)
            assert payload.container_image == WORKER_IMAGE

        # Round trip: the graph rebuilt from the proto translates to the same transforms.
        restored = beam.Pipeline.from_runner_api(proto, pipeline.runner, options)
        again = restored.to_runner_api(default_environment=environment)
        assert {t.unique_name for t in again.components.transforms.values()} == names

        # Every pickled object survives; the key is in none of them, nor in the proto or options.
        objects, leaks = unpickled_objects(proto, api_key)
        optimized_objects, optimized_leaks = unpickled_objects(optimized, api_key)
        assert leaks == optimized_leaks == []
        ours = {type(o).__name__ for o in objects + optimized_objects
                if isinstance(o, beam.DoFn) and type(o).__module__.split(".")[0] in (
                    "transforms", "pipeline")}
        assert {"EmbedChunksFn", "_WriteShardsFn"} <= ours, ours
        assert any("Commit" in name for name in ours), ours
        print(f"\ndataflow: {len(proto.components.transforms)} transforms, "
              f"{len(objects)} pickled objects ({len(optimized_objects)} after optimisation), "
              f"{len(proto.SerializeToString())} proto bytes; our DoFns: {sorted(ours)}")
        for blob in (proto.SerializeToString(), optimized.SerializeToString(),
                     again.SerializeToString()):
            assert not contains_key(blob, api_key)
        shipped = json.dumps(options.get_all_options(retain_unknown_options=True), default=str)
        assert not contains_key(shipped.encode(), api_key)
        assert os.environ[cfg.provider.api_key_env] == api_key  # it was there all along


def test_dataflow_runner_dry_run(api_key: str) -> None:
    """The DataflowRunner's own translation, up to the job it would submit (``--dry_run``).

    It needs ``apache-beam[gcp]``, which this project's environment does not install: there the
    test above stands in for it. With the extra installed this runs offline too.
    """
    pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient",
                        reason="the DataflowRunner needs apache-beam[gcp], not installed here")
    cfg = load_config(REPO / "configs" / "dataflow.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cfg.provider.api_key_env, api_key)
        options = PipelineOptions([*OFFLINE_DATAFLOW_ARGS, "--no_auth"])
        ctx = RunContext(run_id="dataflow-dry-run", started_at=utc_now(),
                         workers=resolve_workers(cfg, options))
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, cfg, ctx)
        pipeline.run().wait_until_finish()
        proto = pipeline.runner.proto_pipeline
        objects, leaks = unpickled_objects(proto, api_key)
        assert leaks == [] and objects
        assert not contains_key(proto.SerializeToString(), api_key)
        assert not contains_key(str(pipeline.runner.job.proto).encode(), api_key)
        shipped = json.dumps(options.get_all_options(retain_unknown_options=True), default=str)
        assert not contains_key(shipped.encode(), api_key)


def test_key_scan_finds_a_captured_key(api_key: str) -> None:
    """The scan above is not vacuous: a DoFn that captured the key is caught."""
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    _ = pipeline | beam.Create([1]) | beam.Map(lambda x, k=api_key: (x, k))
    proto = pipeline.to_runner_api()
    assert not contains_key(proto.SerializeToString(), api_key)  # hidden in the bytes...
    _, leaks = unpickled_objects(proto, api_key)
    assert leaks == [python_urns.PICKLED_DOFN_INFO]  # ...and found in the pickle


@pytest.mark.parametrize(("name", "args", "workers"), [
    ("dataflow.yaml", DATAFLOW_ARGS, 8),
    ("flink.yaml", ["--runner=FlinkRunner", "--flink_master=flink-jobmanager:8081",
                    "--environment_type=EXTERNAL", "--environment_config=localhost:50000",
                    "--parallelism=6"], 6),
])
def test_runner_configs_share_the_budget(name: str, args: list[str], workers: int) -> None:
    cfg = load_config(REPO / "configs" / name)
    options = PipelineOptions(args)
    assert resolve_workers(cfg, options) == workers
    ctx = RunContext(run_id="share", started_at=utc_now(), workers=workers)
    share = embed_settings(cfg, ctx).limits
    assert share.requests_per_minute == pytest.approx(cfg.limits.requests_per_minute / workers)
    assert share.tokens_per_minute == pytest.approx(cfg.limits.tokens_per_minute / workers)
