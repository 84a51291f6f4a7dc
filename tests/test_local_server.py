"""The local embedding server over real HTTP on loopback, and the sample corpus it embeds.

The server is the offline stand-in for OpenAI in the demo and in end-to-end tests, so these tests
hold it to the parts of OpenAI's behaviour the pipeline relies on: both encodings, ``dimensions``,
usage, error shapes and status codes, auth that never leaks the key, and concurrency.
"""

from __future__ import annotations

import base64
import csv
import gzip
import importlib.util
import json
import re
import signal
import string
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

from pipeline.local_server import (
    DEFAULT_MODEL,
    EmbeddingServer,
    HashingEmbedder,
    Reply,
    count_tokens,
    serve_local_main,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample"

ASTRONOMY = [
    "The telescope tracked a faint comet near the horizon after midnight.",
    "Astronomers photographed the comet with a small telescope near the horizon.",
]
COOKING = "Whisk the eggs with sugar, fold in the flour and bake the cake until golden."


# Stateless tests share one server and one client: an httpx.Client costs ~50 ms to build (it
# loads the CA bundle), which would dominate the suite. Tests that read stats get their own.
@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer() as running:
        yield running


@pytest.fixture(scope="module")
def client(server: EmbeddingServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        yield http


@pytest.fixture
def fresh_server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer() as running:
        yield running


def post_embeddings(
    client: httpx.Client, inputs: Any, *, url: str = "", **fields: Any
) -> httpx.Response:
    """POST to the client's server, or to the server at base ``url`` when one is given."""
    payload = {"model": DEFAULT_MODEL, "input": inputs, **fields}
    return client.post(f"{url}/embeddings", json=payload)


def decode(response: httpx.Response) -> np.ndarray:
    """The vectors of a 200 answer in input order, from either encoding."""
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [item["index"] for item in data] == list(range(len(data)))
    rows = [
        np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        if isinstance(item["embedding"], str)
        else np.array(item["embedding"], dtype=np.float32)
        for item in data
    ]
    return np.vstack(rows)


def assert_error(
    response: httpx.Response, status: int, *, param: str | None = None
) -> dict[str, Any]:
    """Check an OpenAI-shaped error answer and return its ``error`` object."""
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"]
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    return error


# --- the embedder ------------------------------------------------------------------------------


def test_vectors_are_unit_float32_rows_in_input_order() -> None:
    vectors = HashingEmbedder(dim=64).embed([*ASTRONOMY, COOKING])
    assert vectors.shape == (3, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_a_texts_vector_does_not_depend_on_the_rest_of_the_batch() -> None:
    embedder = HashingEmbedder()
    texts = [*ASTRONOMY, COOKING, "天文学是研究恒星的科学", "x"]
    together = embedder.embed(texts)
    alone = np.vstack([embedder.embed([text]) for text in texts])
    assert np.array_equal(together, alone)


def test_seed_selects_a_different_projection() -> None:
    assert not np.array_equal(HashingEmbedder(seed=0).embed(ASTRONOMY),
                              HashingEmbedder(seed=1).embed(ASTRONOMY))


@pytest.mark.parametrize("text", ["!!!", "🙂", " \n\t", "\ud800", "?", "天文学是研究恒星的科学"])
def test_texts_without_ordinary_words_still_get_unit_vectors(text: str) -> None:
    vector = HashingEmbedder().embed([text])[0]
    assert np.isfinite(vector).all()
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)


def test_signed_sums_that_cancel_still_give_unit_vectors() -> None:
    # With one bucket, every single-letter word's two features (word and "<x>") share it, and
    # for about half of the letters their signs are opposite: the unsigned fallback must kick in.
    vectors = HashingEmbedder(dim=1).embed(list(string.ascii_lowercase))
    assert np.array_equal(np.abs(vectors), np.ones_like(vectors))


def test_an_empty_text_is_refused() -> None:
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        HashingEmbedder().embed(["fine", ""])


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("", 0), ("   ", 1), ("Hello, world!", 4), ("don't", 3), ("天文学 是", 2), ("a_b c1", 2)],
)
def test_count_tokens_counts_words_and_punctuation(text: str, tokens: int) -> None:
    assert count_tokens(text) == tokens


# --- the embeddings endpoint -------------------------------------------------------------------


def test_float_and_base64_answers_carry_the_same_vectors(client: httpx.Client) -> None:
    as_floats = decode(post_embeddings(client, ASTRONOMY, encoding_format="float"))
    as_base64 = decode(post_embeddings(client, ASTRONOMY, encoding_format="base64"))
    assert as_floats.shape == (2, 256)
    assert np.array_equal(as_floats, as_base64)


def test_float_is_the_default_encoding(client: httpx.Client) -> None:
    item = post_embeddings(client, "one text").json()["data"][0]
    assert isinstance(item["embedding"], list) and item["object"] == "embedding"


def test_vectors_are_unit_length_and_the_same_on_every_server(
    client: httpx.Client, fresh_server: EmbeddingServer
) -> None:
    first = decode(post_embeddings(client, [*ASTRONOMY, COOKING]))
    second = decode(post_embeddings(client, [*ASTRONOMY, COOKING], url=fresh_server.base_url))
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(first, second)


def test_similar_texts_are_closer_than_unrelated_ones(client: httpx.Client) -> None:
    comet, comet_again, cake = decode(post_embeddings(client, [*ASTRONOMY, COOKING]))
    assert comet @ comet_again > 0.3
    assert comet @ comet_again > comet @ cake + 0.2


def test_dimensions_truncates_and_renormalises(client: httpx.Client) -> None:
    full = decode(post_embeddings(client, [*ASTRONOMY, "a"]))
    reduced = decode(post_embeddings(client, [*ASTRONOMY, "a"], dimensions=32))
    assert reduced.shape == (3, 32)
    expected = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    np.testing.assert_allclose(reduced, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("dimensions", [0, 257, -1, True, "64", 64.0])
def test_dimensions_outside_one_to_dim_are_refused(client: httpx.Client, dimensions: Any) -> None:
    assert_error(post_embeddings(client, "x", dimensions=dimensions), 400, param="dimensions")


def test_usage_reports_the_servers_own_token_count(client: httpx.Client) -> None:
    texts = ["Hello, world!", "天文学 是", "don't"]
    body = post_embeddings(client, texts).json()
    assert body["usage"] == {"prompt_tokens": 9, "total_tokens": 9}
    assert body["model"] == DEFAULT_MODEL and body["object"] == "list"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"\xff\xfe not utf-8", None),
        (b"", None),
        (b'["model", "input"]', None),
        (b'{"model": "local-hash-embedding", "input": []}', "input"),
        (b'{"model": "local-hash-embedding", "input": ""}', "input"),
        (b'{"model": "local-hash-embedding", "input": ["ok", ""]}', "input"),
        (b'{"model": "local-hash-embedding", "input": [[1, 2, 3]]}', "input"),
        (b'{"model": "local-hash-embedding", "input": 5}', "input"),
        (b'{"model": "local-hash-embedding"}', "input"),
        (b'{"input": "x"}', "model"),
        (b'{"model": "local-hash-embedding", "input": "x", "encoding_format": "int8"}',
         "encoding_format"),
        (b'{"model": "local-hash-embedding", "input": "x", "dimension": 8}', "dimension"),
    ],
)
def test_invalid_requests_get_openai_shaped_400s(
    client: httpx.Client, body: bytes, param: str | None
) -> None:
    headers = {"content-type": "application/json"}
    response = client.post("/embeddings", content=body, headers=headers)
    assert assert_error(response, 400, param=param)["type"] == "invalid_request_error"


def test_a_chunked_body_is_read_to_its_end(client: httpx.Client) -> None:
    chunked = iter([b'{"model": "local-hash-embedding", ', b'"input": "x"}'])  # no Content-Length
    assert client.post("/embeddings", content=chunked).status_code == 200
    assert post_embeddings(client, "the next request is fine").status_code == 200


def test_an_unknown_model_is_404_model_not_found(client: httpx.Client) -> None:
    response = client.post("/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
    assert assert_error(response, 404, param="model")["code"] == "model_not_found"


def test_an_unknown_path_is_404(client: httpx.Client) -> None:
    assert_error(client.post("/completions", json={}), 404)
    assert_error(client.get("/embeddings"), 404)


def test_models_and_health_describe_the_server(
    server: EmbeddingServer, client: httpx.Client
) -> None:
    assert [m["id"] for m in client.get("/models").json()["data"]] == [DEFAULT_MODEL]
    health = client.get(f"http://127.0.0.1:{server.port}/health")
    assert health.json() == {"status": "ok", "model": DEFAULT_MODEL, "dim": 256}


def test_every_answer_carries_a_fresh_request_id(client: httpx.Client) -> None:
    ids = {post_embeddings(client, "x").headers["x-request-id"] for _ in range(3)}
    ids.add(client.get("/nowhere").headers["x-request-id"])
    assert len(ids) == 4


# --- auth --------------------------------------------------------------------------------------

API_KEY = "sk-local-test-0123456789"


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer(api_key=API_KEY) as running:
        yield running


@pytest.mark.parametrize(
    "authorization", [None, "Bearer sk-wrong-key-9876", f"Basic {API_KEY}", "Bearer"]
)
def test_a_missing_or_wrong_key_is_401_and_never_echoed(
    client: httpx.Client, keyed_server: EmbeddingServer, authorization: str | None
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    response = client.post(
        f"{keyed_server.base_url}/embeddings",
        json={"model": DEFAULT_MODEL, "input": "x"},
        headers=headers,
    )
    assert assert_error(response, 401)["code"] == "invalid_api_key"
    for secret in ("sk-wrong-key-9876", API_KEY, "0123456789"):
        assert secret not in response.text


def test_the_right_key_is_accepted_and_health_needs_none(
    client: httpx.Client, keyed_server: EmbeddingServer
) -> None:
    ok = client.post(
        f"{keyed_server.base_url}/embeddings",
        json={"model": DEFAULT_MODEL, "input": "x"},
        headers={"authorization": f"Bearer {API_KEY}"},
    )
    health = client.get(f"http://127.0.0.1:{keyed_server.port}/health")
    assert ok.status_code == 200 and health.status_code == 200


# --- stats and concurrency ---------------------------------------------------------------------


def test_stats_record_what_was_served_in_order(
    fresh_server: EmbeddingServer, client: httpx.Client
) -> None:
    server = fresh_server
    post_embeddings(client, ["first text", "second, text"], url=server.base_url)
    post_embeddings(client, "", url=server.base_url)  # refused: a request, but no inputs
    post_embeddings(client, "third", url=server.base_url)
    stats = server.stats
    assert stats.requests == 3
    assert stats.texts == ("first text", "second, text", "third")
    assert stats.inputs == 3
    assert stats.tokens == count_tokens("first text") + count_tokens("second, text") + 1
    server.reset_stats()
    assert server.stats.requests == 0 and server.stats.texts == ()


def test_twenty_parallel_requests_are_all_answered_correctly(
    fresh_server: EmbeddingServer,
) -> None:
    server = fresh_server
    texts = [f"request number {i} about telescopes and comets" for i in range(20)]
    limits = httpx.Limits(max_connections=20)
    with (
        httpx.Client(base_url=server.base_url, limits=limits, timeout=10) as client,
        ThreadPoolExecutor(max_workers=20) as pool,
    ):
        answers = list(pool.map(lambda text: decode(post_embeddings(client, text)), texts))
    assert np.array_equal(np.vstack(answers), server.embedder.embed(texts))
    assert server.stats.requests == 20
    assert sorted(server.stats.texts) == sorted(texts)


# --- extension points --------------------------------------------------------------------------


class _EnvelopeServer(EmbeddingServer):
    """A dialect server of the kind other tests build: one extra route, one dropped request."""

    def route(self, method: str, path: str, payload: Any, headers: Mapping[str, str]) -> Reply:
        if method == "GET" and path.startswith("/api/v1/embeddings/"):
            return Reply(200, {"id": path.rsplit("/", 1)[1], "status": "done"})
        if path == "/v1/crash":
            raise RuntimeError("a bug in a route")
        return super().route(method, path, payload, headers)

    def handle_embeddings(self, payload: dict[str, Any], headers: Mapping[str, str]) -> Reply:
        if payload.get("input") == "drop me":
            return Reply(0, drop_connection=True)
        return super().handle_embeddings(payload, headers)


def test_subclasses_add_routes_and_can_drop_connections() -> None:
    with _EnvelopeServer() as server, httpx.Client(base_url=server.base_url) as client:
        job = client.get(f"http://127.0.0.1:{server.port}/api/v1/embeddings/job-7")
        with pytest.raises(httpx.RemoteProtocolError):
            post_embeddings(client, "drop me")
        after = post_embeddings(client, "still serving")
        crash = client.get("/crash")
        stats = server.stats
    assert job.json() == {"id": "job-7", "status": "done"}
    assert after.status_code == 200
    assert assert_error(crash, 500)["type"] == "server_error"
    assert stats.texts == ("still serving",) and stats.requests == 4


# --- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_serve_local_prints_its_url_and_exits_0_when_stopped(stop_signal: int) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.local_server", "--port", "0", "--dim", "32"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"embedpipe local server on (http://127\.0\.0\.1:\d+/v1) \(dim=32\)\n",
                             line)
        assert match, line
        vector = decode(httpx.post(f"{match[1]}/embeddings",
                                   json={"model": DEFAULT_MODEL, "input": "x"}))
        assert vector.shape == (1, 32)
        process.send_signal(stop_signal)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()


def test_serve_local_exits_2_when_the_key_variable_is_unset(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("EMBEDPIPE_TEST_UNSET_KEY", raising=False)
    assert serve_local_main(["--port", "0", "--api-key-env", "EMBEDPIPE_TEST_UNSET_KEY"]) == 2
    assert "EMBEDPIPE_TEST_UNSET_KEY" in capsys.readouterr().err


# --- the sample corpus -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    path = REPO / "examples" / "make_sample_corpus.py"
    spec = importlib.util.spec_from_file_location("make_sample_corpus", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_the_sample_generator_is_deterministic(generator: ModuleType, tmp_path: Path) -> None:
    generator.main(["--out", str(tmp_path / "a")])
    generator.main(["--out", str(tmp_path / "b")])
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_the_committed_sample_is_what_the_generator_writes(
    generator: ModuleType, tmp_path: Path
) -> None:
    generator.main(["--out", str(tmp_path)])
    fresh, committed = _files(tmp_path), _files(SAMPLE)
    assert sorted(committed) == sorted(fresh), "re-run python examples/make_sample_corpus.py"
    for name, data in fresh.items():
        # Compare .gz contents, not bytes: another zlib build may compress the same text
        # differently, and that is not staleness.
        unpack = gzip.decompress if name.endswith(".gz") else bytes
        assert unpack(committed[name]) == unpack(data), f"{name} is stale; re-run the generator"


def _rejects_by_readme_rules(root: Path) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Records per file and the rejects they deserve, by the rules the README states.

    Written from the README, not from the generator, so it checks the README's claims.
    """
    rejects: list[dict[str, Any]] = []
    seen_ids: set[str] = set()

    def check(file: str, position: int, raw_id: Any, text: Any) -> None:
        doc_id = (raw_id.strip() if isinstance(raw_id, str) else "") or None
        if doc_id is None:
            reason = "missing_id"
        elif text is None or (isinstance(text, str) and not text.strip()):
            reason = "empty_text"
        elif not isinstance(text, str):
            reason = "not_text"
        elif len(text.encode()) > 200_000:
            reason = "too_large"
        elif doc_id in seen_ids:
            reason = "duplicate_id"
        else:
            seen_ids.add(doc_id)
            return
        rejects.append({"file": file, "position": position, "id": doc_id, "reason": reason})

    lines = gzip.decompress((root / "articles.jsonl.gz").read_bytes()).split(b"\n")[:-1]
    for position, raw in enumerate(lines, start=1):
        unreadable = {"file": "articles.jsonl.gz", "position": position, "id": None}
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            rejects.append({**unreadable, "reason": "invalid_utf8"})
            continue
        except ValueError:
            value = None
        if isinstance(value, dict):
            check("articles.jsonl.gz", position, value.get("id"), value.get("text"))
        else:
            rejects.append({**unreadable, "reason": "malformed_record"})
    with open(root / "notes.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for position, row in enumerate(rows, start=1):
        check("notes.csv", position, row["id"], row["text"])
    pages = sorted(p for p in (root / "pages").rglob("*") if p.is_file())
    for page in pages:
        check("pages/", 0, page.relative_to(root / "pages").as_posix(), page.read_text("utf-8"))
    records = {"articles.jsonl.gz": len(lines), "notes.csv": len(rows), "pages/": len(pages)}
    return records, rejects


def test_the_sample_readme_states_the_true_counts() -> None:
    readme = (SAMPLE / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```json\n(.*?)\n```", readme, re.DOTALL)
    assert block, "README.md lost its expected-counts block"
    expected = json.loads(block[1])
    records, rejects = _rejects_by_readme_rules(SAMPLE)
    assert records == expected["records_by_file"]
    assert sum(records.values()) == expected["records"]
    assert rejects == [
        {key: bad[key] for key in ("file", "position", "id", "reason")}
        for bad in expected["bad_records"]
    ]
    assert Counter(r["reason"] for r in rejects) == expected["rejects_by_reason"]
    assert expected["valid_documents"] == expected["records"] - len(rejects)
    assert set(expected["rejects_by_reason"]) == {
        "missing_id", "empty_text", "not_text", "malformed_record", "invalid_utf8", "too_large",
        "duplicate_id",
    }


def test_the_sample_stays_small() -> None:
    assert sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file()) < 1_000_000
