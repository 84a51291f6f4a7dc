"""Multimodal records end to end: text + image records through Ark's ``/embeddings/multimodal``
and the envelope API, on the default runner, against loopback servers whose fused model the test
computes on its own (:mod:`tests.support.multimodal_server`).

One corpus of every kind of record: text only, image only, text + image (PNG and JPEG beside the
corpus, a ``data:`` URL), and bad images (missing, not an image, truncated, a header that
declares 49 M pixels, a file over 10 MB, a caption over the model's limit). Every valid record
must be one vector equal to the server's for its text and image bytes; every bad one a reject
with its reason; usage tokens by kind equal to what the server billed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.run import RunRequest, execute
from tests.support.checks import embedding_matrix
from tests.support.fixtures import Serve
from tests.support.harness import make_config, read_output
from tests.support.multimodal_server import (
    MULTIMODAL_MODEL,
    ArkMultimodalServer,
    MultimodalEnvelopeServer,
    fused_vector,
    sparse_vector,
)

DIM = 1024


def png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "JPEG")
    return buffer.getvalue()


def declared_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` × ``height`` (no pixel data to speak of)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


RED, GREEN, BLUE = png(40, 30, (200, 0, 0)), png(28, 28, (0, 200, 0)), jpeg(64, 48, (0, 0, 200))
DATA_IMAGE = png(12, 10, (9, 9, 9))
LONG_CAPTION = "word " * 5000


def build_corpus(root: str, storage_options: dict[str, Any] | None = None,
                 oversized_file: bool = True) -> tuple[dict, dict]:
    """Write the corpus under ``root``; ``(valid, bad)``: id → (text, image bytes or None)
    for the valid records, id → reason for the bad ones."""
    fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
    files = {
        "img/red.png": RED, "img/green.png": GREEN, "img/blue.jpg": BLUE,
        "img/not-an-image.png": b"this is text, not pixels\n" * 10,
        "img/truncated.png": RED[: len(RED) // 2],
        "img/huge-header.png": declared_png(7000, 7000),
    }
    if oversized_file:
        files["img/over-10mb.png"] = RED + b"\0" * (10 * 1024 * 1024)
    fs.makedirs(f"{base}/img", exist_ok=True)  # a local folder must exist first
    for name, data in files.items():
        fs.pipe_file(f"{base}/{name}", data)
    data_url = "data:image/png;base64," + base64.b64encode(DATA_IMAGE).decode()
    records = [
        {"id": "text-only", "text": "a plain caption without any picture"},
        {"id": "image-only", "text": "", "image": "img/red.png"},
        {"id": "image-null-text", "text": None, "image": "img/green.png"},
        {"id": "text-image", "text": "  a blue square, in JPEG  ", "image": "img/blue.jpg"},
        {"id": "same-image-other-text", "text": "red again", "image": "img/red.png"},
        {"id": "data-url", "text": "a tiny dark image", "image": data_url},
        {"id": "missing", "text": "where is it", "image": "img/missing.png"},
        {"id": "not-image", "text": "text file", "image": "img/not-an-image.png"},
        {"id": "truncated", "text": "half a png", "image": "img/truncated.png"},
        {"id": "huge-pixels", "text": "too many pixels", "image": "img/huge-header.png"},
        {"id": "long-caption", "text": LONG_CAPTION, "image": "img/red.png"},
        {"id": "empty", "text": "", "image": None},
        {"id": "bad-data-url", "text": "x", "image": "data:image/png;base64,@@@"},
    ]
    if oversized_file:
        records.append({"id": "over-10mb", "text": "big", "image": "img/over-10mb.png"})
    with fs.open(f"{base}/records.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    valid = {
        "text-only": ("a plain caption without any picture", None),
        "image-only": ("", RED),
        "image-null-text": ("", GREEN),
        "text-image": ("a blue square, in JPEG", BLUE),
        "same-image-other-text": ("red again", RED),
        "data-url": ("a tiny dark image", DATA_IMAGE),
    }
    bad = {"missing": "image_unreadable", "not-image": "invalid_image",
           "truncated": "invalid_image", "huge-pixels": "image_too_large",
           "long-caption": "too_large", "empty": "empty_text",
           "bad-data-url": "image_unreadable"}
    if oversized_file:
        bad["over-10mb"] = "image_too_large"
    return valid, bad


def mm_config(root: str, out: str, base_url: str, *, kind: str = "ark",
              storage_options: dict[str, Any] | None = None, sparse: bool = True,
              provider: dict[str, Any] | None = None, **sections: dict) -> Any:
    provider = {"kind": kind, "base_url": base_url, "multimodal": True,
                "max_inputs_per_request": 8, **(provider or {})}
    if kind == "ark":
        provider.update(model=MULTIMODAL_MODEL, dimensions=DIM, sparse=sparse)
    return make_config([f"{root}/*.jsonl"], out, base_url, storage_options,
                       input={"image_field": "image", "metadata_fields": []},
                       provider=provider, **sections)


def check_output(output: str, server: Any, valid: dict, bad: dict, *, dim: int,
                 sparse: bool, storage_options: dict[str, Any] | None = None) -> dict:
    manifest, tables = read_output(output, storage_options)
    assert manifest["status"] == "complete", manifest.get("error")
    vectors = tables["vectors"]
    assert vectors is not None
    rows = vectors.to_pylist()
    matrix = embedding_matrix(vectors)
    assert sorted(r["doc_id"] for r in rows) == sorted(valid)  # one vector per valid record
    for i, row in enumerate(rows):
        text, image = valid[row["doc_id"]]
        expected = fused_vector([text] if text else [], [image] if image else [], dim)
        np.testing.assert_array_equal(matrix[i], expected)
        assert row["image_sha256"] == (hashlib.sha256(image).hexdigest() if image else None)
        assert (row["image"] is None) == (image is None)
        if sparse:
            pairs = sparse_vector([text] if text else [], [image] if image else [])
            assert [(s["index"], s["value"]) for s in row["sparse_embedding"]] == pairs
        else:
            assert "sparse_embedding" not in vectors.column_names
    rejects = {r["doc_id"]: r for r in tables["rejects"].to_pylist()}
    assert {k: r["reason"] for k, r in rejects.items()} == bad
    for doc_id, reject in rejects.items():
        if reject["stage"] == "image":  # the detail names the record and the reference
            assert doc_id in reject["detail"], reject
            assert "'img/" in reject["detail"] or "'data:" in reject["detail"], reject
    # Usage: every ok row's tokens by kind, summed, is what the server billed (the preflight
    # included, which is a text-only request to the same endpoint).
    ok = [u for u in tables["usage"].to_pylist() if u["outcome"] == "ok"]
    billed = server.billed
    assert len(ok) == len(billed) == len(valid) + 1
    assert sum(u["text_tokens"] for u in ok) == sum(b.text_tokens for b in billed)
    assert sum(u["image_tokens"] for u in ok) == sum(b.image_tokens for b in billed)
    assert sum(u["prompt_tokens"] for u in ok) == sum(
        b.text_tokens + b.image_tokens for b in billed)
    assert all(u["n_inputs"] == 1 for u in ok)
    assert manifest["usage"]["image_tokens"] == sum(b.image_tokens for b in billed) > 0
    assert manifest["usage"]["text_tokens"] == sum(b.text_tokens for b in billed) > 0
    assert manifest["counts"]["chunks_embedded"] == len(valid)
    return manifest


def test_ark_multimodal_local_images(tmp_path: Path, serve: Serve) -> None:
    server = serve(ArkMultimodalServer)
    root = str(tmp_path / "corpus")
    valid, bad = build_corpus(root)
    output = str(tmp_path / "out")
    cfg = mm_config(root, output, server.base_url)
    assert execute(RunRequest(cfg, quiet=True)) == 0
    check_output(output, server, valid, bad, dim=DIM, sparse=True)


def test_ark_multimodal_images_on_s3(s3_options: dict[str, Any], serve: Serve) -> None:
    server = serve(ArkMultimodalServer)
    root = "s3://corpus/mm"
    valid, bad = build_corpus(root, s3_options, oversized_file=False)
    output = "s3://corpus/out-mm"
    cfg = mm_config(root, output, server.base_url, storage_options=s3_options, sparse=False,
                    cache={"enabled": True})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    check_output(output, server, valid, bad, dim=DIM, sparse=False, storage_options=s3_options)


def test_envelope_multimodal_parts(tmp_path: Path, serve: Serve) -> None:
    server = serve(MultimodalEnvelopeServer, dim=48, model="mm-envelope")
    root = str(tmp_path / "corpus")
    valid, bad = build_corpus(root)
    output = str(tmp_path / "out")
    cfg = mm_config(root, output, server.root_url, kind="envelope",
                    provider={"model": "mm-envelope"})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    check_output(output, server, valid, bad, dim=48, sparse=False)
    # Typed parts as input, one record a request; images as data: URLs with their MIME type.
    parts = [p["input"] for p in server.payloads if isinstance(p["input"][0], dict)]
    assert len(parts) == len(valid) + 1  # and the preflight, a text part
    urls = [x["image_url"]["url"] for record in parts for x in record if x["type"] == "image_url"]
    assert any(u.startswith("data:image/jpeg;base64,") for u in urls)
    assert all(u.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for u in urls)

    # Again over the same output: every record is a cache hit (keyed by text and image bytes),
    # only the preflight is sent, and the vectors are the same.
    sent = len(server.billed)
    again = mm_config(root, output, server.root_url, kind="envelope",
                      provider={"model": "mm-envelope"}, output={"overwrite": True})
    assert execute(RunRequest(again, quiet=True)) == 0
    assert len(server.billed) == sent + 1
    manifest, tables = read_output(output)
    assert manifest["cache"]["hits"] == len(valid)
    assert sorted(tables["vectors"].column("image_sha256").to_pylist(), key=str) == sorted(
        (hashlib.sha256(i).hexdigest() if i else None for _, i in valid.values()), key=str)


@pytest.mark.parametrize("dimensions", [None, 2048])
def test_ark_text_only_runs_unchanged(tmp_path: Path, serve: Serve, dimensions: int | None
                                      ) -> None:
    """Without provider.multimodal, Ark goes to the text endpoint, dimensions cut client-side."""
    server = serve(ArkMultimodalServer, models={"doubao-embedding-text-240715": 2560})
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.jsonl").write_text(json.dumps({"id": "a", "text": "hello there"}) + "\n")
    cfg = make_config([f"{root}/*.jsonl"], str(tmp_path / "out"), server.base_url,
                      input={"metadata_fields": []},
                      provider={"kind": "ark", "model": "doubao-embedding-text-240715",
                                "dimensions": dimensions})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    manifest, tables = read_output(str(tmp_path / "out"))
    assert manifest["dimensions"] == (dimensions or 2560)
    assert server.billed == []  # nothing went to the multimodal endpoint
    assert "image" not in tables["vectors"].column_names
    assert "image_tokens" not in tables["usage"].column_names


def test_a_refused_record_is_rejected_alone(tmp_path: Path, serve: Serve) -> None:
    """Ark's moderation refuses one record (InputTextSensitiveContentDetected): that record is
    a provider_rejected reject, the others are vectors, and the run exits 1."""
    server = serve(ArkMultimodalServer, poison="<<flagged>>")
    root = tmp_path / "corpus"
    (root / "img").mkdir(parents=True)
    (root / "img" / "red.png").write_bytes(RED)
    records = [{"id": "ok", "text": "fine", "image": "img/red.png"},
               {"id": "flagged", "text": "<<flagged>> words", "image": "img/red.png"},
               {"id": "ok-too", "text": "", "image": "img/red.png"}]
    (root / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    output = str(tmp_path / "out")
    assert execute(RunRequest(mm_config(str(root), output, server.base_url), quiet=True)) == 1
    manifest, tables = read_output(output)
    assert sorted(tables["vectors"].column("doc_id").to_pylist()) == ["ok", "ok-too"]
    [reject] = tables["rejects"].to_pylist()
    assert (reject["doc_id"], reject["stage"], reject["reason"]) == (
        "flagged", "embed", "provider_rejected")
    assert "InputTextSensitiveContentDetected" in reject["detail"]
    assert manifest["counts"]["chunks_failed"] == 1


def sparse_by_id(output: str) -> dict[str, list[tuple[int, float]]]:
    _, tables = read_output(output)
    return {row["doc_id"]: [(s["index"], s["value"]) for s in row["sparse_embedding"]]
            for row in tables["vectors"].to_pylist()}


@pytest.mark.parametrize("fresh_output", [False, True])
def test_a_sparse_rerun_is_served_from_the_cache(tmp_path: Path, serve: Serve,
                                                  fresh_output: bool) -> None:
    """A sparse run's re-run (``--overwrite``, or a new output sharing the cache) sends only its
    preflight; its dense and sparse vectors are the first run's, and the server's, row by row."""
    server = serve(ArkMultimodalServer)
    root = str(tmp_path / "corpus")
    valid, bad = build_corpus(root, oversized_file=False)
    output = str(tmp_path / "out")
    cache = {"path": str(tmp_path / "cache")}
    assert execute(RunRequest(mm_config(root, output, server.base_url, cache=cache),
                              quiet=True)) == 0
    check_output(output, server, valid, bad, dim=DIM, sparse=True)
    first = sparse_by_id(output)

    sent = len(server.billed)
    again_out = str(tmp_path / "out-again") if fresh_output else output
    again = mm_config(root, again_out, server.base_url, cache=cache,
                      output={"overwrite": True})
    assert execute(RunRequest(again, quiet=True)) == 0
    assert len(server.billed) == sent + 1  # the preflight, nothing else
    manifest, tables = read_output(again_out)
    assert manifest["status"] == "complete"
    assert (manifest["cache"]["hits"], manifest["cache"]["misses"]) == (len(valid), 0)
    second = sparse_by_id(again_out)
    assert second == first
    for doc_id, (text, image) in valid.items():
        assert second[doc_id] == sparse_vector([text] if text else [], [image] if image else [])
    matrix = embedding_matrix(tables["vectors"])
    for i, doc_id in enumerate(tables["vectors"].column("doc_id").to_pylist()):
        text, image = valid[doc_id]
        np.testing.assert_array_equal(
            matrix[i], fused_vector([text] if text else [], [image] if image else [], DIM))
    # The sparse column keeps its type when it comes from the cache.
    assert tables["vectors"].schema.field("sparse_embedding").type == pa.list_(
        pa.struct([("index", pa.int32()), ("value", pa.float32())]))


def test_dense_cache_segments_keep_their_format(tmp_path: Path, serve: Serve) -> None:
    """A run without sparse vectors writes segments exactly as before sparse ones were cached:
    two columns, and the very bytes the two-column IPC writer makes of them."""
    server = serve(ArkMultimodalServer)
    root = str(tmp_path / "corpus")
    valid, _ = build_corpus(root, oversized_file=False)
    cache = tmp_path / "cache"
    cfg = mm_config(root, str(tmp_path / "out"), server.base_url, sparse=False,
                    cache={"path": str(cache)})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    segments = sorted(cache.glob("*/seg-*.arrow"))
    assert len(segments) == len(valid)
    for path in segments:
        data = path.read_bytes()
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        assert table.schema == pa.schema([
            ("content_sha256", pa.string()),
            ("embedding", pa.list_(pa.float32(), DIM))])
        matrix = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        expected = pa.table({
            "content_sha256": pa.array(table.column("content_sha256").to_pylist(),
                                       pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(matrix.astype(np.float32).reshape(-1)), DIM)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, expected.schema) as writer:
            writer.write_table(expected)
        assert sink.getvalue().to_pybytes() == data
