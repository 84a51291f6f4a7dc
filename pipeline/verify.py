"""``embedpipe verify OUTPUT``: an integrity check of a finished run, without its input.

Checks, in order: the manifest exists and says ``complete``; every file it lists exists and has
the row count it records; the counts agree with the rows and add up (every chunk is a vector or a
chunk reject: ``chunks == chunks_embedded + chunks_failed``); vector ids are unique and no id is
both a vector and a chunk reject; every vector has one and the same dimension, is finite and is
not all zeros; usage and rejects are readable. Files are read a row group at a time.

Then the folders: every file in ``vectors/``, ``usage/`` and ``rejects/`` that the manifest does
not list is looked at (:func:`folder_findings`). A file embedpipe did not write, or one named
for the committed run but not listed, is a problem (a reader would take it for part of the
output). A file of another run (one under way, which holds the lease; one that aborted beside
a complete run; one that crashed) is a warning: readers that follow the manifest, or select the
committed run's ``part-RUN_ID-*`` files, never read it, and the next run removes it.
Prints each problem on its own line and exits 1 if there is any, else 0; warnings are printed
and do not change the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.exit_codes import EXIT_OK, EXIT_PROBLEMS
from transforms.manifest import (
    STATUS_COMPLETE,
    TABLE_KINDS,
    read_lease,
    read_manifest,
    run_of_aborted,
    run_of_file,
)


@dataclass
class Findings:
    """What ``verify`` found: problems (exit 1) and warnings (printed only)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def verify_output(output: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The problems found in ``output``; an empty list means it is sound."""
    return verify_report(output, storage_options).problems


def verify_report(output: str, storage_options: dict[str, Any] | None = None) -> Findings:
    """The problems and warnings found in ``output``."""
    opts = storage_options or {}
    fs, root = fsspec.core.url_to_fs(output, **opts)
    fs.invalidate_cache()  # what this process listed before may have changed since
    root = root.rstrip("/")
    try:
        manifest = read_manifest(output, opts)
    except (OSError, ValueError) as exc:
        return Findings([f"manifest.json cannot be read: {exc}"])
    if manifest is None:
        lease = read_lease(fs, root)
        if lease:
            why = (f"run {lease.get('run_id')} holds its lease (_lease.json), so a first run is "
                   "under way, or died before it committed")
        else:
            why = "no run committed there, or it is not an embedpipe output"
        return Findings([f"no manifest.json in {output}: {why}"])
    found = Findings(_check_manifest(fs, manifest))
    folder_findings(fs, root, manifest, found)
    return found


def folder_findings(fs: fsspec.AbstractFileSystem, root: str, manifest: dict[str, Any],
                    found: Findings) -> None:
    """Add what the table folders hold beyond the files ``manifest`` lists to ``found``."""
    committed = manifest.get("run_id")
    listed = {_normal(fs, f["path"]) for f in manifest.get("files", [])}
    lease = read_lease(fs, root) or {}
    aborted = {run_of_aborted(p.rstrip("/").rsplit("/", 1)[-1])
               for p in fs.ls(root, detail=False)} - {None}
    for kind in TABLE_KINDS:
        folder = f"{root}/{kind}"
        if not fs.exists(folder):
            continue
        for path in sorted(fs.find(folder, withdirs=True)):
            if _normal(fs, path) in listed or _normal(fs, path) == _normal(fs, folder):
                continue
            run = run_of_file(path.rstrip("/").rsplit("/", 1)[-1])
            if run is None:
                found.problems.append(
                    f"{path}: not listed by the manifest and not written by embedpipe: a reader "
                    f"that globs {kind}/*.parquet would read it, and the next run into this "
                    "output refuses to start until it is moved away")
            elif run == committed:
                found.problems.append(
                    f"{path}: named for the committed run {run} but not listed by its manifest: "
                    f"a reader that selects part-{run}-*.parquet would read it")
            else:
                why = ("holds the output's lease: a run under way, whose files are not part of "
                       "the output until it commits" if run == lease.get("run_id") else
                       f"aborted beside the complete run (aborted-{run}.json); the next run "
                       "removes it" if run in aborted else
                       "never committed (it crashed or was killed); the next run removes it")
                found.warnings.append(
                    f"{path}: not part of the output: run {run} {why}. Readers that follow the "
                    f"manifest or select part-{committed}-*.parquet do not read it; a glob "
                    f"over {kind}/*.parquet would")


def _normal(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return str(fs._strip_protocol(path)).rstrip("/")


def _check_manifest(fs: fsspec.AbstractFileSystem, manifest: dict[str, Any]) -> list[str]:
    """The problems of the committed run: its status, its files, counts, ids and vectors."""
    problems: list[str] = []
    if manifest.get("status") != STATUS_COMPLETE:
        problems.append(f"manifest status is {manifest.get('status')!r}, not 'complete'")
    rows: Counter[str] = Counter()
    ids: list[pa.Array] = []
    failed_ids: list[pa.Array] = []
    dims: set[int] = set()
    for entry in manifest.get("files", []):
        path, kind = entry["path"], entry["kind"]
        try:
            with fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                n_rows = 0
                for group in range(parquet.num_row_groups):
                    table = parquet.read_row_group(group)
                    n_rows += table.num_rows
                    if kind == "vectors":
                        ids.append(table.column("id").combine_chunks())
                        problems.extend(_check_vectors(path, table, dims))
                    elif kind == "rejects":
                        chunk_rows = table.filter(pc.equal(table.column("stage"), "embed"))
                        rows["chunk_rejects"] += chunk_rows.num_rows
                        failed_ids.append(chunk_rows.column("id").combine_chunks())
        except (OSError, ValueError, pa.ArrowException) as exc:
            problems.append(f"{path}: cannot be read ({type(exc).__name__}: {exc})")
            continue
        rows[kind] += n_rows
        if n_rows != entry["rows"]:
            problems.append(f"{path}: {n_rows} rows, the manifest says {entry['rows']}")
    counts = manifest.get("counts", {})
    for kind, key in (("vectors", "chunks_embedded"), ("usage", "requests"),
                      ("chunk_rejects", "chunks_failed")):
        if key in counts and counts[key] != rows[kind]:
            shown = "chunk rejects" if kind == "chunk_rejects" else f"{kind}/ rows"
            problems.append(f"counts.{key} is {counts[key]} but the output holds "
                            f"{rows[kind]} {shown}")
    if {"chunks", "chunks_embedded", "chunks_failed"} <= counts.keys() and counts["chunks"] != (
            counts["chunks_embedded"] + counts["chunks_failed"]):
        problems.append(
            f"counts do not add up: chunks is {counts['chunks']} but chunks_embedded "
            f"{counts['chunks_embedded']} + chunks_failed {counts['chunks_failed']} = "
            f"{counts['chunks_embedded'] + counts['chunks_failed']}: chunks are missing")
    if ids:
        frequencies = pc.value_counts(pa.chunked_array(ids, pa.string()))
        repeated = pc.filter(frequencies.field("values"),
                             pc.greater(frequencies.field("counts"), 1))
        if len(repeated):
            problems.append(f"{len(repeated)} vector ids appear more than once, "
                            f"e.g. {repeated[:5].to_pylist()}")
        if failed_ids:
            both = pc.filter(frequencies.field("values"), pc.is_in(
                frequencies.field("values"),
                value_set=pa.chunked_array(failed_ids, pa.string()).combine_chunks()))
            if len(both):
                problems.append(f"{len(both)} chunk ids are both a vector and a reject, "
                                f"e.g. {both[:5].to_pylist()}")
    if len(dims) > 1:
        problems.append(f"vectors have several dimensions: {sorted(dims)}")
    if dims and manifest.get("dimensions") not in (None, *dims):
        problems.append(f"manifest dimensions {manifest.get('dimensions')} but vectors have {dims}")
    return problems


def _check_vectors(path: str, table: pa.Table, dims: set[int]) -> list[str]:
    column = table.column("embedding")
    if not pa.types.is_fixed_size_list(column.type):
        return [f"{path}: embedding is {column.type}, not a fixed-size list of float32"]
    dim = column.type.list_size
    dims.add(dim)
    if table.num_rows == 0:
        return []
    matrix = column.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    problems = []
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        problems.append(f"{path}: {int(bad.sum())} vectors hold NaN or infinity, e.g. id "
                        f"{table.column('id')[int(np.argmax(bad))].as_py()}")
    zero = ~matrix.any(axis=1)
    if zero.any():
        problems.append(f"{path}: {int(zero.sum())} vectors are all zeros, e.g. id "
                        f"{table.column('id')[int(np.argmax(zero))].as_py()}")
    return problems


def verify_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embedpipe verify", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="the output URL of a run (fsspec)")
    parser.add_argument("--storage-options", default="{}", metavar="JSON",
                        help='fsspec options as JSON, e.g. \'{"anon": true}\'')
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    found = verify_report(args.output, json.loads(args.storage_options))
    problems = found.problems
    if args.json:
        print(json.dumps({"output": args.output, "ok": not problems, "problems": problems,
                          "warnings": found.warnings}))
        return EXIT_PROBLEMS if problems else EXIT_OK
    for warning in found.warnings:
        print(f"embedpipe verify: warning: {warning}", file=sys.stderr)
    if problems:
        print(f"embedpipe verify: {args.output} has {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
    else:
        print(f"embedpipe verify: {args.output} is complete and consistent")
    return EXIT_PROBLEMS if problems else EXIT_OK
