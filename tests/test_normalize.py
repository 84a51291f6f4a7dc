"""``provider.normalize`` for every kind: servers that return vectors of any length.

infinity serving a ``dimensions`` request answers the first values of the native vector without
renormalising them (norms 0.52-0.68 for all-MiniLM-L6-v2); a gateway may scale its vectors.
``normalize: true`` makes every written vector a unit vector, whatever the kind; ``false``
writes what the server sent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pipeline.config import parse_config
from pipeline.graph import cache_spec, namespace_key
from pipeline.local_model import encode_embedding
from pipeline.local_server import EmbeddingServer, HashingEmbedder, Reply
from pipeline.run import RunRequest, execute
from tests.support.checks import embedding_matrix
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.fixtures import Serve
from tests.support.harness import MODEL, make_config, read_output
from transforms.providers import REGISTRY, get_provider_class


def scale_of(text: str) -> float:
    """A length for each text's vector, between 0.5 and 2.5, fixed by the text."""
    return 0.5 + hashlib.sha256(text.encode()).digest()[0] / 128.0


class UnnormalisedServer(EmbeddingServer):
    """Answers the hashing model's vectors, each scaled by :func:`scale_of` its text."""

    def handle_embeddings(self, payload: dict[str, Any], headers) -> Reply:
        request = self.parse_embedding_request(payload)
        vectors = self.embedder.embed(request.texts)
        scaled = vectors * np.array([[scale_of(t)] for t in request.texts], np.float32)
        data = [{"object": "embedding", "index": i,
                 "embedding": encode_embedding(v, request.encoding_format)}
                for i, v in enumerate(scaled)]
        tokens = 3 * len(request.texts)
        self.record_served(request.texts, tokens)
        return Reply(200, {"object": "list", "data": data, "model": self.model,
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def run(tmp_path: Path, serve: Serve, normalize: bool | None) -> tuple[list[str], np.ndarray]:
    root = str(tmp_path / "corpus")
    write_corpus(root)
    output = str(tmp_path / "out")
    server = serve(UnnormalisedServer, dim=32, model=MODEL)
    provider = {} if normalize is None else {"normalize": normalize}
    cfg = make_config(corpus_patterns(root), output, server.base_url, provider=provider,
                      output={"include_text": True})
    assert execute(RunRequest(cfg, quiet=True)) == 0
    _manifest, tables = read_output(output)
    vectors = tables["vectors"]
    return vectors.column("text").to_pylist(), embedding_matrix(vectors)


def test_openai_kind_normalises_when_asked(tmp_path: Path, serve: Serve) -> None:
    texts, got = run(tmp_path, serve, normalize=True)
    norms = np.linalg.norm(got, axis=1)
    assert len(texts) > 20
    assert np.all(np.abs(norms - 1.0) <= 1e-5), (norms.min(), norms.max())
    # The direction is the server's: the model's unit vector.
    np.testing.assert_allclose(got, HashingEmbedder(dim=32).embed(texts), atol=1e-5)


@pytest.mark.parametrize("normalize", [False, None])
def test_openai_kind_writes_vectors_as_served_otherwise(tmp_path: Path, serve: Serve,
                                                        normalize: bool | None) -> None:
    texts, got = run(tmp_path, serve, normalize=normalize)
    want = HashingEmbedder(dim=32).embed(texts) * np.array([[scale_of(t)] for t in texts])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.abs(np.linalg.norm(got, axis=1) - 1.0).max() > 0.4


def answer(vectors: np.ndarray) -> dict[str, Any]:
    return {"data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": 2, "total_tokens": 2}}


RAW = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], np.float32)
UNIT = RAW / np.linalg.norm(RAW, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_every_kind_accepts_and_applies_normalize(kind: str) -> None:
    """One place applies it: the same answer is normalised by every dialect's provider."""
    base = {"input": {"path": "c/*.jsonl"}}
    cfg = parse_config({**base, "provider": {"kind": kind, "normalize": True,
                                             "base_url": "http://127.0.0.1:9/v1"}}).provider
    assert cfg.normalize is True
    provider = get_provider_class(kind)(cfg)

    def handler(request: httpx.Request) -> httpx.Response:
        body = answer(RAW)
        if kind == "envelope":
            body = {"success": True, "code": "200", "message": "ok", "data": body}
        return httpx.Response(200, json=body)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        result = provider.embed(client, ["a", "b"], None, 2)
    np.testing.assert_allclose(result.vectors, UNIT, rtol=1e-6)
    assert parse_config(base).provider.normalize is False


def test_cache_namespace_digests_are_unchanged_unless_normalize_is_set(tmp_path: Path) -> None:
    """Configs that never set ``normalize`` keep their cache namespace (and so their cache);
    an OpenAI config that now sets it gets a namespace of its own, as its vectors differ."""
    base: dict[str, Any] = {"input": {"path": "c/*.jsonl"}, "output": {"path": str(tmp_path)}}
    plain = parse_config(base)
    assert namespace_key(plain)["normalize"] is False
    key = {"kind": "openai", "endpoint": "api.openai.com/v1", "model": "text-embedding-3-small",
           "dimensions": None, "normalize": False, "parameters": {}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    spec = cache_spec(plain, "r")
    assert spec is not None and spec.url.endswith(f"/{digest}")
    normalised = parse_config({**base, "provider": {"normalize": True}})
    other = cache_spec(normalised, "r")
    assert namespace_key(normalised)["normalize"] is True
    assert other is not None and other.url != spec.url
