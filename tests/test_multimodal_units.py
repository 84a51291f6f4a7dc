"""Multimodal pieces on their own: config rules, image checks, the providers' requests and
answers, cache keys and ``plan``'s image figures."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.graph import cache_spec, namespace_key
from tests.test_multimodal import RED, build_corpus, declared_png, mm_config
from transforms.errors import ConfigError, ImageError, InputRejectedError, MalformedResponseError
from transforms.images import (
    ImageCaps,
    ImageLoader,
    content_key,
    image_tokens,
    inspect_image,
    resolve,
)
from transforms.providers import provider_class_for
from transforms.providers.multimodal import (
    ArkMultimodalProvider,
    EnvelopeMultimodalProvider,
    parse_sparse,
)
from transforms.types import RawRecord
from transforms.validate import validate_record

BASE: dict[str, Any] = {"input": {"path": "corpus/*.jsonl"}}
ARK_MM = {"kind": "ark", "base_url": "http://127.0.0.1:9/api/v3",
          "model": "doubao-embedding-vision-250615", "multimodal": True}


def config(input_: dict[str, Any] | None = None, **provider: Any):
    return parse_config({"input": {**BASE["input"], **(input_ or {})}, "provider": provider})


# -- config ---------------------------------------------------------------------------------


def test_image_field_without_multimodal_is_an_error_that_says_why() -> None:
    with pytest.raises(ConfigError) as info:
        config({"image_field": "image"}, kind="ark")
    assert info.value.key == "input.image_field"
    assert "provider.multimodal: true" in str(info.value)


def test_multimodal_without_image_field_is_an_error_that_says_why() -> None:
    with pytest.raises(ConfigError) as info:
        config(**ARK_MM)
    assert info.value.key == "provider.multimodal"
    assert "input.image_field" in str(info.value)


def test_sparse_without_multimodal_and_multimodal_for_openai_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"provider\.multimodal: true") as info:
        config(kind="ark", sparse=True)
    assert info.value.key == "provider.sparse"
    with pytest.raises(ConfigError, match=r"provider\.multimodal: does not apply to "
                                          r"provider\.kind 'openai'.*kinds ark and envelope"):
        config({"image_field": "image"}, kind="openai", multimodal=True)
    with pytest.raises(ConfigError, match=r"provider\.sparse: does not apply to "
                                          r"provider\.kind 'envelope'"):
        config({"image_field": "image"}, kind="envelope", multimodal=True, sparse=True)


def test_multimodal_dimensions_are_the_servers() -> None:
    with pytest.raises(ConfigError, match="1024 or 2048") as info:
        config({"image_field": "image"}, **ARK_MM, dimensions=512)
    assert info.value.key == "provider.dimensions"
    cfg = config({"image_field": "image"}, **ARK_MM, dimensions=1024, sparse=True)
    assert provider_class_for(cfg.provider) is ArkMultimodalProvider


def test_misuse_is_exit_2_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("input:\n  path: data/*.jsonl\n  image_field: image\n")
    assert main(["run", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "input.image_field" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- validate and the image checks ----------------------------------------------------------


def test_a_record_with_an_image_needs_no_text_only_in_multimodal_runs() -> None:
    record = RawRecord("file:///c/a.jsonl", 1, "a", None, image="img/a.png")
    assert validate_record(record, 1000).reason == "empty_text"  # type: ignore[union-attr]
    doc = validate_record(record, 1000, images=True)
    assert (doc.text, doc.image) == ("", "img/a.png")  # type: ignore[union-attr]
    odd = validate_record(RawRecord("f", 1, "a", "t", image=7), 1000, images=True)
    assert odd.reason == "invalid_image"  # type: ignore[union-attr]


def test_references_resolve_beside_the_records_file() -> None:
    assert resolve("img/a.png", "s3://b/corpus/x.jsonl") == "s3://b/corpus/img/a.png"
    assert resolve("../a.png", "file:///d/c/x.jsonl") == "file:///d/a.png"
    assert resolve("gs://o/a.png", "s3://b/x.jsonl") == "gs://o/a.png"
    assert resolve("/abs/a.png", "s3://b/x.jsonl") == "/abs/a.png"


def test_image_checks_name_their_reason() -> None:
    assert inspect_image(RED)[:1] == ("image/png",)
    cases = {b"GIF89a-not-really": "invalid_image", RED[:60]: "invalid_image",
             declared_png(7000, 7000): "image_too_large"}
    for data, reason in cases.items():
        with pytest.raises(ImageError) as info:
            inspect_image(data)
        assert info.value.reason == reason
    with pytest.raises(ImageError, match="over 10 bytes"):
        inspect_image(RED, ImageCaps(max_bytes=10))
    with pytest.raises(ImageError, match="pixels, over the cap of 100"):
        inspect_image(RED, ImageCaps(max_pixels=100))
    assert image_tokens(40, 30) == 2 and image_tokens(10_000, 3000) == 1312


def test_loader_sends_data_urls_and_refuses_a_changed_image(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(RED)
    loader = ImageLoader()
    part, data = loader.load("a.png", f"file://{tmp_path}/x.jsonl")
    assert part.sha256 == hashlib.sha256(RED).hexdigest() and data == RED
    assert loader.url_to_send(part) == "data:image/png;base64," + base64.b64encode(RED).decode()
    remote, none = loader.load("https://example.com/a.png", "file:///x.jsonl")
    assert none is None and loader.url_to_send(remote) == "https://example.com/a.png"
    (tmp_path / "a.png").write_bytes(RED + b"\0")
    with pytest.raises(ImageError, match="changed after it was checked"):
        loader.url_to_send(part)


def test_cache_key_covers_text_image_model_dimension_and_sparse() -> None:
    part, _ = ImageLoader().load("data:image/png;base64," + base64.b64encode(RED).decode(), "x")
    keys = {content_key("t", None), content_key("t", part), content_key("u", part)}
    assert len(keys) == 3
    text_cfg = config(kind="ark", base_url="http://h/api/v3", model="m")
    assert "multimodal" not in namespace_key(text_cfg)  # text runs keep their digests
    mm = config({"image_field": "image"}, **ARK_MM, dimensions=1024)
    key = namespace_key(mm)
    assert (key["multimodal"], key["sparse"], key["dimensions"]) == (True, False, 1024)
    sparse = config({"image_field": "image"}, **ARK_MM, dimensions=1024, sparse=True)
    assert namespace_key(sparse)["sparse"] is True
    # Sparse vectors are cached too, in a namespace of their own (the sparse flag is keyed).
    sparse_spec, dense_spec = cache_spec(sparse, "run"), cache_spec(mm, "run")
    assert sparse_spec is not None and dense_spec is not None
    assert (sparse_spec.sparse, dense_spec.sparse) == (True, False)
    assert sparse_spec.url != dense_spec.url


# -- the providers --------------------------------------------------------------------------


def _ark(**extra: Any) -> ArkMultimodalProvider:
    cfg = config({"image_field": "image"}, **ARK_MM, **extra).provider
    return ArkMultimodalProvider(cfg)  # type: ignore[arg-type]


def _answer(body: Any, status: int = 200) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(status, json=body))


def test_ark_request_is_one_records_parts_with_server_side_options() -> None:
    provider = _ark(dimensions=1024, sparse=True)
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}]
    request = provider.build_request([parts], None)
    assert request.url.endswith("/embeddings/multimodal")
    assert request.json == {"model": ARK_MM["model"], "input": parts, "encoding_format": "base64",
                            "dimensions": 1024, "sparse_embedding": {"type": "enabled"}}
    with pytest.raises(ValueError, match="one record"):
        provider.build_request([parts, parts], None)


def test_ark_answer_is_one_object_with_sparse_and_usage_by_kind() -> None:
    provider = _ark(dimensions=1024, sparse=True)
    vector = [0.5] * 1024
    body = {"id": "r", "data": {"object": "embedding", "embedding": vector,
                                "sparse_embedding": [{"index": 9, "value": 0.5},
                                                     {"index": 2, "value": 1.5}]},
            "usage": {"prompt_tokens": 7, "total_tokens": 7,
                      "prompt_tokens_details": {"text_tokens": 3, "image_tokens": 4}}}
    with httpx.Client(transport=_answer(body)) as client:
        result = provider.embed(client, [[{"type": "text", "text": "a"}]], None, 5)
    assert result.vectors.shape == (1, 1024)
    assert (result.text_tokens, result.image_tokens, result.prompt_tokens) == (3, 4, 7)
    indices, values = result.sparse[0]  # type: ignore[index]
    assert indices.tolist() == [2, 9] and values.tolist() == [1.5, 0.5]
    bad = {**body, "data": [body["data"], body["data"]]}  # a list of vectors: not fused
    with httpx.Client(transport=_answer(bad)) as client, pytest.raises(MalformedResponseError):
        provider.embed(client, [[{"type": "text", "text": "a"}]], None, 5)
    short = {**body, "data": {**body["data"], "embedding": [0.5] * 7}}
    with httpx.Client(transport=_answer(short)) as client, pytest.raises(MalformedResponseError):
        provider.embed(client, [[{"type": "text", "text": "a"}]], None, 5)
    refused = {"error": {"code": "InputImageSensitiveContentDetected", "message": "no"}}
    with httpx.Client(transport=_answer(refused, 400)) as client, pytest.raises(
            InputRejectedError):
        provider.embed(client, [[{"type": "text", "text": "a"}]], None, 5)


def test_sparse_answers_are_checked() -> None:
    assert parse_sparse([])[0].dtype == np.int32
    for bad in (None, [{"index": -1, "value": 1}], [{"index": 1, "value": float("nan")}],
                [{"index": 1, "value": 1}, {"index": 1, "value": 2}], [{"index": "1"}]):
        with pytest.raises(MalformedResponseError):
            parse_sparse(bad)


def test_envelope_sends_the_parts_as_input() -> None:
    cfg = config({"image_field": "image"}, kind="envelope", base_url="http://h",
                 multimodal=True, parameters={"a": 1}).provider
    provider = provider_class_for(cfg)(cfg)
    assert isinstance(provider, EnvelopeMultimodalProvider)
    parts = [{"type": "text", "text": "a"}]
    assert provider.build_request([parts], None).json["input"] == parts  # type: ignore[index]


# -- plan -----------------------------------------------------------------------------------


def test_plan_counts_images_and_estimates_their_tokens(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    root = str(tmp_path / "corpus")
    valid, _ = build_corpus(root, oversized_file=False)
    cfg = mm_config(root, str(tmp_path / "out"), "http://127.0.0.1:9/api/v3")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.model_dump(by_alias=True, mode="json")))
    assert main(["plan", "--config", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    images = [image for _, image in valid.values() if image is not None]
    assert plan["images"] == len(images) == 5
    # 40x30 (2), 28x28 (1), 64x48 (4), 40x30 (2), 12x10 (1) tokens, by the header.
    assert plan["image_tokens"] == 10
    assert plan["chunks"] == plan["requests"] == len(valid)
    assert plan["rejects_by_reason"]["image_unreadable"] == 2
