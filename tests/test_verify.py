"""``embedpipe verify`` passes a good output and names what is wrong with a damaged one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.local_server import EmbeddingServer
from pipeline.run import RunRequest, execute
from pipeline.verify import verify_output
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.harness import MODEL, make_config


@pytest.fixture(scope="module")
def good_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("verify")
    write_corpus(str(base / "corpus"))
    with EmbeddingServer(dim=16, model=MODEL) as server:
        cfg = make_config(corpus_patterns(str(base / "corpus")), str(base / "out"),
                          server.base_url)
        assert execute(RunRequest(cfg, quiet=True)) == 0
    return base / "out"


def damaged(good: Path, tmp_path: Path, change) -> Path:
    """A copy of the good output whose first vectors file went through ``change``."""
    out = tmp_path / "out"
    shutil.copytree(good, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"] = [{**f, "path": f["path"].replace(str(good), str(out))}
                         for f in manifest["files"]]
    (out / "manifest.json").write_text(json.dumps(manifest))
    first = next(Path(f["path"]) for f in manifest["files"] if f["kind"] == "vectors")
    pq.write_table(change(pq.read_table(first)), first)
    return out


def test_good_output_passes(good_output: Path, capsys: pytest.CaptureFixture) -> None:
    assert verify_output(str(good_output)) == []
    assert main(["verify", str(good_output)]) == 0
    assert "complete and consistent" in capsys.readouterr().out


def test_removed_rows_are_found(good_output: Path, tmp_path: Path) -> None:
    out = damaged(good_output, tmp_path, lambda t: t.slice(0, t.num_rows - 2))
    problems = verify_output(str(out))
    assert any("the manifest says" in p for p in problems)
    assert any("counts.chunks_embedded" in p for p in problems)
    assert main(["verify", str(out)]) == 1


def test_duplicated_id_is_found(good_output: Path, tmp_path: Path) -> None:
    def duplicate(t: pa.Table) -> pa.Table:
        ids = t.column("id").to_pylist()
        ids[1] = ids[0]
        return t.set_column(0, "id", pa.array(ids))

    problems = verify_output(str(damaged(good_output, tmp_path, duplicate)))
    assert any("appear more than once" in p for p in problems)


def test_nan_vector_is_found(good_output: Path, tmp_path: Path) -> None:
    def poison(t: pa.Table) -> pa.Table:
        column = t.column("embedding")
        dim = column.type.list_size
        matrix = column.combine_chunks().flatten().to_numpy().reshape(-1, dim).copy()
        matrix[0, 3] = np.nan
        values = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)
        return t.set_column(t.schema.get_field_index("embedding"), "embedding", values)

    problems = verify_output(str(damaged(good_output, tmp_path, poison)))
    assert any("NaN" in p for p in problems)


def test_missing_or_partial_manifest(tmp_path: Path) -> None:
    assert "no manifest.json" in verify_output(str(tmp_path))[0]
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "partial", "files": []}))
    assert "not 'complete'" in verify_output(str(tmp_path))[0]


def _edit_manifest(good: Path, tmp_path: Path, edit) -> Path:
    out = damaged(good, tmp_path, lambda t: t)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest["counts"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_counts_that_do_not_add_up_fail(good_output: Path, tmp_path: Path) -> None:
    """The signature of a silent loss: more chunks than vectors plus chunk rejects."""
    def lose(counts: dict) -> None:
        counts["chunks"] += 256

    problems = verify_output(str(_edit_manifest(good_output, tmp_path, lose)))
    assert any("do not add up" in p and "chunks are missing" in p for p in problems), problems
    assert main(["verify", str(tmp_path / "out")]) == 1


def test_chunks_failed_that_the_rejects_do_not_hold_fail(good_output: Path,
                                                         tmp_path: Path) -> None:
    def claim(counts: dict) -> None:
        counts["chunks_failed"] += 3
        counts["chunks"] += 3  # adds up, but the rejects do not hold those three

    problems = verify_output(str(_edit_manifest(good_output, tmp_path, claim)))
    assert any("counts.chunks_failed" in p for p in problems), problems
