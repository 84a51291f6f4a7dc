"""The manifest: the last file of a run, and its commit marker.

``manifest.json`` is written once at the start with status ``partial`` and replaced, atomically,
by the final singleton step after every shard is committed, with status ``complete`` (or
``aborted`` after a fatal provider answer). Readers and ``embedpipe verify`` trust an output only
when its manifest says ``complete``; the file list in it is authoritative: a shard that is not
listed (left by a crashed attempt) is not part of the output.

Before it writes the manifest, the commit step settles duplicate ids (:mod:`transforms.dedup`)
and checks the run's accounting: every chunk the splitter made must be a vector row or a chunk
reject, exactly once, by count *and* by checksum (:func:`transforms.types.fingerprint`). An
output that fails the check is never marked complete: :class:`AccountingError`, exit 4, the
manifest stays ``partial``. A run that loses chunks says so, loudly, instead of committing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import fsspec

from transforms.cache import CacheSpec
from transforms.dedup import NO_DUPLICATES, drop_rows, find_duplicates
from transforms.errors import AccountingError
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

STATUS_PARTIAL = "partial"
STATUS_COMPLETE = "complete"
STATUS_ABORTED = "aborted"

MANIFEST_NAME = "manifest.json"

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
        },
        "cache": cache or {"enabled": False},
        "config": json.loads(run.config),
        "files": [{"kind": f.kind, "path": f.path, "rows": f.rows} for f in files],
    }


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
    """A JSON file, or None when there is none."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


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
            files, removed_chunks = self._drop_losers(fs, files, duplicates)
            log.info("embedpipe: %d versions of duplicated ids settled at commit (%d of their "
                     "chunks removed from the output)", len(duplicates.rejects), removed_chunks)
            n_chunks -= removed_chunks
            documents_valid -= len(duplicates.rejects)
            files.append(write_rows(REJECTS, list(duplicates.rejects), self.spec,
                                    name=f"part-duplicates-{self.info.run_id}.parquet"))
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
        temporary = f"{root}/_temporary/{self.info.run_id}"
        if fs.exists(temporary):
            fs.rm(temporary, recursive=True)
        if fs.exists(f"{root}/_temporary") and not fs.ls(f"{root}/_temporary"):
            fs.rm(f"{root}/_temporary", recursive=True)
        write_json_atomically(commit_url(self.spec.path, manifest, dict(self.spec.storage_options)),
                              manifest, dict(self.spec.storage_options))
        yield manifest

    def _drop_losers(self, fs, files: list[WrittenFile], duplicates) -> tuple[
            list[WrittenFile], int]:
        """Remove the rows of losing versions; returns the files and the chunks removed."""
        kept: list[WrittenFile] = []
        removed_chunks = 0
        for f in files:
            if f.kind == VECTORS.name:
                f, removed = drop_rows(fs, f, duplicates, VECTORS.stats)
                removed_chunks += removed.num_rows if removed is not None else 0
            elif f.kind == REJECTS.name:
                f, removed = drop_rows(fs, f, duplicates, REJECTS.stats)
                if removed is not None:
                    removed_chunks += sum(1 for s in removed.column("stage").to_pylist()
                                          if s == STAGE_EMBED)
            kept.append(f)
        return kept, removed_chunks
