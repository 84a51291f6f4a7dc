"""The end-to-end invariants of a committed run, in one checker every end-to-end test uses.

Whatever the runner, the provider dialect, the faults or the cache, a committed run over a
corpus must keep the same promises, and :func:`assert_run_complete` checks all of them against
independent oracles (the corpus builder's expectations, the splitter run directly, the local
server's own model):

1. **Nothing is lost**: every input record is a valid document or a read/validate reject with
   its expected reason and source; every chunk of the valid documents is exactly one vector row
   or exactly one embed reject, never both.
2. **Vectors are id-aligned**: each row's offsets slice its document to its chunk's text, its
   ``text`` (when written) and ``content_sha256`` are its chunk's, its metadata is its
   document's, and its vector is the hashing model's vector for that text, ``dim`` float32 wide.
3. **The manifest adds up**: records read = valid + rejected, chunks = embedded + failed, each
   count equal to the rows of the files it lists, requests = usage rows, tokens = the ok rows'.

Tests then assert what is particular to them (usage against the server's own count, cache
figures, which chunks were poisoned) on the :class:`CheckedRun` it returns.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.local_server import HashingEmbedder
from tests.support.corpus import ExpectedCorpus
from tests.support.harness import expected_chunks, read_output

__all__ = ["CheckedRun", "assert_run_complete", "embedding_matrix"]


@dataclass(frozen=True)
class CheckedRun:
    """A committed run that passed :func:`assert_run_complete`, read back for further checks."""

    manifest: dict[str, Any]
    tables: dict[str, pa.Table | None]
    chunks: dict[str, str]                    # chunk id → text, by the splitter
    vectors: dict[str, dict[str, Any]]        # chunk id → vector row, ``embedding`` a numpy row
    embed_rejects: dict[str, dict[str, Any]]  # chunk id → its embed-stage reject row

    @property
    def ok_usage(self) -> list[dict[str, Any]]:
        """The usage rows of the requests that were answered with vectors."""
        usage = self.tables["usage"]
        return [] if usage is None else [u for u in usage.to_pylist() if u["outcome"] == "ok"]


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column of a vectors table as an ``(n, dim)`` array, in row order."""
    flat = np.asarray(table.column("embedding").combine_chunks().flatten())
    return flat.reshape(table.num_rows, -1)


def assert_run_complete(
    output: str,
    corpus: ExpectedCorpus,
    *,
    dim: int,
    storage_options: dict[str, Any] | None = None,
    failed: Collection[str] | None = (),
    status: str = "complete",
) -> CheckedRun:
    """Assert the invariants of the module docstring for the run committed at ``output``.

    ``failed`` names the chunk ids that must end as embed rejects (poisoned inputs, say); every
    other chunk must be a vector. None accepts any split between the two (an aborted run), as
    long as each chunk is exactly one of them. ``status`` is the manifest's expected status.
    """
    manifest, tables = read_output(output, storage_options)
    assert manifest["status"] == status, (manifest["status"], manifest.get("error"))
    chunks = expected_chunks(corpus.documents)
    vectors, rejects, usage = tables["vectors"], tables["rejects"], tables["usage"]

    # 1. Nothing lost: each chunk is one vector or one embed reject, each record a document or a
    # reject with its reason.
    rows = _vector_rows(vectors)
    reject_rows = [] if rejects is None else rejects.to_pylist()
    embed_rows = [r for r in reject_rows if r["stage"] == "embed"]
    embedded, rejected = set(rows), {r["id"] for r in embed_rows}
    assert len(rows) == (0 if vectors is None else vectors.num_rows), "a chunk has two vectors"
    assert len(rejected) == len(embed_rows), "a chunk is rejected twice"
    assert not embedded & rejected, f"chunks both embedded and rejected: {embedded & rejected}"
    assert embedded | rejected == set(chunks), (
        f"missing: {sorted(set(chunks) - embedded - rejected)[:5]}, "
        f"unknown: {sorted((embedded | rejected) - set(chunks))[:5]}")
    if failed is not None:
        assert rejected == set(failed), (sorted(rejected), sorted(failed))
    record_rejects = {r["source"]: r["reason"] for r in reject_rows if r["stage"] != "embed"}
    assert record_rejects == corpus.rejects
    assert len(reject_rows) - len(embed_rows) == len(corpus.rejects), "a record rejected twice"

    # 2. Id-aligned: offsets, text, hash, metadata and vector are the chunk's own.
    for chunk_id, row in rows.items():
        text = chunks[chunk_id]
        document = corpus.documents[row["doc_id"]]
        assert document[row["char_start"]:row["char_end"]] == text, chunk_id
        assert row.get("text", text) == text, chunk_id
        assert row["content_sha256"] == hashlib.sha256(
            text.encode("utf-8", "surrogatepass")).hexdigest(), chunk_id
        if corpus.metadata:
            assert row.get("lang") == corpus.metadata[row["doc_id"]], chunk_id
    if vectors is not None:
        assert vectors.schema.field("embedding").type == pa.list_(pa.float32(), dim)
        ids = sorted(rows)
        if ids:
            got = np.stack([rows[i]["embedding"] for i in ids])
            want = HashingEmbedder(dim=dim).embed([chunks[i] for i in ids])
            np.testing.assert_allclose(got, want, atol=1e-6)
    if rows:
        assert manifest["dimensions"] == dim

    # 3. The manifest adds up, and agrees with the files it lists.
    counts = manifest["counts"]
    assert counts["documents_read"] == corpus.records
    assert counts["documents_valid"] == len(corpus.documents)
    assert counts["documents_rejected"] == len(corpus.rejects)
    assert counts["documents_read"] == counts["documents_valid"] + counts["documents_rejected"]
    assert counts["chunks"] == len(chunks)
    assert counts["chunks"] == counts["chunks_embedded"] + counts["chunks_failed"]
    assert counts["chunks_embedded"] == len(rows)
    assert counts["chunks_failed"] == len(embed_rows)
    assert manifest["rejects_by_reason"] == dict(Counter(r["reason"] for r in reject_rows))
    usage_rows = [] if usage is None else usage.to_pylist()
    assert counts["requests"] == len(usage_rows)
    ok = [u for u in usage_rows if u["outcome"] == "ok"]
    assert manifest["usage"]["prompt_tokens"] == sum(u["prompt_tokens"] for u in ok)
    return CheckedRun(manifest, tables, chunks, rows, {r["id"]: r for r in embed_rows})


def _vector_rows(vectors: pa.Table | None) -> dict[str, dict[str, Any]]:
    """The vector rows by id (a duplicated id keeps one: the caller compares the counts)."""
    if vectors is None:
        return {}
    matrix = embedding_matrix(vectors)
    rows = vectors.drop_columns(["embedding"]).to_pylist()
    return {row["id"]: {**row, "embedding": matrix[i]} for i, row in enumerate(rows)}
