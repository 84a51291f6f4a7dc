"""The lines of a batch: request lines out, result lines in (pure logic, no HTTP).

A request line is ``{"custom_id", "method": "POST", "url": "/v1/embeddings", "body"}``, the body
being exactly what the online request would send. A result line, in the output or the error
file, is ``{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
"error": {"code", "message"} | null}``, in any order: results are matched by ``custom_id``,
never by position.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from transforms.batch_api import EMBEDDINGS_ENDPOINT
from transforms.errors import MalformedResponseError

#: OpenAI's caps on one batch: requests (lines), embedding inputs over all lines, file bytes.
MAX_LINES = 50_000
MAX_INPUTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024


def request_line(custom_id: str, body: Mapping[str, Any]) -> bytes:
    """One line of the input file, newline included."""
    line = {"custom_id": custom_id, "method": "POST", "url": EMBEDDINGS_ENDPOINT,
            "body": dict(body)}
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class LineResult:
    """What the batch answered for one request line.

    ``status`` is the HTTP status of the line's response, None when it has none (a line not
    done when the batch expired: ``error_code`` ``batch_expired``).
    """

    custom_id: str
    status: int | None
    body: Any
    error_code: str | None = None
    error_message: str | None = None
    request_id: str | None = None


def result_lines(data: bytes, *, source: str) -> Iterator[LineResult]:
    """Parse an output or error file; a line that is not a result is a malformed answer."""
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            custom_id = line["custom_id"]
            response = line.get("response")
            error = line.get("error") or {}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MalformedResponseError(
                f"line {number} of {source} is not a batch result: {raw[:200]!r}") from exc
        if isinstance(response, dict):
            status = response.get("status_code")
            yield LineResult(custom_id=str(custom_id),
                             status=int(status) if isinstance(status, int) else None,
                             body=response.get("body"),
                             request_id=response.get("request_id"),
                             error_code=error.get("code") if isinstance(error, dict) else None)
        else:
            yield LineResult(custom_id=str(custom_id), status=None, body=None,
                             error_code=str(error.get("code") or "no_response"),
                             error_message=str(error.get("message") or ""))


def request_inputs(data: bytes) -> Iterator[tuple[str, list[str]]]:
    """``(custom_id, texts)`` of every line of an input file (to re-attach to its batch)."""
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            texts = line["body"]["input"]
            custom_id = str(line["custom_id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedResponseError(f"not a request line: {raw[:200]!r}") from exc
        yield custom_id, [texts] if isinstance(texts, str) else [str(t) for t in texts]
