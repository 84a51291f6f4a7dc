"""``embedpipe run``: config → checks → pipeline options → graph → run → manifest → exit code.

Exit codes (the contract, tabled in :mod:`pipeline.exit_codes`): 0 every valid chunk was
embedded; 1 the run finished but some chunks (or whole input files) failed, each one in
``rejects/``; 2 bad arguments or config, found before any API call; 3 aborted by a fatal provider
answer, with the work already committed kept; 4 the pipeline itself crashed (a bug or a runner
failure): see the traceback.

``execute(request, test_pipeline=None)`` lets tests inject a pipeline, as in dataflow-ml-starter;
the command line (``pipeline.cli``) only parses arguments into a :class:`RunRequest`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import apache_beam as beam
import fsspec
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
)

from pipeline.checks import check_storage
from pipeline.config import Config
from pipeline.exit_codes import EXIT_CRASHED, EXIT_FAILED_CHUNKS, EXIT_FATAL_PROVIDER, EXIT_OK
from pipeline.graph import RunContext, build_pipeline, embed_settings, output_spec, run_info
from pipeline.output_dir import OutputLease, PreviousRun, prepare_output, retire_previous
from pipeline.report import print_summary
from transforms.embed import BatchOutcome, EmbedSession
from transforms.errors import ConfigError, StoreError
from transforms.manifest import (
    STATUS_ABORTED,
    TEMPORARY,
    aborted_manifest_url,
    build_manifest,
    commit_url,
    manifest_url,
    read_json,
    read_manifest,
    utc_now,
    write_json_atomically,
)
from transforms.pack import make_request_batch
from transforms.providers.base import CANNOT_CONNECT, NO_ANSWER
from transforms.retry import RetryPolicy
from transforms.types import PROVIDER_REJECTED, Chunk
from transforms.write import USAGE, write_rows

log = logging.getLogger("embedpipe")

DEFAULT_RUNNER = "FnApiRunner"  # offline, in-process; never downloads a runner binary
LOCAL_RUNNERS = {"fnapirunner", "directrunner", "bundlebaseddirectrunner", "switchingdirectrunner"}
PREFLIGHT_TEXT = "embedpipe preflight"
PROGRESS_INTERVAL_S = 5.0


@dataclass
class RunRequest:
    """A parsed ``run`` command line."""

    cfg: Config
    beam_args: list[str] = field(default_factory=list)
    quiet: bool = False


def beam_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Beam options as given, with the offline default runner when none is named."""
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append(f"--runner={DEFAULT_RUNNER}")
    return PipelineOptions(args)


def is_local_runner(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner or DEFAULT_RUNNER
    return str(runner).rsplit(".", 1)[-1].lower() in LOCAL_RUNNERS


def resolve_workers(cfg: Config, options: PipelineOptions) -> int:
    """Worker processes that share the rate budget: config, else derived from Beam options."""
    if cfg.limits.workers != "auto":
        return int(cfg.limits.workers)
    direct = options.view_as(DirectOptions)
    if is_local_runner(options):
        if direct.direct_running_mode == "multi_processing":
            return max(1, direct.direct_num_workers or 1)
        return 1
    worker = options.view_as(WorkerOptions)
    for value in (worker.max_num_workers, worker.num_workers):
        if value:
            return int(value) * dataflow_processes_per_worker(options)
    parallelism = options.get_all_options().get("parallelism")
    return int(parallelism) if parallelism and int(parallelism) > 0 else 1


_VCPUS = re.compile(r"^(?:custom-(\d+)-\d+|[a-z0-9]+-[a-z]+-(\d+))")


def dataflow_processes_per_worker(options: PipelineOptions) -> int:
    """SDK processes per Dataflow VM: one per vCPU unless multiple SDK containers are off.

    Each process has its own limiter, so they all count in the budget's share. The vCPUs come
    from the machine type (``n2-standard-8`` → 8, ``custom-4-16384`` → 4); Dataflow's default
    batch machine has one.
    """
    experiments = options.view_as(DebugOptions).experiments or []
    if "no_use_multiple_sdk_containers" in experiments:
        return 1
    machine = options.view_as(WorkerOptions).machine_type or ""
    match = _VCPUS.match(machine.rsplit("/", 1)[-1])
    return int(match.group(1) or match.group(2)) if match else 1


def api_key_for(cfg: Config) -> str | None:
    return os.environ.get(cfg.provider.api_key_env) if cfg.provider.api_key_env else None


def close_runner_data_race() -> None:
    """Make the FnApiRunner's data channel to its SDK workers flush by size, never by timer.

    In Beam 2.77 the runner sends data to worker processes (``multi_processing``) through a
    stream that a timer thread flushes every second with ``get()`` then ``clear()``, while the
    runner's own thread goes on writing without the lock: a write between the two is wiped and
    never sent. That lost whole blobs of vectors (1,616 and 5,376 chunks in two runs of 100k)
    when vectors crossed from one stage to another. The graph no longer sends vectors through
    the runner, and the commit step's accounting refuses an output that misses any chunk; this
    closes the race for what still crosses (file lists, counts). A timer of 0 selects Beam's
    size-based stream, the one its SDK workers use in the other direction.
    """
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 0


def preflight(cfg: Config, ctx: RunContext, api_key: str | None) -> BatchOutcome:
    """One one-word request before anything starts, so a bad key, model or URL fails in seconds.

    It goes through the same session as the pipeline (provider, limiter, classification) with a
    short retry policy, and its usage row is written like any other: every HTTP attempt is
    accounted for. A 429 or 503 that outlasts the short policy is let through; the pipeline has
    the full retry policy. A server that never answers is not: three attempts of
    ``provider.timeout_s`` end the run (:func:`preflight_failure`), where the pipeline would
    wait that long for every request. The short policy's ``max_wait_s`` also bounds the
    limiter's pauses, so a ``Retry-After: 3600`` costs the preflight two seconds, not an hour.
    """
    settings = replace(
        embed_settings(cfg, ctx), max_concurrency=1, progress_interval_s=None,
        retry=RetryPolicy(max_attempts=3, max_wait_s=2.0, initial_wait_s=0.5),
    )
    session = EmbedSession(settings, api_key=api_key)
    try:
        chunk = Chunk(chunk_id="preflight#0", doc_id="preflight", chunk_index=0, char_start=0,
                      char_end=len(PREFLIGHT_TEXT), n_tokens=2, content_sha256="",
                      text=PREFLIGHT_TEXT, source="embedpipe preflight")
        return session.embed_batch(make_request_batch((chunk,)))
    finally:
        session.close()


def preflight_failure(cfg: Config, outcome: BatchOutcome) -> str | None:
    """Why the preflight says the run cannot work, with what to check; None if it can.

    It cannot when the provider refused it (fatal, or the one input rejected), when no attempt
    could connect, when no attempt got any answer within ``provider.timeout_s``, or when the
    server redirects (fatal: a redirect is never followed).
    """
    p = cfg.provider
    last = outcome.usage[-1] if outcome.usage else None
    status = last.http_status if last else None
    errors = [u.error or "" for u in outcome.usage if u.http_status is None]
    unanswered = bool(outcome.usage) and len(errors) == len(outcome.usage)
    never_connected = unanswered and all(CANNOT_CONNECT in e for e in errors)
    timed_out = unanswered and all(CANNOT_CONNECT in e or NO_ANSWER in e for e in errors)
    if outcome.fatal is not None:
        problem = outcome.fatal
    elif outcome.rejects and (outcome.rejects[0].reason == PROVIDER_REJECTED or never_connected):
        problem = outcome.rejects[0].detail
    elif outcome.rejects and timed_out:
        return (f"{NO_ANSWER} provider.timeout_s={p.timeout_s:g}s in {len(errors)} attempts: "
                f"the server at {p.base_url} takes connections but does not answer — check that "
                "it is up and not stuck (or raise provider.timeout_s if it is only that slow)")
    else:
        return None  # it answered, if badly: the pipeline's full retry policy takes over
    hint = {
        401: f"check the key in ${p.api_key_env}",
        403: f"check that the key in ${p.api_key_env} may use model {p.model!r} and has quota",
        404: f"check provider.base_url ({p.base_url}) and provider.model ({p.model!r})",
        None: f"check that provider.base_url ({p.base_url}) is reachable from here",
    }.get(status, "check the provider settings (model, dimensions) and the account's quota")
    if status is not None and 300 <= status < 400:
        hint = f"check provider.base_url ({p.base_url}): it redirects"
    return f"{problem} — {hint}"


def execute(
    request: RunRequest, test_pipeline: beam.Pipeline | None = None
) -> int:
    """Run one job and return its exit code; prints the run summary."""
    cfg = request.cfg
    options = beam_options(request.beam_args)
    api_key = api_key_for(cfg)
    if cfg.provider.api_key_env and not api_key and is_local_runner(options):
        raise ConfigError(
            f"environment variable {cfg.provider.api_key_env} is not set; export the API key "
            "there (or set provider.api_key_env: null for a server without authentication)",
            key="provider.api_key_env",
        )
    check_storage(cfg)  # before the lease, the preflight or any read: exit 2, not a traceback
    ctx = RunContext(
        run_id=f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}",
        started_at=utc_now(),
        workers=resolve_workers(cfg, options),
        progress_interval_s=None if request.quiet else PROGRESS_INTERVAL_S,
    )
    # The lease is this run's marker: no manifest is written until the run commits, so the
    # one in place (a complete run being replaced, an aborted one being resumed) stays readable.
    with OutputLease(cfg.output.path, cfg.output.storage_options, ctx.run_id) as lease:
        previous = prepare_output(cfg.output.path, cfg.output.storage_options,
                                  cfg.output.overwrite)
        code = _run_holding_the_lease(request, cfg, options, replace(ctx, leased=True),
                                     api_key, previous, test_pipeline)
        if lease.lost and code != EXIT_CRASHED:
            log.error("embedpipe: run %s lost the output's lease (%s)", ctx.run_id, lease.lost)
    return code


def _run_holding_the_lease(request: RunRequest, cfg: Config, options: PipelineOptions,
                           ctx: RunContext, api_key: str | None, previous: PreviousRun,
                           test_pipeline: beam.Pipeline | None) -> int:
    spec = output_spec(cfg, ctx)
    if cfg.provider.preflight and (api_key or not cfg.provider.api_key_env):
        outcome = preflight(cfg, ctx, api_key)
        usage_file = write_rows(USAGE, outcome.usage, spec,
                                name=f"part-{ctx.run_id}-preflight.parquet")
        failure = preflight_failure(cfg, outcome)
        if failure is not None:
            log.error("embedpipe: %s", failure)
            manifest = build_manifest(run_info(cfg, ctx), [usage_file], records_read=0,
                                      documents_valid=0, chunks=0, fatal=[failure])
            fs, root = spec.filesystem()
            if fs.exists(f"{root}/{TEMPORARY}"):
                fs.rm(f"{root}/{TEMPORARY}", recursive=True)
            where = commit_url(cfg.output.path, manifest, cfg.output.storage_options)
            write_json_atomically(where, manifest, cfg.output.storage_options)
            if where == manifest_url(cfg.output.path):  # it replaced an aborted run
                retire_previous(cfg.output.path, cfg.output.storage_options, previous)
            else:
                log.error("embedpipe: the complete run %s in %s is kept; this run's manifest is "
                          "%s", (previous.manifest or {}).get("run_id"), cfg.output.path, where)
            return EXIT_FATAL_PROVIDER
        served = next((b.vectors.shape[1] for b in outcome.batches if len(b)), None)
        ctx = replace(ctx, extra_files=(usage_file,), served_dim=served)

    if is_local_runner(options):
        close_runner_data_race()
    t0 = time.monotonic()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(pipeline, cfg, ctx)
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except Exception as exc:
        refused = re.search(r"(?:AccountingError|LeaseLostError): (.*?)(?: \[while running|$)",
                            str(exc), re.DOTALL)
        dead_store = store_failure(exc) or (None if refused else output_unwritable(cfg, ctx))
        if refused:  # the commit step refused to commit: say why plainly, not as a crash dump
            log.error("embedpipe: %s (run %s)", refused.group(1).strip(), ctx.run_id)
        elif dead_store:  # the output or cache died: name it, not a crash dump
            log.error("embedpipe: %s; nothing was committed for run %s", dead_store, ctx.run_id)
        else:
            log.exception("embedpipe: the pipeline failed; nothing was committed for run %s",
                          ctx.run_id)
        return EXIT_CRASHED
    wall_s = time.monotonic() - t0
    manifest = read_manifest(cfg.output.path, cfg.output.storage_options) or {}
    if manifest.get("run_id") == ctx.run_id:
        retire_previous(cfg.output.path, cfg.output.storage_options, previous)
    else:
        manifest = read_json(aborted_manifest_url(cfg.output.path, ctx.run_id),
                             cfg.output.storage_options) or {}
        if manifest.get("run_id") != ctx.run_id:
            log.error("embedpipe: the pipeline finished but did not commit a manifest to %s",
                      cfg.output.path)
            return EXIT_CRASHED
        log.error("embedpipe: the complete run %s in %s is kept; this aborted run's manifest is "
                  "%s", (previous.manifest or {}).get("run_id"), cfg.output.path,
                  aborted_manifest_url(cfg.output.path, ctx.run_id))
    if not request.quiet:
        print_summary(manifest, cfg, wall_s, pipeline_metrics(result))
    return exit_code_for(manifest)


def store_failure(exc: BaseException) -> str | None:
    """The message of the :class:`StoreError` that failed the pipeline, if one did.

    Runners re-raise a DoFn's error wrapped (FnApiRunner: a ``RuntimeError`` whose text is the
    original message plus ``[while running 'STEP']``), so the cause chain is walked first, then
    the text is matched.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, StoreError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"(the (?:cache|output) at \S+ cannot be written.*?)(?: \[while running|$)",
                      str(exc), re.DOTALL)
    return found.group(1).strip() if found else None


def output_unwritable(cfg: Config, ctx: RunContext) -> str | None:
    """Why the output cannot be written, if a tiny write there fails now; else None.

    Run after the pipeline failed, so that a failure of the output store (the Parquet writers'
    own errors are a runner's traceback) is reported as what it is, naming the store.
    """
    try:
        fs, root = fsspec.core.url_to_fs(cfg.output.path, **cfg.output.storage_options)
        probe = f"{root.rstrip('/')}/_temporary/{ctx.run_id}/alive-launcher"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001 - any failure means the store is not usable
        return (f"the output at {cfg.output.path} cannot be written ({type(exc).__name__}: "
                f"{exc}); check that the store is up and writable and run again")
    return None


def pipeline_metrics(result: beam.runners.runner.PipelineResult) -> dict[str, Any]:
    """The ``embedpipe`` Beam metrics of a finished run: counters, and distributions as dicts.

    Runners that do not report metrics (or report them late) give an empty mapping.
    """
    try:
        found = result.metrics().query(MetricsFilter().with_namespace("embedpipe"))
    except Exception:  # noqa: BLE001 - metrics are informative; never fail a run over them
        return {}
    out: dict[str, Any] = {}
    for counter in found.get("counters", []):
        out[counter.key.metric.name] = out.get(counter.key.metric.name, 0) + counter.committed
    for dist in found.get("distributions", []):
        value = dist.committed
        if value is not None and value.count:
            out[dist.key.metric.name] = {"count": value.count, "mean": value.mean,
                                         "min": value.min, "max": value.max}
    return out


def exit_code_for(manifest: dict) -> int:
    if manifest.get("status") == STATUS_ABORTED:
        return EXIT_FATAL_PROVIDER
    counts = manifest.get("counts", {})
    if counts.get("chunks_failed", 0) or counts.get("files_failed", 0):
        return EXIT_FAILED_CHUNKS
    return EXIT_OK
