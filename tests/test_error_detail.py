"""Provider error text as rejects and usage rows store it: bounded, and the status said once.

infinity (FastAPI) answers a request it refuses with an OpenAI-shaped 422 whose ``message`` is
the validation error, echoing the whole ``input`` (every text of the request) and whose
``code`` repeats the HTTP status. Copied as is, one refused request put megabytes into every
reject row of its chunks and read ``HTTP 422 422: ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.local_server import EmbeddingServer, Reply
from pipeline.run import RunRequest, execute
from tests.support.corpus import corpus_patterns, write_corpus
from tests.support.fixtures import Serve
from tests.support.harness import MODEL, make_config, read_output
from transforms.errors import MAX_DETAIL_CHARS, InputRejectedError, ProviderError
from transforms.providers.base import Provider


def infinity_422(texts: list[str]) -> dict[str, Any]:
    """infinity's answer to a request it refuses: the validation error, ``input`` included."""
    errors = [{"type": "string_too_long", "loc": ("body", "input"),
               "msg": "String should have at most 122880 characters", "input": texts}]
    return {"error": {"message": str(errors), "type": "UnprocessableEntity", "param": None,
                      "code": 422}}


def classify(status: int, body: dict[str, Any]) -> ProviderError:
    return Provider.classify_error(Provider.__new__(Provider),
                                   httpx.Response(status, json=body))


def test_a_code_that_repeats_the_status_is_said_once() -> None:
    error = classify(400, {"object": "error", "message": "too long", "code": 400})
    assert error.describe() == "HTTP 400: too long"
    error = classify(422, {"error": {"message": "bad input", "code": "422"}})
    assert error.describe() == "HTTP 422: bad input"
    # A code of its own is kept.
    error = classify(400, {"error": {"message": "too long", "code": "context_length_exceeded"}})
    assert error.describe() == "HTTP 400 context_length_exceeded: too long"


def test_an_echoed_input_is_cut_to_the_bound_with_its_length_noted() -> None:
    texts = [f"document {i} " + "lorem ipsum " * 400 for i in range(50)]
    error = classify(422, infinity_422(texts))
    assert isinstance(error, InputRejectedError)
    full = len(error.message)
    assert full > 100_000  # the whole message is kept for classification (caps, quota words)
    detail = error.describe()
    assert detail.startswith("HTTP 422: [{'type': 'string_too_long'")
    assert "String should have at most 122880 characters" in detail
    assert len(detail) <= len("HTTP 422: ") + MAX_DETAIL_CHARS + 60
    assert detail.endswith(f"… [{full:,} characters in all]")
    assert "document 49" not in detail


def test_a_short_message_is_kept_whole() -> None:
    message = "x" * MAX_DETAIL_CHARS
    assert ProviderError(message, http_status=400).describe() == f"HTTP 400: {message}"
    assert ProviderError("no status").describe() == "no status"


@pytest.mark.parametrize("message", ["", "short"])
def test_describe_without_status_or_code(message: str) -> None:
    assert ProviderError(message).describe() == message


class InfinityServer(EmbeddingServer):
    """Refuses a request holding the poison marker as infinity does: a 422 echoing every input."""

    def handle_embeddings(self, payload: dict[str, Any], headers) -> Reply:
        texts = payload.get("input") or []
        if any("POISON" in t for t in texts):
            return Reply(422, infinity_422(texts))
        return super().handle_embeddings(payload, headers)


def test_a_reject_row_holds_a_bounded_detail(tmp_path: Path, serve: Serve) -> None:
    root = str(tmp_path / "corpus")
    expected = write_corpus(root)
    with open(f"{root}/docs.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "poisoned", "text": "a POISON pill ' + "padding " * 200 + '"}\n')
    output = str(tmp_path / "out")
    server = serve(InfinityServer, dim=32, model=MODEL)
    cfg = make_config(corpus_patterns(root), output, server.base_url)
    assert execute(RunRequest(cfg, quiet=True)) == 1
    server.stop()
    _manifest, tables = read_output(output)
    rejects = [r for r in tables["rejects"].to_pylist() if r["stage"] == "embed"]
    assert [(r["id"], r["reason"]) for r in rejects] == [("poisoned#0", "provider_rejected")]
    detail = rejects[0]["detail"]
    assert detail.startswith("HTTP 422: ") and "422 422" not in detail
    assert len(detail) <= len("HTTP 422: ") + MAX_DETAIL_CHARS + 60
    assert "characters in all]" in detail
    errors = [u["error"] for u in tables["usage"].to_pylist() if u["http_status"] == 422]
    assert errors and all(len(e) <= len("HTTP 422: ") + MAX_DETAIL_CHARS + 60 for e in errors)
    assert all("422 422" not in e for e in errors)
    assert len(expected.documents) + 1 == _manifest["counts"]["documents_valid"]
