"""The end-to-end harness: a config for a loopback run, and the committed output read back."""

from __future__ import annotations

import json
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, parse_config
from tests.support.corpus import MAX_DOCUMENT_BYTES
from transforms.split import split_document
from transforms.tokens import get_tokenizer
from transforms.types import Document

MODEL = "local-hash-embedding"


def make_config(input_paths: list[str], out_path: str, base_url: str,
                storage_options: dict[str, Any] | None = None, **sections: dict) -> Config:
    data: dict[str, Any] = {
        "input": {"path": input_paths, "metadata_fields": ["lang"],
                  "storage_options": storage_options or {}},
        "validate": {"max_document_bytes": MAX_DOCUMENT_BYTES},
        "split": {"max_tokens": 128, "overlap_tokens": 16, "tokenizer": "cl100k_base"},
        "provider": {"kind": "openai", "base_url": base_url, "model": MODEL,
                     "api_key_env": None, "max_inputs_per_request": 8,
                     "max_tokens_per_request": 2000, "timeout_s": 10},
        "limits": {"requests_per_minute": 100_000, "tokens_per_minute": 10**8,
                   "max_concurrency": 4},
        "retry": {"max_attempts": 6, "max_wait_s": 0.2, "initial_wait_s": 0.01},
        "output": {"path": out_path, "storage_options": storage_options or {},
                   "rows_per_file": 50},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data)


def read_output(output: str, storage_options: dict[str, Any] | None = None):
    """The manifest and the three tables, read from the files the manifest lists."""
    opts = storage_options or {}
    with fsspec.open(f"{output}/manifest.json", "r", **opts) as f:
        manifest = json.load(f)
    fs, _ = fsspec.core.url_to_fs(output, **opts)
    tables: dict[str, list[pa.Table]] = {"vectors": [], "usage": [], "rejects": []}
    for entry in manifest["files"]:
        with fs.open(entry["path"], "rb") as f:
            table = pq.read_table(f)
        assert table.num_rows == entry["rows"]
        tables[entry["kind"]].append(table)
    merged = {k: pa.concat_tables(v, promote_options="default") if v else None
              for k, v in tables.items()}
    return manifest, merged


def expected_chunks(documents: dict[str, str]) -> dict[str, str]:
    """chunk id → chunk text, by the same splitter settings as the run."""
    tokenizer = get_tokenizer("cl100k_base")
    out = {}
    for doc_id, text in documents.items():
        for chunk in split_document(Document(doc_id, text, "x", None), tokenizer, 128, 16):
            out[chunk.chunk_id] = chunk.text
    return out


