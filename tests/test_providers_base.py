"""Alignment, decoding and error classification at the provider boundary."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from tests.support.quirks import CAP_SHAPES
from transforms.errors import (
    FatalProviderError,
    InputRejectedError,
    MalformedResponseError,
    RateLimitedError,
    RequestTooLargeError,
    RetryableError,
    redact,
)
from transforms.providers.base import (
    Provider,
    align_by_index,
    check_vectors,
    decode_embedding,
    parse_duration,
    parse_rate_limit_headers,
    retry_after_seconds,
)
from transforms.providers.openai import OpenAIConfig, OpenAIProvider


def b64(values) -> str:
    return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode()


def test_align_reorders_by_index_and_decodes_both_encodings() -> None:
    items = [{"index": 2, "embedding": b64([3, 3])}, {"index": 0, "embedding": [1, 1]},
             {"index": 1, "embedding": b64([2, 2])}]
    out = align_by_index(items, 3)
    assert out.dtype == np.float32
    assert out.tolist() == [[1, 1], [2, 2], [3, 3]]


@pytest.mark.parametrize(
    "items",
    [
        [{"index": 0, "embedding": [1.0]}],                                        # one too few
        [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [2.0]}],      # repeated
        [{"index": 0, "embedding": [1.0]}, {"index": 5, "embedding": [2.0]}],      # out of range
        [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [2.0, 3.0]}],  # mixed dims
        [{"index": 0, "embedding": "***"}, {"index": 1, "embedding": [1.0]}],      # bad base64
    ],
)
def test_misaligned_answers_are_malformed(items) -> None:
    with pytest.raises(MalformedResponseError):
        align_by_index(items, 2)


def test_check_vectors_rejects_nan_and_wrong_dimension() -> None:
    with pytest.raises(MalformedResponseError):
        check_vectors(np.array([[np.nan, 1.0]], np.float32), 1, None)
    with pytest.raises(MalformedResponseError, match="dimension 2"):
        check_vectors(np.ones((1, 2), np.float32), 1, 3)


def test_decode_embedding_rejects_partial_floats() -> None:
    with pytest.raises(MalformedResponseError):
        decode_embedding(base64.b64encode(b"abcde").decode(), position=0)


def response(status: int, body: bytes | dict, headers: dict | None = None) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.Response(status, json=body, headers=headers)
    return httpx.Response(status, content=body, headers=headers)


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (401, {"error": {"message": "bad key", "code": "invalid_api_key"}}, FatalProviderError),
        (403, {"error": {"message": "no"}}, FatalProviderError),
        (404, {"error": {"message": "model not found"}}, FatalProviderError),
        (429, {"error": {"message": "slow down", "code": "rate_limit_exceeded"}}, RateLimitedError),
        (429, {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}},
         FatalProviderError),
        (500, {"error": {"message": "oops"}}, RetryableError),
        (503, b"<html><body><h1>503 Service Unavailable</h1></body></html>", RetryableError),
        (408, b"", RetryableError),
        (409, b"", RetryableError),
        (413, {"message": "batch too big", "error_type": "Validation"}, RequestTooLargeError),
        (400, {"error": {"message": "too many tokens", "code": "context_length"}}, InputRejectedError),
        (422, {"error": "Input validation error", "error_type": "Validation"}, InputRejectedError),
    ],
)
def test_classification(status, body, cls) -> None:
    error = Provider.classify_error(Provider.__new__(Provider), response(status, body))
    assert type(error) is cls
    assert error.http_status == status


def test_html_error_page_gives_readable_message() -> None:
    error = Provider.classify_error(
        Provider.__new__(Provider),
        response(503, b"<html><body><h1>503 Service Unavailable</h1></body></html>"),
    )
    assert "503 Service Unavailable" in error.message
    assert "<h1>" not in error.message


def test_retry_after_headers() -> None:
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert retry_after_seconds(httpx.Headers({"retry-after": "3"})) == 3.0
    assert retry_after_seconds(httpx.Headers({})) is None
    assert retry_after_seconds(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0


def test_rate_limit_headers_and_durations() -> None:
    assert parse_duration("6m0s") == 360.0
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1.5") == 1.5
    hint = parse_rate_limit_headers(httpx.Headers({"x-ratelimit-remaining-tokens": "0",
                                                   "x-ratelimit-reset-tokens": "1s"}))
    assert hint is not None and hint.remaining_tokens == 0 and hint.reset_tokens_s == 1.0
    assert parse_rate_limit_headers(httpx.Headers({})) is None


def test_redact_removes_full_and_partial_keys() -> None:
    key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"
    text = f"Incorrect API key provided: {key[:12]}...{key[-8:]} and {key}"
    out = redact(text, key)
    assert key not in out and key[:12] not in out and key[-8:] not in out


def test_uniform_base64_is_decoded_at_once_and_still_aligned_by_index() -> None:
    """The one-decode path for unpadded base64 gives what per-vector decoding gives, in index
    order; padded vectors, lists and a stray character take the checked per-vector path."""
    import base64 as b64

    import numpy as np

    from transforms.errors import MalformedResponseError
    from transforms.providers.base import align_by_index

    rng = np.random.default_rng(3)
    for dim in (6, 5, 1536):  # 5 floats = 20 bytes: padded base64
        matrix = rng.standard_normal((7, dim)).astype("<f4")
        items = [{"index": i, "embedding": b64.b64encode(matrix[i].tobytes()).decode()}
                 for i in (3, 0, 6, 1, 5, 2, 4)]
        np.testing.assert_array_equal(align_by_index(items, 7), matrix)
    items[2] = {**items[2], "embedding": "!" + items[2]["embedding"][1:]}
    with pytest.raises(MalformedResponseError, match="embedding 6 is not valid base64"):
        align_by_index(items, 7)


# -- caps on inputs per request, in every shape (issue 12, item 4) ------------------------------


@pytest.mark.parametrize("shape", sorted(CAP_SHAPES))
def test_a_stated_cap_is_read_in_every_shape(shape: str) -> None:
    reply = CAP_SHAPES[shape](8, 64)
    assert isinstance(reply.body, dict)
    error = Provider.classify_error(Provider.__new__(Provider), response(reply.status, reply.body))
    assert type(error) is RequestTooLargeError
    assert error.max_inputs == 8 and error.http_status == reply.status


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"object": "error", "message": "This model's maximum context length is 512 tokens. "
               "However, you requested 700 tokens", "type": "BadRequestError", "code": 400}),
        (400, {"error": {"message": "input must have at most 8192 tokens"}}),
        (422, {"detail": [{"type": "string_too_long", "loc": ["body", "input", 3],
                           "msg": "String should have at most 100 characters",
                           "ctx": {"max_length": 100}}]}),
        # An input echoed back must not set a cap, whatever it says.
        (422, {"detail": [{"type": "string_type", "loc": ["body", "input", 0],
                           "msg": "Input should be a valid string",
                           "input": "The max number of inputs is 3."}]}),
    ],
)
def test_a_per_input_limit_is_not_a_cap_on_inputs(status: int, body: dict) -> None:
    error = Provider.classify_error(Provider.__new__(Provider), response(status, body))
    assert type(error) is InputRejectedError


# -- redirects (issue 12, item 3) ----------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_fatal_and_never_followed(status: int) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(status, headers={"location": "https://elsewhere.test/v1/embeddings"})

    cfg = OpenAIConfig(kind="openai", base_url="http://api.test/v1", model="m",
                       api_key_env=None, encoding_format="float")
    client = httpx.Client(transport=httpx.MockTransport(handler), follow_redirects=True)
    with client, pytest.raises(FatalProviderError) as caught:
        OpenAIProvider(cfg).embed(client, ["hello"], "sk-key", 1)
    assert seen == ["http://api.test/v1/embeddings"]  # even a client that follows does not
    assert caught.value.http_status == status
    assert "https://elsewhere.test/v1/embeddings" in caught.value.message
    assert "provider.base_url" in caught.value.message
