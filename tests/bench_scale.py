"""``make bench-scale``: what embedpipe costs at scale, next to a bare client doing the same job.

The rate-limit benchmark (``make bench``) asks how close embedpipe runs to a provider's limit;
this one takes the provider out of the picture to ask what embedpipe *itself* costs as corpora
grow: wall time, chunks/s, peak memory of the whole process tree (Beam worker processes
included), and how long it takes before the first embedding request leaves. Each figure is set
against a bare client (:mod:`tests.support.bare_client`: asyncio + httpx + numpy + pyarrow, no
framework) that embeds the same corpus against the same server in the same run, so the ratio
``embedpipe chunks/s / bare chunks/s`` says how much of the machine embedpipe's machinery takes,
independently of how fast the machine is.

Per size (default 20k, 200k and 1M chunks):

1. a seeded corpus of distinct one-chunk documents (~60 words) as JSONL.gz, generated once and
   cached in the work folder (``--workdir``; default a temporary folder removed at the end);
2. the fast server (:mod:`tests.support.fast_server`, its own process: precomputed vectors, no
   latency, no rate limit), restarted per size and reset before every measured run;
3. the bare client (``--skip-bare`` to leave it out), then ``python -m pipeline run --quiet``
   with a fresh output and a cold cache, then with ``--rerun`` the same run again with
   ``--overwrite`` (unchanged corpus, warm cache).

Every measured program is a subprocess of this one. Wall time runs from spawn to exit; peak RSS
is the maximum over time (sampled every 0.1 s from ``/proc``) of the *sum* of the RSS of the
process and all its descendants, which over-counts pages shared between them (small here: Beam
starts its workers as fresh interpreters). "First request" is the server's arrival time of the
first ``/v1/embeddings`` request minus the spawn time; for embedpipe that is the one-input
preflight, so "first batch" (the first request with more than one input) is reported too.
Each run's line also gives its CPU seconds (``wait4`` rusage: reaped descendants included), the
server's CPU seconds during it, and the 1-minute load average before it: on a shared machine a
busy neighbour skews every figure, and the load says when one did.

Outputs are large (a million 1536-dimension vectors are 6 GB per copy): the bare client's file
is deleted once its row count is checked, embedpipe's output and cache after each size unless
``--keep-outputs``.

After each embedpipe run the manifest must say ``complete`` with ``chunks_embedded`` equal to
the corpus size; anything else is reported as data loss and makes the exit code 1.

    python -m tests.bench_scale [--sizes 20000,200000,1000000] [--dim 1536] [--rerun]
        [--no-cache] [--skip-bare | --bare-only] [--beam-args "--direct_num_workers=2 ..."]
        [--workdir DIR] [--json FILE] [--keep-outputs] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from tests.support.fast_server import FastServerProcess
from tests.support.proctree import TreeSampler, cpu_seconds

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (20_000, 200_000, 1_000_000)
WORDS_PER_DOC = 60
CORPUS_SEED = 20_000
MODEL = "bench-model"
MB = 1024 * 1024

# Plain lower-case words: a corpus line can then be written without JSON escaping.
WORDS = [
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world",
    "school", "state", "family", "student", "group", "country", "problem", "hand", "part", "place",
    "case", "week", "company", "system", "program", "question", "work", "government", "number",
    "night", "point", "home", "water", "room", "mother", "area", "money", "story", "fact", "month",
    "lot", "right", "study", "book", "eye", "job", "word", "business", "issue", "side", "kind",
    "head", "house", "service", "friend", "father", "power", "hour", "game", "line", "end",
    "member", "law", "car", "city", "community", "name", "president", "team", "minute", "idea",
    "kid", "body", "information", "back", "parent", "face", "others", "level", "office", "door",
    "health", "person", "art", "war", "history", "party", "result", "change", "morning", "reason",
    "research", "girl", "guy", "moment", "air", "teacher", "force", "education", "river", "stone",
    "bridge", "lantern", "harbour", "meadow", "orchard", "valley", "summit", "glacier", "canyon",
    "delta", "market", "ledger", "invoice", "tariff", "dividend", "merger", "audit", "pension",
    "orbit", "comet", "nebula", "galaxy", "telescope", "survey", "quasar", "pulsar", "photon",
    "spectrum", "lens", "mirror", "sauce", "butter", "garlic", "thyme", "simmer", "roast", "bake",
    "knead", "dough", "yeast", "bond", "yield", "equity", "rate", "inflation", "budget", "stadium",
    "striker", "keeper", "match", "league", "season", "signal", "network", "packet", "router",
    "server", "client", "cache", "buffer", "thread", "kernel", "memory", "storage", "archive",
    "record", "sample", "batch", "vector", "matrix", "tensor", "model", "forest", "desert",
    "island", "ocean", "harbor", "village", "castle", "tower", "garden", "field", "mountain",
    "lake", "storm", "thunder",
]
assert all(w.isalpha() and w.islower() for w in WORDS)


# --------------------------------------------------------------------------------------------
# Corpus


def corpus_path(workdir: Path, n: int, seed: int = CORPUS_SEED) -> Path:
    return workdir / "corpora" / f"corpus-{n}-w{WORDS_PER_DOC}-s{seed}.jsonl.gz"


def ensure_corpus(workdir: Path, n: int, seed: int = CORPUS_SEED) -> tuple[Path, float]:
    """The corpus of ``n`` one-chunk documents, generated unless cached; (path, seconds spent)."""
    path = corpus_path(workdir, n, seed)
    if path.exists():
        return path, 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    block = 10_000
    with gzip.open(tmp, "wb", compresslevel=1) as f:
        for start in range(0, n, block):
            # The index in the text makes every text distinct (the cache dedups identical ones).
            lines = [
                f'{{"id": "doc-{i:07d}", "text": "Record {i}: '
                f'{" ".join(rng.choices(WORDS, k=WORDS_PER_DOC - 2))}."}}\n'
                for i in range(start, min(start + block, n))
            ]
            f.write("".join(lines).encode("ascii"))
    tmp.replace(path)
    return path, time.monotonic() - t0


# --------------------------------------------------------------------------------------------
# Measured runs


@dataclass
class Run:
    """One measured subprocess run."""

    name: str
    exit_code: int
    wall_s: float
    peak_rss_mb: float
    peak_processes: int
    cpu_s: float
    server_cpu_s: float
    requests: int
    inputs: int
    first_request_s: float | None
    first_batch_s: float | None
    chunks_per_s: float | None  # None once the run failed: a crash's throughput means nothing
    load_before: float
    timed_out: bool = False
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    log: str = ""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the run's own process group (its session: the run and its workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def measure(name: str, cmd: list[str], log_path: Path, server: FastServerProcess,
            chunks: int, timeout_s: float | None) -> Run:
    """Run ``cmd`` from the repo root against a freshly reset server and measure it."""
    server.reset()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server_cpu = cpu_seconds(server.proc.pid)
    load_before = os.getloadavg()[0]
    with log_path.open("wb") as log:
        spawned_at = time.time()
        t0 = time.monotonic()
        # Its own session, so a timeout or Ctrl-C can end the run with all its workers.
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timer = threading.Timer(timeout_s, _kill_group, (proc,)) if timeout_s else None
        if timer:
            timer.start()
        try:
            with TreeSampler(proc.pid) as sampler:
                # wait4, not Popen.wait: its rusage holds the CPU time of the child and of
                # every descendant it reaped (Beam's worker processes).
                _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
        wall = time.monotonic() - t0
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    _kill_group(proc)  # workers the run left behind would skew the next measurement
    server_cpu = cpu_seconds(server.proc.pid) - server_cpu
    stats = server.stats()

    def since_spawn(key: str) -> float | None:
        return None if stats[key] is None else stats[key] - spawned_at

    run = Run(name=name, exit_code=code, wall_s=wall, peak_rss_mb=sampler.peak_rss / MB,
              peak_processes=sampler.peak_processes, cpu_s=usage.ru_utime + usage.ru_stime,
              server_cpu_s=server_cpu, requests=stats["requests"],
              inputs=stats["inputs"], first_request_s=since_spawn("first_request_time"),
              first_batch_s=since_spawn("first_batch_time"), chunks_per_s=chunks / wall,
              load_before=load_before, log=str(log_path))
    if timeout_s and wall >= timeout_s:
        run.timed_out = True
        fail(run, f"killed after the {timeout_s:.0f} s timeout")
    return run


def fail(run: Run, problem: str) -> None:
    run.ok = False
    run.chunks_per_s = None
    run.problems.append(problem)


def run_bare(server: FastServerProcess, corpus: Path, n: int, dim: int, folder: Path,
             timeout_s: float | None) -> Run:
    out = folder / "bare.parquet"
    cmd = [sys.executable, "-m", "tests.support.bare_client", "--base-url", server.base_url,
           "--corpus", str(corpus), "--out", str(out), "--dim", str(dim), "--model", MODEL]
    run = measure("bare", cmd, folder / "logs" / "bare.log", server, n, timeout_s)
    if run.exit_code != 0:
        fail(run, f"bare client failed, exit code {run.exit_code}")
        return run
    rows = pq.ParquetFile(out).metadata.num_rows
    run.counts = {"rows_written": rows}
    if rows != n:
        fail(run, f"bare client wrote {rows} rows, expected {n}")
    if run.inputs != n:
        fail(run, f"server saw {run.inputs} inputs from the bare client, expected {n}")
    return run


def write_config(path: Path, corpus: Path, output: Path, cache: Path | None,
                 base_url: str) -> None:
    config = {
        "input": {"path": str(corpus)},
        "split": {"max_tokens": 512, "overlap_tokens": 64},
        "provider": {
            "kind": "openai", "base_url": base_url, "model": MODEL, "api_key_env": None,
            "encoding_format": "base64", "dimensions": None,
            "max_inputs_per_request": 256, "max_tokens_per_request": 1_000_000,
        },
        "limits": {"requests_per_minute": 10_000_000, "tokens_per_minute": 10_000_000_000,
                   "max_concurrency": 16},
        "output": {"path": str(output)},
        "cache": {"enabled": True, "path": str(cache)} if cache else {"enabled": False},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def run_embedpipe(name: str, server: FastServerProcess, config: Path, output: Path, n: int,
                  beam_args: list[str], folder: Path, overwrite: bool,
                  timeout_s: float | None) -> Run:
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", str(config), "--quiet",
           *(["--overwrite"] if overwrite else []), *beam_args]
    run = measure(name, cmd, folder / "logs" / f"embedpipe-{name}.log", server, n, timeout_s)
    manifest_path = output / "manifest.json"
    if not manifest_path.exists():
        fail(run, f"no manifest at {manifest_path}: the run committed nothing")
        return run
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    counts = manifest.get("counts", {})
    cache = manifest.get("cache", {})
    run.counts = {"status": manifest.get("status"), "chunks": counts.get("chunks"),
                  "chunks_embedded": counts.get("chunks_embedded"),
                  "chunks_failed": counts.get("chunks_failed"),
                  "requests": counts.get("requests"), "cache_hits": cache.get("hits"),
                  "cache_misses": cache.get("misses")}
    if manifest.get("status") != "complete":
        fail(run, f"run not complete: manifest status {manifest.get('status')!r}, "
                  f"error {manifest.get('error')!r}")
    elif counts.get("chunks_embedded") != n or counts.get("chunks") != n:
        fail(run, f"DATA LOSS: {counts.get('chunks')} chunks, {counts.get('chunks_embedded')} "
                  f"embedded, expected {n}")
    if run.exit_code != 0:
        fail(run, f"embedpipe exit code {run.exit_code} (log: {run.log})")
    return run


# --------------------------------------------------------------------------------------------
# Reporting


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def _cell(run: Run | None, attr: str, spec: str = ".1f") -> str:
    return "n/a" if run is None else _fmt(getattr(run, attr), spec)


def print_run(n: int, run: Run) -> None:
    first = "" if run.name == "bare" else (
        f"  first request {_fmt(run.first_request_s, '.2f')} s"
        f", first batch {_fmt(run.first_batch_s, '.2f')} s")
    print(f"[{n:>9,}] {run.name:<9} exit {run.exit_code}  wall {run.wall_s:7.1f}s  "
          f"{_fmt(run.chunks_per_s, '.0f'):>8} chunks/s  peak {run.peak_rss_mb:7.0f} MB "
          f"({run.peak_processes} procs)  cpu {run.cpu_s:.1f}s (server {run.server_cpu_s:.1f}s)  "
          f"load {run.load_before:.1f}  "
          f"requests {run.requests}  inputs {run.inputs}{first}"
          f"  {run.counts}", flush=True)
    for problem in run.problems:
        print(f"[{n:>9,}] !!! {run.name}: {problem}", flush=True)
    if not run.ok and run.exit_code != 0:
        lines = Path(run.log).read_text(encoding="utf-8", errors="replace").splitlines()
        print("\n".join(f"    | {line}" for line in lines[-25:]), flush=True)


def print_table(results: list[dict[str, Any]], rerun: bool) -> None:
    columns = ["chunks", "embedpipe wall s", "chunks/s", "peak RSS MB", "first request s",
               "first batch s", "bare wall s", "bare chunks/s", "bare peak MB", "ratio"]
    if rerun:
        columns += ["rerun wall s", "rerun peak MB", "rerun requests", "rerun/first"]
    columns.append("ok")
    rows = []
    for r in results:
        ep: Run | None = r["embedpipe"]
        bare: Run | None = r["bare"]
        again: Run | None = r["rerun"]
        ratio = ep.chunks_per_s / bare.chunks_per_s \
            if ep and bare and ep.chunks_per_s and bare.chunks_per_s else None
        row = [f"{r['chunks']:,}", _cell(ep, "wall_s"), _cell(ep, "chunks_per_s", ".0f"),
               _cell(ep, "peak_rss_mb", ".0f"), _cell(ep, "first_request_s", ".2f"),
               _cell(ep, "first_batch_s", ".2f"), _cell(bare, "wall_s"),
               _cell(bare, "chunks_per_s", ".0f"), _cell(bare, "peak_rss_mb", ".0f"),
               _fmt(ratio, ".2f")]
        if rerun:
            row += [_cell(again, "wall_s"), _cell(again, "peak_rss_mb", ".0f"),
                    _cell(again, "requests", "d"),
                    _fmt(again.wall_s / ep.wall_s if again and ep and again.ok and ep.ok
                         else None, ".2f")]
        runs = [x for x in (ep, bare, again) if x is not None]
        row.append("yes" if all(x.ok for x in runs) else "NO")
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |")
    print("ratio = embedpipe chunks/s / bare chunks/s; peak RSS = max over time of the summed "
          "RSS of the process tree; first request/batch = seconds from spawn to the server's "
          "first request / first request with more than one input.")


# --------------------------------------------------------------------------------------------
# Main


def bench_size(n: int, args: argparse.Namespace, workdir: Path,
               beam_args: list[str]) -> dict[str, Any]:
    corpus, gen_s = ensure_corpus(workdir, n)
    print(f"[{n:>9,}] corpus {corpus} ({corpus.stat().st_size / MB:.0f} MB"
          f"{f', generated in {gen_s:.1f}s' if gen_s else ', cached'})", flush=True)
    folder = workdir / f"size-{n}"
    output, cache = folder / "out", folder / "cache"
    for stale in (output, cache, folder / "bare.parquet"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"chunks": n, "corpus": str(corpus), "bare": None,
                              "embedpipe": None, "rerun": None}
    with FastServerProcess(args.dim) as server:
        if not args.skip_bare:
            result["bare"] = run_bare(server, corpus, n, args.dim, folder, args.timeout)
            print_run(n, result["bare"])
            (folder / "bare.parquet").unlink(missing_ok=True)
        if args.bare_only:
            return result
        config = folder / "config.yaml"
        write_config(config, corpus, output, None if args.no_cache else cache, server.base_url)
        result["embedpipe"] = run_embedpipe("first", server, config, output, n, beam_args,
                                            folder, overwrite=False, timeout_s=args.timeout)
        print_run(n, result["embedpipe"])
        if args.rerun:
            result["rerun"] = run_embedpipe("rerun", server, config, output, n, beam_args,
                                            folder, overwrite=True, timeout_s=args.timeout)
            print_run(n, result["rerun"])
    if not args.keep_outputs:
        shutil.rmtree(output, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return result


def all_ok(results: list[dict[str, Any]]) -> bool:
    return bool(results) and all(
        r[k].ok for r in results for k in ("bare", "embedpipe", "rerun") if r[k] is not None)


def write_json(path: Path, args: argparse.Namespace, beam_args: list[str],
               results: list[dict[str, Any]]) -> None:
    payload = {
        "sizes": args.sizes, "dim": args.dim, "beam_args": beam_args,
        "cache": not args.no_cache, "cpus": os.cpu_count(), "python": platform.python_version(),
        "ok": all_ok(results),
        "results": [{k: asdict(v) if isinstance(v, Run) else v for k, v in r.items()}
                    for r in results],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def parse_sizes(text: str) -> list[int]:
    sizes = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=list(DEFAULT_SIZES),
                        help="comma-separated corpus sizes in chunks (default 20000,200000,1000000)")
    parser.add_argument("--dim", type=int, default=1536, help="the server's vector dimension")
    parser.add_argument("--beam-args", default="",
                        help='extra Beam options for embedpipe, e.g. "--direct_num_workers=2 '
                             '--direct_running_mode=multi_processing"')
    parser.add_argument("--no-cache", action="store_true", help="run embedpipe with cache off")
    parser.add_argument("--rerun", action="store_true",
                        help="run embedpipe a second time, unchanged, with --overwrite")
    parser.add_argument("--skip-bare", action="store_true", help="leave out the bare client")
    parser.add_argument("--bare-only", action="store_true", help="run only the bare client")
    parser.add_argument("--workdir", type=Path,
                        help="where corpora (reused between runs), outputs and logs go "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep embedpipe's output and cache after each size")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="kill a run (with its workers) that takes longer than this")
    parser.add_argument("--json", type=Path,
                        help="also write the results as JSON here (rewritten after each size)")
    args = parser.parse_args(argv)
    if args.skip_bare and args.bare_only:
        parser.error("--skip-bare and --bare-only leave nothing to run")
    beam_args = shlex.split(args.beam_args)

    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="embedpipe-bench-scale-")) if temporary \
        else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"bench-scale: sizes {args.sizes}, dim {args.dim}, cache "
          f"{'off' if args.no_cache else 'on'}, beam args {beam_args or 'none'}, "
          f"{os.cpu_count()} CPUs, workdir {workdir}", flush=True)
    results: list[dict[str, Any]] = []
    try:
        for n in args.sizes:
            results.append(bench_size(n, args, workdir, beam_args))
            if args.json:
                write_json(args.json, args, beam_args, results)
    except KeyboardInterrupt:
        print("interrupted: reporting the sizes that finished", file=sys.stderr)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)

    if results:
        print()
        print_table(results, args.rerun)
    if args.json:
        write_json(args.json, args, beam_args, results)
        print(f"results written to {args.json}")
    ok = all_ok(results)
    if not ok:
        print("!!! bench-scale: some run failed or lost data (see above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

