"""An embedding server on loopback speaking the envelope dialect, with programmable faults.

It answers only ``POST /api/v1/embeddings`` and ``GET /api/v1/embeddings/{id}``; every answer,
errors included, is an envelope ``{success, code, message, data}`` (HTTP 200 unless a fault says
otherwise). It is an app on the same base as every local server
(:class:`~pipeline.local_server.LoopbackServer`): vectors come from the base's
:class:`~pipeline.local_server.HashingEmbedder`, so a test can check every vector against it;
faults and poison are the base's :class:`~pipeline.local_server.FaultSchedule` and
:class:`~pipeline.local_server.Poison`; and served inputs are counted with ``record_served`` only
when their vectors are delivered (a queued job's when it completes).

Written from the API's description, not from the client, so that the two check each other::

    with EnvelopeServer(dim=64, polls=2, faults={3: envelope_error("503", "busy")}) as server:
        ...  # provider.base_url: server.root_url
"""

from __future__ import annotations

import random
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.local_server import (
    ApiError,
    Injection,
    LoopbackServer,
    Reply,
    count_tokens,
    encode_embedding,
    parse_embedding_request,
    truncate_dimensions,
)

SUBMIT_PATH = "/api/v1/embeddings"
_QUEUED_CYCLE = ("RUNNING", "PROCESSING")

Layout = Literal["data", "embeddings", "bare"]


def envelope(data: Mapping[str, Any] | None, *, success: bool = True, code: str = "200",
             message: str = "success", http_status: int = 200,
             headers: dict[str, str] | None = None) -> Reply:
    """One envelope answer."""
    body = {"success": success, "code": code, "message": message,
            "data": dict(data) if data is not None else None}
    return Reply(http_status, body, headers or {})


def envelope_error(code: str, message: str, *, http_status: int = 200,
                   headers: dict[str, str] | None = None) -> Reply:
    """A failed call as this API reports it: ``success: false``, by default over HTTP 200."""
    return envelope(None, success=False, code=code, message=message, http_status=http_status,
                    headers=headers)


def html_error(status: int) -> Reply:
    """What a proxy in front of the API answers: an HTML page, not an envelope."""
    page = f"<html><body><h1>{status} Service Unavailable</h1></body></html>"
    return Reply(status, page.encode(), {"content-type": "text/html"})


@dataclass
class _Job:
    """A queued request: its answer is computed at submission and delivered on the K-th poll."""

    texts: tuple[str, ...]
    tokens: int
    result: dict[str, Any]
    done_on_poll: int
    fails: bool
    polls: int = 0


class EnvelopeServer(LoopbackServer):
    """The envelope API on loopback. Every knob is a constructor argument.

    - ``layout``: where the vectors go: ``"data"`` (``data.data``, OpenAI's ``{object, index,
      embedding}``), ``"embeddings"`` (``data.embeddings`` of ``{index, embedding}``) or
      ``"bare"`` (``data.embeddings`` of plain vectors, in input order); ``shuffle`` sends
      indexed items in a random order.
    - ``usage``: send ``data.usage``; without it the client must estimate.
    - ``polls``: None answers at once; K queues every submission as a ``PENDING`` job that is
      ``COMPLETED`` on its K-th poll (``RUNNING``/``PROCESSING`` before).
    - ``faults``: the base's schedule, by submission number (1-based, in arrival order; the
      preflight is 1) → the reply sent instead of an answer; :meth:`schedule` and
      :meth:`fail_always` work too. ``failed_jobs``: submissions whose job ends ``FAILED``.
    - ``poison``: the base's; a request with an input containing a marker is refused with code
      ``"400"``, naming the input, so that bisection can isolate it.
    """

    def __init__(
        self,
        *,
        layout: Layout = "data",
        shuffle: bool = False,
        usage: bool = True,
        polls: int | None = None,
        faults: Mapping[int, Injection] | None = None,
        failed_jobs: Collection[int] = (),
        poison: str | Iterable[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if shuffle and layout == "bare":
            raise ValueError("bare vectors carry no index: they cannot be shuffled")
        if polls is not None and polls < 1:
            raise ValueError(f"polls must be at least 1, got {polls}")
        super().__init__(faults=faults, poison=poison, **kwargs)
        self.layout = layout
        self.shuffle = shuffle
        self.usage = usage
        self.polls = polls
        self.failed_jobs = frozenset(failed_jobs)
        self._lock = threading.Lock()
        self._rng = random.Random(7)
        self._payloads: list[Any] = []
        self._jobs: dict[str, _Job] = {}

    @property
    def payloads(self) -> list[Any]:
        """The body of every submission, in arrival order."""
        with self._lock:
            return list(self._payloads)

    def authorize(self, method: str, path: str, headers: Mapping[str, str]) -> None:
        """Checked in :meth:`route` instead, so that a bad key gets an envelope too."""

    def poison_reply(self, index: int, marker: str) -> Reply:
        return envelope_error("400", f"input {index} contains forbidden content")

    def route(self, method: str, path: str, payload: Any, headers: Mapping[str, str]) -> Reply:
        try:
            super().authorize(method, path, headers)
            if method == "POST" and path == SUBMIT_PATH:
                return self._submit(payload)
            if method == "GET" and path.startswith(f"{SUBMIT_PATH}/"):
                return self._poll(path.removeprefix(f"{SUBMIT_PATH}/"))
            raise ApiError(404, f"no route for {method} {path}")
        except ApiError as exc:
            return envelope_error(str(exc.reply.status), str(exc))

    def _submit(self, payload: Any) -> Reply:
        with self._lock:
            self._payloads.append(payload)
            number = len(self._payloads)
        scheduled = self.scheduled_fault()
        if scheduled is not None:
            return scheduled
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object")
        parameters = payload.get("parameters")
        if "parameters" in payload and not (isinstance(parameters, dict) and parameters):
            raise ApiError(400, "parameters, when sent, must be a non-empty object")
        # The base class checks model, input, encoding_format and dimensions as strictly as
        # OpenAI does; `parameters` is the one field this dialect adds.
        request = parse_embedding_request(
            {key: value for key, value in payload.items() if key != "parameters"},
            model=self.model, dim=self.dim,
        )
        refusal = self.poisoned(request.texts)
        if refusal is not None:
            return refusal
        vectors = self.embedder.embed(request.texts)
        if request.dimensions is not None:
            vectors = truncate_dimensions(vectors, request.dimensions)
        tokens = sum(count_tokens(text) for text in request.texts)
        result = self._result(vectors, request.encoding_format, tokens)
        if self.polls is None:
            self.record_served(request.texts, tokens)
            return envelope({"id": f"emb-{number}", **result})
        job_id = f"job-{number}"
        with self._lock:
            self._jobs[job_id] = _Job(request.texts, tokens, result, self.polls,
                                      fails=number in self.failed_jobs)
        return envelope({"id": job_id, "status": "PENDING"})

    def _poll(self, job_id: str) -> Reply:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise ApiError(404, f"no job {job_id!r}")
            job.polls += 1
            if job.polls < job.done_on_poll:
                status = _QUEUED_CYCLE[job.polls % len(_QUEUED_CYCLE)]
                return envelope({"id": job_id, "status": status})
            del self._jobs[job_id]
        if job.fails:
            return envelope({"id": job_id, "status": "FAILED"}, message="worker lost the job")
        self.record_served(job.texts, job.tokens)
        return envelope({"id": job_id, "status": "COMPLETED", **job.result})

    def _result(self, vectors: np.ndarray, encoding_format: str, tokens: int) -> dict[str, Any]:
        """The vectors (in this server's layout) and usage, as ``data`` carries them."""
        encoded = [encode_embedding(vector, encoding_format) for vector in vectors]
        items: list[Any]
        if self.layout == "bare":
            items = encoded
        else:
            tag = {"object": "embedding"} if self.layout == "data" else {}
            items = [{**tag, "index": i, "embedding": e} for i, e in enumerate(encoded)]
            if self.shuffle:
                with self._lock:
                    self._rng.shuffle(items)
        result: dict[str, Any] = {
            "model": self.model,
            "data" if self.layout == "data" else "embeddings": items,
        }
        if self.usage:
            result["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return result
