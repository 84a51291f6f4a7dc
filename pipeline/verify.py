"""``embedpipe verify OUTPUT``: an integrity check of a finished run, without its input.

Checks, in order: the manifest exists and says ``complete``; every file it lists exists and has
the row count it records; the counts agree with the rows and add up (every chunk is a vector or a
chunk reject: ``chunks == chunks_embedded + chunks_failed``); vector ids are unique and no id is
both a vector and a chunk reject; every vector has one and the same dimension, is finite and is
not all zeros; usage and rejects are readable. Files are read a row group at a time.
Prints each problem on its own line and exits 1 if there is any, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.exit_codes import EXIT_OK, EXIT_PROBLEMS
from transforms.manifest import STATUS_COMPLETE, read_manifest


def verify_output(output: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The problems found in ``output``; an empty list means it is sound."""
    opts = storage_options or {}
    try:
        manifest = read_manifest(output, opts)
    except (OSError, ValueError) as exc:
        return [f"manifest.json cannot be read: {exc}"]
    if manifest is None:
        return [f"no manifest.json in {output}: the run never started or is not an embedpipe output"]
    problems: list[str] = []
    if manifest.get("status") != STATUS_COMPLETE:
        problems.append(f"manifest status is {manifest.get('status')!r}, not 'complete'")
    fs, _ = fsspec.core.url_to_fs(output, **opts)
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
    problems = verify_output(args.output, json.loads(args.storage_options))
    if args.json:
        print(json.dumps({"output": args.output, "ok": not problems, "problems": problems}))
    elif problems:
        print(f"embedpipe verify: {args.output} has {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
    else:
        print(f"embedpipe verify: {args.output} is complete and consistent")
    return EXIT_PROBLEMS if problems else EXIT_OK
