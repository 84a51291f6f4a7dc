"""``make run``: embed the sample corpus end to end with the embedded local server.

Starts :class:`~pipeline.local_server.EmbeddingServer` on loopback, runs the pipeline over
``examples/sample`` with ``configs/local.yaml`` (exactly as ``embedpipe run`` would), stops the
server, and shows the run summary plus one nearest-neighbour query over the written vectors.
Needs the repository checkout (it reads the sample corpus and config from it).

    python -m pipeline.demo [--query "..."] [--output ./out/sample] [BEAM OPTIONS]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import fsspec
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli import _setup_logging
from pipeline.config import load_config
from pipeline.exit_codes import EXIT_CONFIG
from pipeline.local_server import EmbeddingServer
from pipeline.run import RunRequest, execute
from transforms.errors import ConfigError
from transforms.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_QUERY = "telescope observations of planets and distant galaxies"


def nearest(output: str, query: np.ndarray, k: int = 5) -> list[dict]:
    """The ``k`` chunks most similar (cosine) to ``query``, from the files the manifest lists."""
    with fsspec.open(f"{output}/manifest.json", "r") as f:
        manifest = json.load(f)
    tables = []
    for entry in manifest["files"]:
        if entry["kind"] == "vectors":
            with fsspec.open(entry["path"], "rb") as f:
                tables.append(pq.read_table(f, columns=["id", "doc_id", "text", "embedding"]))
    table = pa.concat_tables(tables)
    matrix = table.column("embedding").combine_chunks().flatten().to_numpy()
    matrix = matrix.reshape(table.num_rows, -1)
    scores = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query) + 1e-12)
    best = np.argsort(-scores)[:k]
    rows = table.select(["id", "doc_id", "text"]).take(pa.array(best)).to_pylist()
    return [{**row, "score": float(scores[i])} for row, i in zip(rows, best, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__)
    parser.add_argument("--query", default=DEFAULT_QUERY)
    parser.add_argument("--output", default=str(REPO / "out" / "sample"))
    parser.add_argument("--port", type=int, default=0, help="server port (0: any free port)")
    args, beam_args = parser.parse_known_args(argv)
    _setup_logging(quiet=False)

    with EmbeddingServer(port=args.port) as server:
        print(f"embedpipe demo: local embedding server on {server.base_url} (dim {server.dim})")
        try:
            cfg = load_config(REPO / "configs" / "local.yaml", [
                f"provider.base_url={server.base_url}",
                f"provider.model={server.model}",
                f"output.path={args.output}",
                "output.overwrite=true",
            ])
        except ConfigError as exc:
            print(f"embedpipe: error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        # Sample paths in the config are relative to the repository, not to the caller.
        paths = [str(REPO / p) for p in cfg.input.paths]
        cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"path": paths})})
        code = execute(RunRequest(cfg, beam_args=beam_args))
        if code not in (0, 1):
            return code
        response = httpx.post(f"{server.base_url}/embeddings",
                              json={"model": server.model, "input": [args.query]}, timeout=10)
        query = np.asarray(response.json()["data"][0]["embedding"], dtype=np.float32)

    print(f'\nnearest chunks to "{args.query}":')
    for hit in nearest(args.output, query):
        snippet = " ".join(hit["text"].split())[:90]
        print(f"  {hit['score']:.3f}  {hit['id']:<28} {snippet}")
    run_id = (read_manifest(args.output) or {}).get("run_id", "RUN_ID")
    print(f"\nread it: duckdb -c \"select doc_id, count(*) from "
          f"'{args.output}/vectors/part-{run_id}-*.parquet' group by 1 order by 2 desc limit 5\"")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
