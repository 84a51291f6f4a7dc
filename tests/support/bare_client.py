"""The bare client of ``make bench-scale``: the least a Python program must do to embed a corpus.

A yardstick for embedpipe's throughput and memory. It does the same job with no framework:
read a JSONL.gz corpus line by line, send batches of 256 inputs to an OpenAI-dialect server
over 16 concurrent HTTP/1.1 connections (asyncio + httpx), decode the base64 float32 answers
with numpy, put each vector back at its ``index``, and stream one Parquet file (``id``,
``embedding`` as ``fixed_size_list<float32>[dim]``, laid out as embedpipe writes it) through
``pyarrow.parquet.ParquetWriter``, a row group at a time, never holding the corpus or its
vectors. No validation, retries, cache,
rate limiting or rejects: what embedpipe adds on top of this is what the ratio measures.

It runs as its own process so that the benchmark measures its wall time and peak RSS exactly
as it measures embedpipe's::

    python -m tests.support.bare_client --base-url http://127.0.0.1:PORT/v1 \\
        --corpus corpus.jsonl.gz --out vectors.parquet [--dim 1536]

On success it prints one JSON line: ``{"rows_written", "requests", "wall_s"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BATCH = 256
CONCURRENCY = 16
ROWS_PER_GROUP = 8192


def read_batches(corpus: Path, batch: int) -> Iterator[tuple[list[str], list[str]]]:
    """``(ids, texts)`` of ``batch`` records at a time, read lazily."""
    ids: list[str] = []
    texts: list[str] = []
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            ids.append(record["id"])
            texts.append(record["text"])
            if len(ids) == batch:
                yield ids, texts
                ids, texts = [], []
    if ids:
        yield ids, texts


class ParquetSink:
    """Accumulates vectors and writes a row group every ``rows_per_group`` rows."""

    def __init__(self, path: Path, dim: int, rows_per_group: int = ROWS_PER_GROUP) -> None:
        self.dim = dim
        self.rows_per_group = rows_per_group
        self.schema = pa.schema([("id", pa.string()),
                                 ("embedding", pa.list_(pa.float32(), dim))])
        # The layout embedpipe writes (transforms/write.py), so both pay for the same file:
        # vectors plain (float32 barely compresses; dictionary encoding only costs), ids zstd.
        self.writer = pq.ParquetWriter(path, self.schema,
                                       compression={"id": "zstd", "embedding": "none"},
                                       use_dictionary=False)
        self._ids: list[str] = []
        self._vectors: list[np.ndarray] = []
        self._pending = 0
        self.rows = 0

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        self._ids.extend(ids)
        self._vectors.append(vectors)
        self._pending += len(ids)
        if self._pending >= self.rows_per_group:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        flat = pa.array(np.concatenate(self._vectors).reshape(-1), type=pa.float32())
        embeddings = pa.FixedSizeListArray.from_arrays(flat, self.dim)
        self.writer.write_table(pa.Table.from_arrays([pa.array(self._ids), embeddings],
                                                     schema=self.schema))
        self.rows += self._pending
        self._ids, self._vectors, self._pending = [], [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def decode(answer: dict, n: int, dim: int) -> np.ndarray:
    """The answer's vectors as an ``(n, dim)`` array in input order (aligned by ``index``)."""
    out = np.empty((n, dim), dtype=np.float32)
    seen = np.zeros(n, dtype=bool)
    data = answer["data"]
    if len(data) != n:
        raise ValueError(f"asked for {n} vectors, got {len(data)}")
    for item in data:
        index = item["index"]
        vector = np.frombuffer(base64.b64decode(item["embedding"]), "<f4")
        if vector.shape != (dim,):
            raise ValueError(f"vector {index} has {vector.shape[0]} values, expected {dim}")
        out[index] = vector
        seen[index] = True
    if not seen.all():
        raise ValueError("answer indices do not cover the inputs")
    return out


async def embed_corpus(base_url: str, model: str, corpus: Path, sink: ParquetSink,
                       batch: int, concurrency: int) -> int:
    """Embed every record of ``corpus`` into ``sink``; returns the number of requests sent."""
    queue: asyncio.Queue[tuple[list[str], list[str]] | None] = asyncio.Queue(concurrency * 2)
    requests = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base_url, http1=True, http2=False, limits=limits,
                                 timeout=httpx.Timeout(120.0)) as client:

        async def produce() -> None:
            for item in read_batches(corpus, batch):
                await queue.put(item)
            for _ in range(concurrency):
                await queue.put(None)

        async def work() -> None:
            nonlocal requests
            while (item := await queue.get()) is not None:
                ids, texts = item
                payload = {"model": model, "input": texts, "encoding_format": "base64"}
                # Streamed into our own buffer: an httpx Response sits in a reference cycle, so
                # a body it holds (``.json()``, ``.content``) lives until the cyclic GC runs;
                # 2 MB answers then pile up between collections (0.96 GB peak at 200k chunks,
                # against 0.4 GB streamed).
                async with client.stream("POST", "/embeddings", json=payload) as response:
                    response.raise_for_status()
                    body = b"".join([chunk async for chunk in response.aiter_bytes()])
                requests += 1
                sink.add(ids, decode(json.loads(body), len(ids), sink.dim))

        await asyncio.gather(produce(), *(work() for _ in range(concurrency)))
    return requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.bare_client",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:PORT/v1")
    parser.add_argument("--corpus", type=Path, required=True, help="JSONL.gz with id and text")
    parser.add_argument("--out", type=Path, required=True, help="the Parquet file to write")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    sink = ParquetSink(args.out, args.dim)
    try:
        requests = asyncio.run(embed_corpus(args.base_url.rstrip("/"), args.model, args.corpus,
                                            sink, args.batch, args.concurrency))
    finally:
        sink.close()
    print(json.dumps({"rows_written": sink.rows, "requests": requests,
                      "wall_s": round(time.monotonic() - t0, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
