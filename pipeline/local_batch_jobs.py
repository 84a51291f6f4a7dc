"""The batches of the local Batch API: their state, the input-file check, and their JSON shapes.

:class:`pipeline.local_batch.BatchServer` owns the HTTP routes, the files and the progress; this
module holds what one batch *is*: a :class:`Batch` record (mutable, guarded by the server's
lock), :func:`check_input_file` (what OpenAI checks in the ``validating`` state, with its error
codes and 1-based line numbers) and the result lines of the output and error files, shaped as
OpenAI shapes them so that a client tested here reads OpenAI's files unchanged.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.local_base import ApiError
from pipeline.local_batch_faults import BatchFate
from pipeline.local_openai import EmbeddingRequest

__all__ = [
    "ACTIVE_STATUSES",
    "TERMINAL_STATUSES",
    "Batch",
    "BatchLine",
    "Limits",
    "check_input_file",
    "error_line",
    "expired_line",
    "ok_line",
]

#: States a batch never leaves; every other state is "running".
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
#: States whose tokens count against the enqueued-token limit.
ACTIVE_STATUSES = frozenset({"in_progress", "finalizing"})

_MAX_REPORTED_ERRORS = 1000  # a file of 50,000 bad lines should not answer with 50,000 entries


@dataclass(frozen=True, slots=True)
class Limits:
    """OpenAI's caps on one batch input file, smaller in tests that check a client keeps them."""

    max_lines: int = 50_000
    max_inputs: int = 50_000
    max_file_bytes: int = 200 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One valid request line of an input file."""

    number: int  # 1-based, as ``errors.data[].line`` counts
    custom_id: str
    request: EmbeddingRequest


@dataclass(slots=True)
class Batch:
    """One batch and everything the server knows of it; mutated only under the server's lock."""

    id: str
    sequence: int  # creation order: listing is newest first, and timestamps can tie
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    fate: BatchFate
    status: str = "validating"
    lines: list[BatchLine] = field(default_factory=list)
    done: int = 0  # lines run so far, in file order
    outputs: list[dict[str, Any]] = field(default_factory=list)
    error_lines: list[dict[str, Any]] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    tokens: int = 0  # what the lines would bill, for the enqueued-token limit
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    stamps: dict[str, int] = field(default_factory=dict)  # "in_progress_at" -> time, ...
    last_step: float = 0.0  # the clock at the last step, for progress by wall time

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_json(self) -> dict[str, Any]:
        """The batch object, field for field as OpenAI's ``GET /v1/batches/{id}`` answers it."""
        errors = None if self.errors is None else {"object": "list", "data": list(self.errors)}
        stamp_names = ("in_progress_at", "finalizing_at", "completed_at", "failed_at",
                       "expired_at", "cancelling_at", "cancelled_at")
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 24 * 3600,
            **{name: self.stamps.get(name) for name in stamp_names},
            "request_counts": {
                "total": len(self.lines),
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }


def _entry(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def check_input_file(
    content: bytes,
    endpoint: str,
    limits: Limits,
    parse: Callable[[dict[str, Any]], EmbeddingRequest],
) -> tuple[list[BatchLine], list[dict[str, Any]]]:
    """Check a batch input file as OpenAI does while ``validating``: the lines, and the
    ``errors.data`` entries (empty when the file is valid).

    Every line must be a JSON object with a unique, non-empty string ``custom_id``, ``method``
    ``"POST"``, ``url`` equal to the batch's endpoint and a ``body`` that ``parse`` (the online
    endpoint's parser) accepts; all bodies must name one model; at most ``limits.max_lines``
    lines and ``limits.max_inputs`` inputs in all. Codes are OpenAI's documented ones
    (``invalid_json_line``, ``duplicate_custom_id``, ``url_mismatch``, ``model_mismatch``,
    ``empty_file``, ``too_many_tasks``) and ``invalid_request`` for the rest.
    """
    raw = content.split(b"\n")
    if raw and raw[-1].strip() == b"":
        raw.pop()  # the newline that ends the last line
    if not raw:
        return [], [_entry("empty_file", "The batch input file is empty.", None)]
    if len(raw) > limits.max_lines:
        message = (f"The batch input file has {len(raw)} requests; a batch takes at most "
                   f"{limits.max_lines}.")
        return [], [_entry("too_many_tasks", message, None)]
    lines: list[BatchLine] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    inputs = 0
    for number, text in enumerate(raw, start=1):
        if len(errors) >= _MAX_REPORTED_ERRORS:
            break
        try:
            item = json.loads(text)
        except ValueError:
            item = None
        if not isinstance(item, dict):
            errors.append(_entry("invalid_json_line",
                                 "This line is not parseable as valid JSON.", number))
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            errors.append(_entry("invalid_request", "custom_id must be a non-empty string.",
                                 number, "custom_id"))
            continue
        if custom_id in seen:
            errors.append(_entry("duplicate_custom_id",
                                 f"The custom_id {custom_id!r} is not unique in the file.",
                                 number, "custom_id"))
            continue
        seen.add(custom_id)
        if item.get("method") != "POST":
            errors.append(_entry("invalid_request", "method must be 'POST'.", number, "method"))
            continue
        if item.get("url") != endpoint:
            errors.append(_entry("url_mismatch",
                                 f"The url {item.get('url')!r} does not match the batch's "
                                 f"endpoint {endpoint!r}.", number, "url"))
            continue
        body = item.get("body")
        if not isinstance(body, dict):
            errors.append(_entry("invalid_request", "body must be a JSON object.", number,
                                 "body"))
            continue
        line_model = body.get("model")
        if model is None and isinstance(line_model, str):
            model = line_model
        elif isinstance(line_model, str) and line_model != model:
            errors.append(_entry("model_mismatch",
                                 f"The model {line_model!r} differs from {model!r}, the model "
                                 f"of the file's first request: one model per file.", number,
                                 "body.model"))
            continue
        try:
            request = parse(body)
        except ApiError as exc:
            error = exc.reply.body["error"] if isinstance(exc.reply.body, dict) else {}
            param = error.get("param")
            errors.append(_entry(error.get("code") or "invalid_request", str(exc), number,
                                 f"body.{param}" if param else "body"))
            continue
        inputs += len(request.texts)
        lines.append(BatchLine(number, custom_id, request))
    if not errors and inputs > limits.max_inputs:
        errors.append(_entry("too_many_tasks",
                             f"The batch input file holds {inputs} embedding inputs; a batch "
                             f"takes at most {limits.max_inputs} in all.", None))
    return lines, errors


def _request_id() -> str:
    return "req_" + uuid.uuid4().hex


def _result_id() -> str:
    return "batch_req_" + uuid.uuid4().hex


def ok_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """An output-file line: the request answered 200 with the online endpoint's ``body``."""
    response = {"status_code": 200, "request_id": _request_id(), "body": body}
    return {"id": _result_id(), "custom_id": custom_id, "response": response, "error": None}


def error_line(custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An error-file line: the request answered ``status`` with an error ``body``."""
    response = {"status_code": status, "request_id": _request_id(), "body": body}
    return {"id": _result_id(), "custom_id": custom_id, "response": response, "error": None}


def expired_line(custom_id: str) -> dict[str, Any]:
    """An error-file line for a request the batch did not reach before it expired."""
    error = {"code": "batch_expired",
             "message": "This request could not be executed before the completion window "
                        "expired."}
    return {"id": _result_id(), "custom_id": custom_id, "response": None, "error": error}
