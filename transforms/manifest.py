"""The manifest: the last file of a run, and its commit marker.

``manifest.json`` is written once, atomically, by the final singleton step after every shard is
committed, with status ``complete`` (or ``aborted`` after a fatal provider answer). Until then
the folder keeps the manifest of the run before (if any), so an ``--overwrite`` that fails leaves
the previous run readable; a live run is known by its lease (``_lease.json``, see
:mod:`pipeline.output_dir`), never by a manifest. Readers and ``embedpipe verify`` trust an
output only when its manifest says ``complete``; the file list in it is authoritative.

Every file a run writes is named ``part-RUN_ID-*.parquet`` (:func:`run_of_file`), so one run's
files are never mistaken for another's, and embedpipe deletes only files with such names (or
listed by a manifest). Before the manifest is written the commit step removes any file of its
own run id that it does not list (a shard of a bundle the runner retried), so selecting
``part-RUN_ID-*`` reads exactly the manifest's files.

Before it writes the manifest, the commit step settles duplicate ids (:mod:`transforms.dedup`)
and checks the run's accounting: every chunk the splitter made must be a vector row or a chunk
reject, exactly once, by count *and* by checksum (:func:`transforms.types.fingerprint`). An
output that fails the check is never committed: :class:`AccountingError`, exit 4, and the
folder's manifest stays what it was. A run that loses chunks says so, loudly, instead of
committing. A run launched by ``embedpipe run`` also checks, last, that it still holds the
output's lease (:func:`check_lease`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import fsspec

from transforms.cache import CacheSpec
from transforms.dedup import NO_DUPLICATES, drop_rows, find_duplicates
from transforms.errors import AccountingError, LeaseLostError
from transforms.types import (
    FINGERPRINT_MODULUS,
    MISSING_FIELD,
    NO_FILES_MATCHED,
    STAGE_EMBED,
    STAGE_READ,
    UNREADABLE_FILE,
    WrittenFile,
)
from transforms.write import IDS, REJECTS, USAGE, VECTORS, OutputSpec, write_rows

log = logging.getLogger(__name__)

#: Written at the start of a run by versions before the lease; no longer written, still read.
STATUS_PARTIAL = "partial"
STATUS_COMPLETE = "complete"
STATUS_ABORTED = "aborted"

MANIFEST_NAME = "manifest.json"
#: The live run's lease, beside the manifest (:mod:`pipeline.output_dir` takes and renews it).
LEASE_NAME = "_lease.json"
#: Files being written by a live run, under ``_temporary/RUN_ID/``.
TEMPORARY = "_temporary"
#: The output's table folders, the only ones embedpipe writes Parquet files to.
TABLE_KINDS = ("vectors", "usage", "rejects")

#: The run ids ``embedpipe run`` makes: the UTC second it started and 8 hex digits.
RUN_ID_PATTERN = r"\d{8}T\d{6}Z-[0-9a-f]{8}"
_RUN_FILE = re.compile(rf"part-({RUN_ID_PATTERN})-[0-9A-Za-z_-]+\.parquet")
# A rewrite by the commit step's duplicate-id settling, left by a commit killed mid-way (until
# the temporary moved to _temporary/RUN_ID/, it was written beside the file).
_RUN_TEMPORARY = re.compile(rf"\.part-({RUN_ID_PATTERN})-[0-9A-Za-z_-]+\.parquet\.dedup")
_ABORTED = re.compile(rf"aborted-({RUN_ID_PATTERN})\.json")

#: Reject reasons that concern a whole input file or pattern rather than one record.
FILE_LEVEL_REASONS = frozenset({UNREADABLE_FILE, NO_FILES_MATCHED, MISSING_FIELD})


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What the launcher knows about a run; shipped to the manifest step (no secrets)."""

    run_id: str
    started_at: str
    output_path: str
    storage_options: tuple[tuple[str, Any], ...]
    config: str  # the public config, as JSON text (frozen and hashable)
    provider: str
    model: str
    dimensions: int | None
    leased: bool = False  # launched by ``embedpipe run``, which holds the output's lease


def run_of_file(name: str) -> str | None:
    """The run id in the name of a file embedpipe writes to a table folder, else None.

    >>> run_of_file("part-20261204T123633Z-0a1b2c3d-9f8e7d6c5b4a.parquet")
    '20261204T123633Z-0a1b2c3d'
    >>> run_of_file("part-00000-1f2e.snappy.parquet") is None  # Spark's, not ours
    True
    """
    found = _RUN_FILE.fullmatch(name)
    return found.group(1) if found else None


def run_of_temporary(name: str) -> str | None:
    """The run id of a temporary file embedpipe may have left in a table folder, else None."""
    found = _RUN_TEMPORARY.fullmatch(name)
    return found.group(1) if found else None


def run_of_aborted(name: str) -> str | None:
    """The run id of an ``aborted-RUN_ID.json`` manifest, else None."""
    found = _ABORTED.fullmatch(name)
    return found.group(1) if found else None


def read_lease(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Any] | None:
    """The output's lease record; None when there is none, ``{}`` when it cannot be parsed."""
    path = f"{root.rstrip('/')}/{LEASE_NAME}"
    fs.invalidate_cache(path)
    try:
        record = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:  # torn (a renewal caught mid-write) or not ours
        return {}
    return record if isinstance(record, dict) else {}


def check_lease(fs: fsspec.AbstractFileSystem, root: str, run_id: str) -> None:
    """Raise :class:`LeaseLostError` unless the output's lease names ``run_id``."""
    holder = read_lease(fs, root)
    if (holder or {}).get("run_id") != run_id:
        who = (f"run {holder.get('run_id')} (host {holder.get('host')}, pid {holder.get('pid')})"
               if holder else "no run" if holder is None else "an unreadable lease file")
        raise LeaseLostError(
            f"run {run_id} no longer holds the lease of {root}: it now names {who}. Another "
            "run took the output over after this one stopped renewing its lease; this run's "
            "files are not committed (the next run into the output removes them)")


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def build_manifest(
    run: RunInfo,
    files: Iterable[WrittenFile],
    *,
    records_read: int,
    documents_valid: int,
    chunks: int,
    fatal: list[str],
    cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The final manifest, computed from the files actually committed."""
    files = sorted(files, key=lambda f: (f.kind, f.path))
    totals: dict[str, Counter[str]] = {}
    rows: Counter[str] = Counter()
    for f in files:
        totals.setdefault(f.kind, Counter()).update(dict(f.stats))
        rows[f.kind] += f.rows
    rejects = totals.get("rejects", Counter())
    usage = totals.get("usage", Counter())
    by_reason = {k.split(":", 1)[1]: v for k, v in rejects.items() if k.startswith("reason:")}
    chunks_failed = rejects.get(f"stage:{STAGE_EMBED}", 0)
    documents = document_counts(records_read, by_reason, rejects.get(f"stage:{STAGE_READ}", 0),
                                 chunks_failed)
    dims = sorted(int(k.split(":", 1)[1]) for k in totals.get("vectors", Counter()) if k.startswith("dim:"))
    # The model(s) the answers named: one name, a sorted list when they differ, None if none did.
    served = sorted(k.split(":", 1)[1] for k in usage if k.startswith("served_model:"))
    return {
        "status": STATUS_ABORTED if fatal else STATUS_COMPLETE,
        "run_id": run.run_id,
        "started_at": run.started_at,
        "finished_at": utc_now(),
        "provider": run.provider,
        "model": run.model,
        "served_model": served[0] if len(served) == 1 else (served or None),
        "dimensions": dims[0] if len(dims) == 1 else (dims or run.dimensions),
        "error": fatal[0] if fatal else None,
        "counts": {
            "documents_read": documents["documents_read"],
            "documents_rejected": documents["documents_rejected"],
            "documents_valid": documents_valid,
            "files_failed": documents["files_failed"],
            "chunks": chunks,
            "chunks_embedded": rows["vectors"],
            "chunks_failed": chunks_failed,
            "requests": usage.get("requests", 0),
            "retries": usage.get("retries", 0),
            "throttled": usage.get("throttled", 0),
        },
        "rejects_by_reason": dict(sorted(by_reason.items())),
        "usage": {
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
            # A multimodal run's tokens by kind (usage text_tokens and image_tokens).
            **{name: usage[name] for name in ("text_tokens", "image_tokens") if name in usage},
        },
        "cache": cache or {"enabled": False},
        **batch_section(json.loads(run.config).get("provider", {}), usage),
        "config": json.loads(run.config),
        "files": [{"kind": f.kind, "path": f.path, "rows": f.rows} for f in files],
    }


def batch_section(provider: Mapping[str, Any], usage: Counter[str]) -> dict[str, Any]:
    """Batch mode's figures (``{"batch": {...}}``), or nothing for an online run.

    ``batches`` lists every batch whose lines this run harvested (created by it or re-attached
    from a process that died); a later run of the same output skips them when it re-attaches.
    ``cost`` prices the ``ok`` tokens: batch lines at ``batch_discount`` times
    ``price_per_million_tokens``, the online fallbacks (bisection) at the full price.
    """
    if provider.get("mode") != "batch":
        return {}
    price = provider.get("price_per_million_tokens")
    discount = float(provider.get("batch_discount", 0.5))
    batch_tokens = usage.get("batch_prompt_tokens", 0)
    online_tokens = usage.get("prompt_tokens", 0) - batch_tokens
    cost = None if price is None else round(
        (batch_tokens * discount + online_tokens) * float(price) / 1e6, 9)
    return {"batch": {
        "batches": sorted(k.split(":", 1)[1] for k in usage if k.startswith("batch_id:")),
        "lines": usage.get("batch_lines", 0),
        "prompt_tokens": batch_tokens,
        "online_prompt_tokens": online_tokens,
        "discount": discount,
        "cost": cost,
    }}


def document_counts(records_read: int, rejects_by_reason: Mapping[str, int], read_rejects: int,
                    chunk_rejects: int) -> dict[str, int]:
    """``documents_read``, ``documents_rejected`` and ``files_failed``, from the reject counts.

    The one definition that ``run`` (its manifest) and ``plan`` both use, so that they count the
    same input alike. A document read is every record seen: the valid ones plus those rejected
    while reading or validating. A file-level reject (a file or pattern that failed, in whole or
    from some line on) is a failed file, not a document; a chunk reject is neither.
    """
    file_level = sum(n for reason, n in rejects_by_reason.items() if reason in FILE_LEVEL_REASONS)
    return {
        "documents_read": records_read + read_rejects - file_level,
        "documents_rejected": sum(rejects_by_reason.values()) - chunk_rejects - file_level,
        "files_failed": file_level,
    }


def write_json_atomically(url: str, data: dict[str, Any],
                          storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to a temporary name beside ``url`` and move it into place."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp"
    with fs.open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
    fs.mv(tmp, path)


def read_manifest(output_url: str, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The manifest of an output, or None when there is none."""
    return read_json(manifest_url(output_url), storage_options)


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> dict | None:
    """A JSON file, or None when there is none.

    Read whole, past fsspec's caches: the file is replaced by other processes (a run's commit
    step, another run), and s3fs would answer from a listing cached before that, or refuse a
    file whose ETag changed since it was first opened.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.invalidate_cache(path)  # s3fs sizes the file from a cached listing before its GET
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return json.loads(data)


def manifest_url(output_url: str) -> str:
    return f"{output_url.rstrip('/')}/{MANIFEST_NAME}"


def aborted_manifest_url(output_url: str, run_id: str) -> str:
    """Where an aborted run's manifest goes when the output holds a complete run already."""
    return f"{output_url.rstrip('/')}/aborted-{run_id}.json"


def commit_url(output_url: str, manifest: dict[str, Any],
               storage_options: dict[str, Any] | None = None) -> str:
    """Where ``manifest`` is committed: ``manifest.json``, unless it would hide a complete run.

    An aborted run (``--overwrite`` of a complete output, then a fatal provider answer) never
    replaces the complete run it was meant to replace: its manifest goes beside it, as
    ``aborted-RUN_ID.json``, and the complete run stays what readers see.
    """
    if manifest.get("status") == STATUS_ABORTED:
        current = read_manifest(output_url, storage_options)
        if current and current.get("status") == STATUS_COMPLETE and (
                current.get("run_id") != manifest.get("run_id")):
            return aborted_manifest_url(output_url, str(manifest.get("run_id")))
    return manifest_url(output_url)


def check_accounting(files: Iterable[WrittenFile], chunks: int, checksum: int) -> None:
    """Every chunk made is a vector row or a chunk reject, once: counts and checksums agree."""
    written = rows = 0
    for f in files:
        stats = dict(f.stats)
        if f.kind == VECTORS.name:
            rows += f.rows
        elif f.kind == REJECTS.name:
            rows += stats.get(f"stage:{STAGE_EMBED}", 0)
        else:
            continue
        written += stats.get("fingerprint", 0)
    if rows != chunks or written % FINGERPRINT_MODULUS != checksum % FINGERPRINT_MODULUS:
        raise AccountingError(
            f"the run made {chunks} chunks but wrote {rows} vector rows and chunk rejects"
            + ("" if rows != chunks else " with other ids (the checksums differ)")
            + "; the output is incomplete and is not committed. This is a bug or a runner "
            "failure: please report it with the run's log"
        )


def reconcile_files(fs: fsspec.AbstractFileSystem, root: str, run_id: str,
                    files: Iterable[WrittenFile]) -> None:
    """Make this run's files in the table folders exactly ``files``, just before the commit.

    A file of this run that ``files`` does not list is removed: a runner that retries a bundle
    (Dataflow, Flink) may have moved a shard of the failed attempt to its final name, and its
    rows are in the retry's shard too. So ``part-RUN_ID-*`` selects exactly what the manifest
    lists. A listed file that is gone (deleted by another process, e.g. a run that took the
    output over while this one stalled) is an :class:`AccountingError`: nothing is committed.
    """
    fs.invalidate_cache()
    listed = {_normal(fs, f.path) for f in files}
    present = {_normal(fs, path) for kind in TABLE_KINDS
               for path in fs.glob(f"{root}/{kind}/part-{run_id}-*.parquet")}
    stray = sorted(present - listed)
    if stray:
        log.warning("embedpipe: removing %d files of run %s that its manifest does not list "
                    "(written by a bundle the runner retried): %s", len(stray), run_id,
                    ", ".join(stray[:3]))
        fs.rm(stray)
    missing = sorted(listed - present)
    if missing:
        raise AccountingError(
            f"{len(missing)} files of run {run_id} are gone from {root} before its commit, e.g. "
            f"{', '.join(missing[:3])}: another process deleted them, so the run is not "
            "committed; run it again")


def _normal(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return str(fs._strip_protocol(path)).rstrip("/")


class CommitManifestFn(beam.DoFn):
    """The run's last step: settle duplicate ids, check the accounting, write the manifest.

    It runs once (on a one-element input) with every committed file and count as side inputs,
    which Beam completes before calling it: so the manifest is written after every shard.
    """

    def __init__(self, info: RunInfo, spec: OutputSpec, cache: CacheSpec | None) -> None:
        self.info = info
        self.spec = spec
        self.cache = cache

    def process(self, _: object, files, records_read, documents_valid, chunks, fatal,
                cache_counts):
        files = list(files)
        n_chunks, checksum = chunks
        check_accounting(files, n_chunks, checksum)
        fs, root = self.spec.filesystem()
        id_files = [f.path for f in files if f.kind == IDS.name]
        files = [f for f in files if f.kind != IDS.name]
        duplicates = find_duplicates(fs, id_files) if id_files else NO_DUPLICATES
        if duplicates.rejects:
            files, removed_chunks = self._drop_losers(
                fs, files, duplicates, f"{root}/{TEMPORARY}/{self.info.run_id}/dedup")
            log.info("embedpipe: %d versions of duplicated ids settled at commit (%d of their "
                     "chunks removed from the output)", len(duplicates.rejects), removed_chunks)
            n_chunks -= removed_chunks
            documents_valid -= len(duplicates.rejects)
            files.append(write_rows(REJECTS, list(duplicates.rejects), self.spec,
                                    name=f"part-{self.info.run_id}-duplicates.parquet"))
        kinds = {f.kind for f in files}
        # Always leave a readable file per table, so `KIND/*.parquet` globs never come up empty.
        for kind in (REJECTS, USAGE):
            if kind.name not in kinds:
                files.append(write_rows(kind, [], self.spec,
                                        name=f"part-{self.info.run_id}-empty.parquet"))
        cache = None
        if self.cache is not None:
            cache = {"enabled": True, "path": self.cache.url,
                     **dict(zip(("hits", "misses", "duplicates", "tokens_saved"), cache_counts, strict=True))}
        manifest = build_manifest(
            self.info, files, records_read=records_read, documents_valid=documents_valid,
            chunks=n_chunks, fatal=sorted(set(fatal)), cache=cache,
        )
        reconcile_files(fs, root, self.info.run_id, files)
        temporary = f"{root}/{TEMPORARY}/{self.info.run_id}"
        if fs.exists(temporary):
            fs.rm(temporary, recursive=True)
        if fs.exists(f"{root}/{TEMPORARY}") and not fs.ls(f"{root}/{TEMPORARY}"):
            fs.rm(f"{root}/{TEMPORARY}", recursive=True)
        if self.info.leased:
            check_lease(fs, root, self.info.run_id)  # last, just before the commit itself
        write_json_atomically(commit_url(self.spec.path, manifest, dict(self.spec.storage_options)),
                              manifest, dict(self.spec.storage_options))
        yield manifest

    def _drop_losers(self, fs, files: list[WrittenFile], duplicates, scratch: str) -> tuple[
            list[WrittenFile], int]:
        """Remove the rows of losing versions; returns the files and the chunks removed."""
        kept: list[WrittenFile] = []
        removed_chunks = 0
        for f in files:
            if f.kind == VECTORS.name:
                f, removed = drop_rows(fs, f, duplicates, VECTORS.stats, scratch)
                removed_chunks += removed.num_rows if removed is not None else 0
            elif f.kind == REJECTS.name:
                f, removed = drop_rows(fs, f, duplicates, REJECTS.stats, scratch)
                if removed is not None:
                    removed_chunks += sum(1 for s in removed.column("stage").to_pylist()
                                          if s == STAGE_EMBED)
            kept.append(f)
        return kept, removed_chunks
