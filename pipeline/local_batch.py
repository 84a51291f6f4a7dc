"""OpenAI's Files and Batches API on the local server, with faults: the offline Batch API.

OpenAI's Batch API embeds the same inputs at half the price within 24 hours; a client for it
must upload a JSONL file, create a batch, poll it through its states and read output and error
files whose lines come in any order. :class:`BatchServer` speaks that protocol on loopback, as
strictly as OpenAI, on top of :class:`~pipeline.local_openai.EmbeddingServer` (whose online
``POST /v1/embeddings`` it keeps unchanged), so that a batch line's answer is exactly what the
online endpoint answers for the same body. Under ``/v1``, with the same bearer auth:

- ``POST /files`` (multipart, ``purpose=batch``), ``GET /files/{id}``, ``GET /files/{id}/content``;
- ``POST /batches``, ``GET /batches/{id}``, ``GET /batches?limit=&after=``,
  ``POST /batches/{id}/cancel``.

**Progress** is deterministic. With ``progress="poll"`` (the default) every
``GET /v1/batches/{id}`` moves that batch one step (``validating`` -> ``in_progress`` ->
``finalizing`` -> ``completed``; ``cancelling`` -> ``cancelled``) before answering; with
``"time"`` every request that reads a batch moves it one step per ``step_s`` seconds elapsed;
with ``"manual"`` only :meth:`BatchServer.advance` and :meth:`BatchServer.complete_all` do.
``lines_per_step`` makes ``in_progress`` last several steps, so a cancel can catch a batch half
done. :meth:`BatchServer.hold` keeps batches ``in_progress`` (no line runs) until
:meth:`BatchServer.release`: what a test needs to kill a client while a batch is in flight.

**Faults** (:mod:`pipeline.local_batch_faults`) are armed by methods and counted; the base's
poison fails a line 400 in the error file. **Accounting** (:attr:`BatchServer.batch_stats`,
:meth:`BatchServer.running`) is what end-to-end tests assert against; each input embedded by a
200 line is also counted in the base's :attr:`~pipeline.local_base.LoopbackServer.stats`::

    with BatchServer(api_key="sk-test", shuffle=True) as server:
        server.expire_next()           # the first batch expires with half its lines done
        server.fail_lines_500(2)       # the next two lines run are answered 500, once
        ...                            # point the client at server.base_url
        assert server.running() == []
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pipeline.local_base import ApiError, Injection, Reply
from pipeline.local_batch_faults import BatchFaults, LinePredicate
from pipeline.local_batch_jobs import (
    ACTIVE_STATUSES,
    Batch,
    BatchLine,
    Limits,
    check_input_file,
    error_line,
    expired_line,
    ok_line,
)
from pipeline.local_model import DEFAULT_DIM, DEFAULT_MODEL, count_tokens
from pipeline.local_multipart import parse_multipart
from pipeline.local_openai import EmbeddingServer

__all__ = [
    "DEFAULT_LIMITS",
    "BatchServer",
    "BatchStats",
    "BatchSummary",
    "Limits",
    "StoredFile",
]

Progress = Literal["poll", "time", "manual"]

#: OpenAI's caps: 50,000 lines, 50,000 inputs and 200 MB per input file.
DEFAULT_LIMITS = Limits()

_BATCH_FIELDS = frozenset({"input_file_id", "endpoint", "completion_window", "metadata",
                           "output_expires_after"})
_SERVER_ERROR = {"message": "The server had an error while processing your request.",
                 "type": "server_error", "param": None, "code": None}


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One file of the Files API: uploaded inputs and the output and error files of batches."""

    id: str
    content: bytes
    filename: str
    purpose: str
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.content),
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose}


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """One batch as accounting sees it: enough to assert what a client created and left."""

    id: str
    status: str
    metadata: dict[str, str] | None
    input_file_id: str
    total: int
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class BatchStats:
    """A consistent snapshot of the batch accounting (:attr:`BatchServer.batch_stats`).

    ``lines`` counts line results by outcome (``ok``, ``error_400``, ``error_500``,
    ``expired``); ``tokens_billed`` sums the usage of the ``ok`` lines, which is what OpenAI
    bills; ``embedded`` counts how often each text was embedded by an ``ok`` line (a text sent
    twice shows 2); ``faults`` is :attr:`BatchFaults.fired`.
    """

    batches: tuple[BatchSummary, ...]
    files_uploaded: int
    lines: dict[str, int]
    tokens_billed: int
    embedded: dict[str, int]
    faults: dict[str, int]

    @property
    def batch_ids(self) -> tuple[str, ...]:
        return tuple(batch.id for batch in self.batches)

    def by_status(self) -> dict[str, int]:
        """How many batches are in each status."""
        return dict(Counter(batch.status for batch in self.batches))


class BatchServer(EmbeddingServer):
    """The online embedding API plus OpenAI's Files and Batches API, on a background thread.

    Constructor arguments beyond :class:`~pipeline.local_openai.EmbeddingServer`'s:
    ``progress``/``step_s``/``lines_per_step`` (see the module docstring), ``limits`` (OpenAI's
    caps by default), ``shuffle`` (output lines and each body's ``data`` in random order, from
    ``seed``), ``enqueued_token_limit`` (fail a batch with ``token_limit_exceeded`` when its
    tokens and those of the batches in progress exceed it) and ``clock`` (the timestamps, and
    progress by wall time). ``faults`` and ``poison`` are the base's: ``faults`` scripts the
    online ``/v1/embeddings`` answers only, ``poison`` refuses online requests and batch lines.
    Lines cut off by expiry or a cancel are not counted in ``request_counts.failed``.
    """

    BASE_PATH: ClassVar[str] = "/v1"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        dim: int = DEFAULT_DIM,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        *,
        faults: Mapping[int, Injection] | None = None,
        poison: str | Iterable[str] | None = None,
        progress: Progress = "poll",
        step_s: float = 1.0,
        lines_per_step: int | None = None,
        limits: Limits = DEFAULT_LIMITS,
        shuffle: bool = False,
        seed: int = 0,
        enqueued_token_limit: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(host, port, dim, api_key, model, faults=faults, poison=poison)
        if progress not in ("poll", "time", "manual"):
            raise ValueError(f"progress must be 'poll', 'time' or 'manual', got {progress!r}")
        if lines_per_step is not None and lines_per_step < 1:
            raise ValueError(f"lines_per_step must be at least 1, got {lines_per_step}")
        self.progress = progress
        self.step_s = step_s
        self.lines_per_step = lines_per_step
        self.limits = limits
        self.enqueued_token_limit = enqueued_token_limit
        self.batch_faults = BatchFaults()
        self.batch_faults.shuffle = shuffle
        self._clock = clock
        self._random = random.Random(seed)
        self._lock = threading.RLock()  # the batch steps of one poll run under it, whole
        self._held = False
        self._files: dict[str, StoredFile] = {}
        self._batches: dict[str, Batch] = {}
        self._uploads = 0
        self._lines: Counter[str] = Counter()
        self._tokens_billed = 0
        self._embedded: Counter[str] = Counter()

    # -- faults ------------------------------------------------------------------------------

    def fail_validation(self, n: int = 1, errors: list[dict[str, Any]] | None = None) -> None:
        """Fail the next ``n`` batches created at validation (``errors`` as ``errors.data``)."""
        self.batch_faults.fail_validation(n, errors)

    def fail_token_limit(self, n: int = 1) -> None:
        """Fail the next ``n`` batches created with ``token_limit_exceeded``."""
        self.batch_faults.fail_token_limit(n)

    def expire_next(self, n: int = 1, fraction: float = 0.5) -> None:
        """Expire the next ``n`` batches created with ``fraction`` of their lines done."""
        self.batch_faults.expire_next(n, fraction)

    def lose_create_reply(self, n: int = 1) -> None:
        """Create the next ``n`` batches but hang up instead of answering the create."""
        self.batch_faults.lose_create_reply(n)

    def fail_lines_500(self, n: int = 0, *, predicate: LinePredicate | None = None) -> None:
        """Answer 500 the first attempt of the next ``n`` lines run and of those ``predicate``
        (``(custom_id, texts) -> bool``) picks."""
        self.batch_faults.fail_lines_500(n, predicate=predicate)

    def shuffle_output(self, on: bool = True) -> None:
        """Shuffle output lines and each body's ``data`` from now on (or stop)."""
        self.batch_faults.shuffle = on

    # -- progress ----------------------------------------------------------------------------

    def hold(self) -> None:
        """Keep every batch that reaches ``in_progress`` there, with no line run, until
        :meth:`release`; validation, cancels and other states still move."""
        with self._lock:
            self._held = True

    def release(self) -> None:
        """Let held batches run again (at their next step)."""
        with self._lock:
            self._held = False

    def advance(self, batch_id: str | None = None, steps: int = 1) -> None:
        """Move one batch (or every running one) ``steps`` steps, whatever ``progress`` says."""
        with self._lock:
            for batch in self._pick(batch_id):
                for _ in range(steps):
                    self._step(batch)

    def complete_all(self) -> None:
        """Drive every running batch to a terminal state now, ignoring :meth:`hold`."""
        with self._lock:
            for batch in self._pick(None):
                while not batch.terminal:
                    self._step(batch, force=True)

    def _pick(self, batch_id: str | None) -> list[Batch]:
        if batch_id is None:
            return [batch for batch in self._batches.values() if not batch.terminal]
        return [self._batch(batch_id)]

    # -- accounting --------------------------------------------------------------------------

    @property
    def batch_stats(self) -> BatchStats:
        """A consistent snapshot of the batch accounting."""
        with self._lock:
            batches = tuple(
                BatchSummary(b.id, b.status, None if b.metadata is None else dict(b.metadata),
                             b.input_file_id, len(b.lines), b.completed, b.failed)
                for b in self._batches.values()
            )
            return BatchStats(batches, self._uploads, dict(self._lines), self._tokens_billed,
                              dict(self._embedded), self.batch_faults.fired)

    def running(self) -> list[str]:
        """The ids of the batches not in a terminal state, oldest first."""
        with self._lock:
            return [b.id for b in self._batches.values() if not b.terminal]

    def batch_object(self, batch_id: str) -> dict[str, Any]:
        """A batch as ``GET /v1/batches/{id}`` would show it, without moving it."""
        with self._lock:
            return self._batch(batch_id).to_json()

    def file_content(self, file_id: str) -> bytes:
        """The bytes of a stored file (an upload, or a batch's output or error file)."""
        with self._lock:
            return self._file(file_id).content

    # -- routes ------------------------------------------------------------------------------

    def parse_body(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> Any:
        """Uploads to ``/v1/files`` are multipart; every other body is JSON (the base's)."""
        if method == "POST" and path == "/v1/files":
            if len(body) > self.limits.max_file_bytes + 64 * 1024:  # the form's own overhead
                raise self._too_large(len(body))
            return parse_multipart(body, headers.get("content-type", ""))
        return super().parse_body(method, path, body, headers)

    def route(self, method: str, path: str, payload: Any, headers: Mapping[str, str]) -> Reply:
        """The Files and Batches routes; the rest (``/v1/embeddings``...) as the online API."""
        parts = path.split("/")[1:]  # "/v1/batches/x/cancel" -> ["v1", "batches", "x", "cancel"]
        if parts[:2] == ["v1", "files"]:
            return self._route_files(method, parts[2:], payload)
        if parts[:2] == ["v1", "batches"]:
            return self._route_batches(method, parts[2:], payload)
        return super().route(method, path, payload, headers)

    def _route_files(self, method: str, rest: list[str], payload: Any) -> Reply:
        match method, rest:
            case "POST", []:
                return Reply(200, self._upload(payload).to_json())
            case "GET", [file_id]:
                with self._lock:
                    return Reply(200, self._file(file_id).to_json())
            case "GET", [file_id, "content"]:
                content = self.file_content(file_id)
                return Reply(200, content, {"content-type": "application/octet-stream"})
        raise ApiError(404, f"no route for {method} /v1/files/{'/'.join(rest)}",
                       code="not_found")

    def _route_batches(self, method: str, rest: list[str], payload: Any) -> Reply:
        match method, rest:
            case "POST", []:
                created, lost = self._create(payload)
                return Reply(200, {}, drop_connection=True) if lost else Reply(200, created)
            case "GET", []:
                return Reply(200, self._list(self.request_query()))
            case "GET", [batch_id]:
                with self._lock:
                    batch = self._batch(batch_id)
                    self._on_read(batch, poll=True)
                    return Reply(200, batch.to_json())
            case "POST", [batch_id, "cancel"]:
                return Reply(200, self._cancel(batch_id))
        raise ApiError(404, f"no route for {method} /v1/batches/{'/'.join(rest)}",
                       code="not_found")

    # -- files -------------------------------------------------------------------------------

    def _too_large(self, size: int) -> ApiError:
        return ApiError(413, f"The file is {size} bytes; a batch input file may be at most "
                             f"{self.limits.max_file_bytes} bytes. Split it across batches.",
                        param="file", code="file_too_large")

    def _upload(self, form: Any) -> StoredFile:
        purpose = form.fields.get("purpose")
        if purpose != "batch":
            raise ApiError(400, f"purpose must be 'batch' on this server, got {purpose!r}",
                           param="purpose")
        upload = form.files.get("file")
        if upload is None:
            raise ApiError(400, "the upload has no 'file' part", param="file")
        if len(upload.content) > self.limits.max_file_bytes:
            raise self._too_large(len(upload.content))
        with self._lock:
            self._uploads += 1
            return self._store(upload.content, upload.filename, "batch")

    def _store(self, content: bytes, filename: str, purpose: str) -> StoredFile:
        stored = StoredFile("file-" + uuid.uuid4().hex[:24], content, filename, purpose,
                            int(self._clock()))
        self._files[stored.id] = stored
        return stored

    def _file(self, file_id: str) -> StoredFile:
        try:
            return self._files[file_id]
        except KeyError:
            raise ApiError(404, f"No such File object: {file_id}", param="id") from None

    # -- batches -----------------------------------------------------------------------------

    def _batch(self, batch_id: str) -> Batch:
        try:
            return self._batches[batch_id]
        except KeyError:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id",
                           code="not_found") from None

    def _create(self, payload: Any) -> tuple[dict[str, Any], bool]:
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object")
        unknown = sorted(set(payload) - _BATCH_FIELDS)
        if unknown:
            raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}",
                           param=unknown[0])
        if payload.get("endpoint") != "/v1/embeddings":
            raise ApiError(400, f"endpoint must be '/v1/embeddings' on this server, got "
                                f"{payload.get('endpoint')!r}", param="endpoint")
        if payload.get("completion_window") != "24h":
            raise ApiError(400, "completion_window must be '24h'", param="completion_window")
        metadata = _check_metadata(payload.get("metadata"))
        file_id = payload.get("input_file_id")
        with self._lock:
            if not isinstance(file_id, str) or file_id not in self._files:
                raise ApiError(400, f"No such File object: {file_id}", param="input_file_id")
            if self._files[file_id].purpose != "batch":
                raise ApiError(400, f"File {file_id} was not uploaded with purpose 'batch'.",
                               param="input_file_id")
            now = self._clock()
            batch = Batch("batch_" + uuid.uuid4().hex[:24], len(self._batches), file_id,
                          "/v1/embeddings", "24h", metadata, int(now),
                          self.batch_faults.take_fate(), last_step=now)
            self._batches[batch.id] = batch
            return batch.to_json(), self.batch_faults.take_lost_create()

    def _list(self, query: Mapping[str, str]) -> dict[str, Any]:
        raw = query.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise ApiError(400, f"limit must be an integer from 1 to 100, got {raw!r}",
                           param="limit")
        limit = int(raw)
        with self._lock:
            newest_first = sorted(self._batches.values(), key=lambda b: -b.sequence)
            after = query.get("after")
            if after is not None:
                ids = [batch.id for batch in newest_first]
                if after not in ids:
                    raise ApiError(400, f"after names no batch: {after!r}", param="after")
                newest_first = newest_first[ids.index(after) + 1:]
            page = newest_first[:limit]
            for batch in page:
                self._on_read(batch, poll=False)
            data = [batch.to_json() for batch in page]
        return {"object": "list", "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(newest_first) > limit}

    def _cancel(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            batch = self._batch(batch_id)
            self._on_read(batch, poll=False)
            if batch.terminal:
                raise ApiError(409, f"Cannot cancel a batch with status '{batch.status}'.",
                               param="batch_id")
            if batch.status != "cancelling":
                batch.status = "cancelling"
                batch.stamps["cancelling_at"] = int(self._clock())
            return batch.to_json()

    # -- progress (under self._lock) ---------------------------------------------------------

    def _on_read(self, batch: Batch, *, poll: bool) -> None:
        """Move a batch as ``progress`` says, before a request shows it."""
        if self.progress == "poll" and poll:
            self._step(batch)
        elif self.progress == "time" and self.step_s > 0:
            steps = int((self._clock() - batch.last_step) / self.step_s)
            for _ in range(steps):
                self._step(batch)
            batch.last_step += steps * self.step_s

    def _step(self, batch: Batch, *, force: bool = False) -> None:
        """One step of a batch's life; ``force`` runs it even while :meth:`hold` is on."""
        now = int(self._clock())
        match batch.status:
            case "validating":
                self._validate(batch, now)
            case "in_progress" if force or not self._held:
                self._run_lines(batch, now)
            case "finalizing":
                self._finish(batch, "completed", now)
            case "cancelling":
                self._finish(batch, "cancelled", now)

    def _validate(self, batch: Batch, now: int) -> None:
        lines, errors = check_input_file(self._files[batch.input_file_id].content,
                                         batch.endpoint, self.limits,
                                         self.parse_embedding_request)
        fate = batch.fate
        self.batch_faults.note_fate(fate)
        if fate.validation_errors is not None:
            errors = list(fate.validation_errors)
        tokens = sum(_line_tokens(line) for line in lines)
        if not errors and (fate.token_limit or self._over_token_limit(tokens)):
            if not fate.token_limit:
                self.batch_faults.count("token_limit")
            errors = [{"code": "token_limit_exceeded", "param": None, "line": None,
                       "message": f"Enqueued token limit reached: this batch holds {tokens} "
                                  f"tokens. Wait for batches in progress to finish."}]
        if errors:
            batch.errors = errors
            batch.status = "failed"
            batch.stamps["failed_at"] = now
            return
        batch.lines, batch.tokens = lines, tokens
        batch.status = "in_progress"
        batch.stamps["in_progress_at"] = now

    def _over_token_limit(self, tokens: int) -> bool:
        if self.enqueued_token_limit is None:
            return False
        queued = sum(b.tokens for b in self._batches.values() if b.status in ACTIVE_STATUSES)
        return queued + tokens > self.enqueued_token_limit

    def _run_lines(self, batch: Batch, now: int) -> None:
        total = len(batch.lines)
        stop = total if self.lines_per_step is None else min(total,
                                                            batch.done + self.lines_per_step)
        fraction = batch.fate.expire_fraction
        expire_at = None if fraction is None else int(total * fraction)
        if expire_at is not None:
            stop = min(stop, expire_at)
        for line in batch.lines[batch.done:stop]:
            self._run_line(batch, line)
        batch.done = max(batch.done, stop)
        if expire_at is not None and batch.done >= expire_at:
            self.batch_faults.count("expire")
            for line in batch.lines[batch.done:]:
                batch.error_lines.append(expired_line(line.custom_id))
                self._lines["expired"] += 1
            self._finish(batch, "expired", now)
        elif batch.done >= total:
            batch.status = "finalizing"
            batch.stamps["finalizing_at"] = now

    def _run_line(self, batch: Batch, line: BatchLine) -> None:
        """Answer one line as the online endpoint would, or as a fault says."""
        texts = line.request.texts
        if self.batch_faults.take_line_500(line.custom_id, texts):
            batch.error_lines.append(error_line(line.custom_id, 500, {"error": _SERVER_ERROR}))
            batch.failed += 1
            self._lines["error_500"] += 1
            return
        refusal = self.poisoned(texts)
        if refusal is not None:
            self.batch_faults.count("poison")
            body = refusal.body if isinstance(refusal.body, dict) else {}
            batch.error_lines.append(error_line(line.custom_id, refusal.status, body))
            batch.failed += 1
            self._lines[f"error_{refusal.status}"] += 1
            return
        body = self.embedding_body(line.request)
        tokens = body["usage"]["prompt_tokens"]
        if self.batch_faults.shuffle and len(body["data"]) > 1:
            self._random.shuffle(body["data"])
            self.batch_faults.count("shuffle")
        batch.outputs.append(ok_line(line.custom_id, body))
        batch.completed += 1
        self._lines["ok"] += 1
        self._tokens_billed += tokens
        self._embedded.update(texts)
        self.record_served(texts, tokens)

    def _finish(self, batch: Batch, status: str, now: int) -> None:
        """Write the output and error files of what was run, and end the batch."""
        for lines, kind in ((batch.outputs, "output"), (batch.error_lines, "error")):
            if not lines:
                continue
            ordered = list(lines)
            if self.batch_faults.shuffle and len(ordered) > 1:
                self._random.shuffle(ordered)
                self.batch_faults.count("shuffle")
            content = "".join(json.dumps(line, separators=(",", ":")) + "\n"
                              for line in ordered).encode()
            stored = self._store(content, f"{batch.id}_{kind}.jsonl", f"batch_{kind}")
            if kind == "output":
                batch.output_file_id = stored.id
            else:
                batch.error_file_id = stored.id
        batch.status = status
        batch.stamps[f"{status}_at"] = now


def _line_tokens(line: BatchLine) -> int:
    return sum(count_tokens(text) for text in line.request.texts)


def _check_metadata(value: Any) -> dict[str, str] | None:
    """OpenAI's metadata rules: at most 16 string pairs, keys up to 64 and values 512 chars."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 16:
        raise ApiError(400, "metadata must be an object of at most 16 key-value pairs",
                       param="metadata")
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > 64 or len(item) > 512:
            raise ApiError(400, f"metadata[{key!r}] must be a string of at most 512 characters "
                                f"under a key of at most 64", param="metadata")
    return dict(value)
