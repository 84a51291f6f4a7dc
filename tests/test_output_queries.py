"""The DuckDB queries of docs/output.md, run as written against a real committed output.

The similarity example used to pass the ``embedding`` column straight to
``array_cosine_similarity``, which DuckDB refuses: it reads the Parquet column as ``FLOAT[]``
(a list), and the ``array_*`` functions take fixed-size arrays. The documented queries are read
from the doc itself, so the doc cannot drift from what works.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb  # a test extra (pyproject.toml)
import numpy as np
import pytest

from pipeline.local_server import EmbeddingServer
from pipeline.run import RunRequest, execute
from tests.support.checks import embedding_matrix
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.harness import make_config, read_output

REPO = Path(__file__).resolve().parents[1]
DOC_DIM = 256  # the dimension the doc's examples are written for


def documented_queries() -> list[str]:
    """The statements of the DuckDB block in docs/output.md, comments dropped."""
    text = (REPO / "docs" / "output.md").read_text(encoding="utf-8")
    block = re.search(r"```sql\n-- DuckDB\n(.*?)```", text, re.DOTALL)
    assert block, "docs/output.md has no DuckDB block"
    code = "\n".join(line for line in block.group(1).splitlines() if not line.startswith("--"))
    return [q.strip() for q in code.split(";") if q.strip()]


def test_the_documented_duckdb_queries_run_on_a_real_output(
        tmp_path: Path, embedding_server: EmbeddingServer) -> None:
    root = str(tmp_path / "corpus")
    write_corpus(root)
    output = str(tmp_path / "out")
    cfg = make_config(corpus_patterns(root), output, embedding_server.base_url)
    assert execute(RunRequest(cfg, quiet=True)) == 0
    manifest, tables = read_output(output)
    dim = manifest["dimensions"]
    vectors = tables["vectors"]
    matrix = embedding_matrix(vectors)
    ids = vectors.column("id").to_pylist()
    query = matrix[3] + 0.01  # a vector near chunk 3's

    con = duckdb.connect()
    queries = documented_queries()
    assert len(queries) == 4
    for sql in queries:
        sql = sql.replace("out/run", output).replace(f"[{DOC_DIM}]", f"[{dim}]").replace(
            "RUN_ID", manifest["run_id"])
        params = [query.tolist()] if "$1" in sql else None
        rows = con.execute(sql, params).fetchall()
        assert rows, sql
    nearest = rows  # the last statement is the similarity search
    assert nearest[0][0] == ids[3]
    want = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))
    np.testing.assert_allclose([score for _, score in nearest],
                               np.sort(want)[::-1][:10], rtol=1e-5)

    # What the doc says fails does fail, so the note stays true.
    similarity = queries[-1].replace("out/run", output).replace(f"[{DOC_DIM}]", f"[{dim}]").replace(
        "RUN_ID", manifest["run_id"])
    with pytest.raises(duckdb.BinderException, match="array_cosine_similarity"):
        con.execute(similarity.replace(f"embedding::FLOAT[{dim}]", "embedding"),
                    [query.tolist()])
