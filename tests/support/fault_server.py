"""An OpenAI-compatible embedding server that misbehaves on purpose: rate limits, latency, faults.

The embed stage promises to stay under the provider's limits, to survive every transient failure,
to isolate a poisoned input, to stop on exhausted quota, and never to write a vector twice or next
to the wrong chunk. Those promises can only be checked against a server that breaks them on
purpose, reproducibly. This is that server: :class:`~pipeline.local_server.EmbeddingServer` (real
vectors, OpenAI's shapes, strict validation) driven by a :class:`FaultPlan`, with the poison and
the scripted faults of every local server (:class:`~pipeline.local_server.Poison`,
:class:`~pipeline.local_server.FaultSchedule`). The end-to-end test
runs the pipeline under every fault at once; ``make bench`` reads :meth:`FaultServer.report` to
see how close the client runs to the rate limit.

One ``POST /v1/embeddings`` goes through, in order::

    a scripted reply for it?      that reply               (the base's schedule; not judged)
    quota exhausted?              429 insufficient_quota   (fatal to the client)
    an input holds the poison?    400 invalid_request      (naming the input: the client bisects)
    over RPM or TPM?              429 rate_limit_exceeded  + Retry-After; consumes nothing
    one seeded draw               500 | 503 HTML | reset | slow | truncated | short | shuffled | ok
    then latency (+ jitter), then the answer

Rate limits are continuously refilled buckets holding ``burst_s`` seconds of budget, the way
providers enforce a per-minute limit over short windows; tokens are counted by
:func:`~pipeline.local_server.count_tokens`, which differs from the client's tokenizer as a real
provider's does, or as characters (``count_chars``, in usage too: infinity's habit). Every
answer above carries ``x-ratelimit-*`` headers for the configured limits.

Determinism: the faults come from ``random.Random(seed)``, one draw per request that passed the
limiter, taken under a lock in arrival order; sequential requests meet the same faults on every
run (jitter has its own stream, so it never shifts them). Concurrent requests meet the same
*mix*, in an order set by the thread scheduler.

Only intact answers (ok and shuffled) count as served, in :attr:`EmbeddingServer.stats` as in
:class:`FaultStats`: "every chunk was served exactly once" stays a valid assertion under faults.

From another process (the benchmark's client workers live in other processes)::

    python -m tests.support.fault_server --port 8090 --tpm 60000 --latency 0.06 --p-500 0.02

prints the base URL and serves until killed; ``GET {base_url}/fault/report`` answers
:meth:`FaultServer.report` as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import threading
import time
import typing
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pipeline.local_server import (
    DEFAULT_DIM,
    DEFAULT_MODEL,
    EmbeddingServer,
    Injection,
    Reply,
    count_tokens,
    error_reply,
    serve_until_interrupted,
)

__all__ = [
    "NO_FAULTS",
    "QUOTA_MESSAGE",
    "REPORT_PATH",
    "FaultPlan",
    "FaultServer",
    "FaultStats",
    "Outcome",
    "format_duration",
    "main",
]

#: Where :meth:`FaultServer.report` is served, relative to the base URL (like ``/embeddings``).
REPORT_PATH = "/fault/report"

QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details."
)
_SERVER_ERROR_MESSAGE = (
    "The server had an error while processing your request. Sorry about that!"
)
_HTML_503 = (
    b"<html><head><title>503 Service Unavailable</title></head><body>"
    b"<center><h1>503 Service Unavailable</h1></center><hr><center>nginx</center>"
    b"</body></html>"
)

# Float slack when testing whether a request fits a bucket, so rounding in the refill arithmetic
# can never turn "fits exactly" into a 429 with a zero wait.
_FIT_SLACK = 1e-9


class Outcome(Enum):
    """How the server answered one well-formed embedding request."""

    OK = "ok"
    SHUFFLED = "shuffled"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXHAUSTED = "quota_exhausted"
    POISONED = "poisoned"
    ERROR_500 = "error_500"
    ERROR_503_HTML = "error_503_html"
    RESET = "reset"
    SLOW = "slow"
    TRUNCATED = "truncated"
    SHORT = "short"

    @property
    def served(self) -> bool:
        """Whether the answer delivers every vector intact (its order aside)."""
        return self in (Outcome.OK, Outcome.SHUFFLED)


#: Each fault's probability field, in the order the faults tile the unit interval.
_FAULTS: tuple[tuple[str, Outcome], ...] = (
    ("p_500", Outcome.ERROR_500),
    ("p_503_html", Outcome.ERROR_503_HTML),
    ("p_reset", Outcome.RESET),
    ("p_slow", Outcome.SLOW),
    ("p_truncated", Outcome.TRUNCATED),
    ("p_short", Outcome.SHORT),
    ("p_shuffle", Outcome.SHUFFLED),
)


def _option(default: Any, help: str) -> Any:
    """A plan field whose help text is also its command-line help (see :func:`main`)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultPlan:
    """What the server does wrong, and how often; the defaults do nothing wrong.

    At most one fault hits a request: the probabilities tile ``[0, 1)`` and one uniform draw picks
    the fault, so each ``p_*`` is exactly that fault's share and they must add up to at most 1.
    A request larger than a whole bucket passes when the bucket is full and drives it negative:
    it could never pass otherwise, and the long-run rate stays exact. A slow answer waits
    ``slow_s`` instead of the latency; the jitter has its own seeded stream.

    >>> FaultPlan(tpm=60_000, latency_s=0.06, p_500=0.02, p_shuffle=0.1).fault_for(0.05)
    <Outcome.SHUFFLED: 'shuffled'>
    """

    seed: int = _option(0, "seed of the fault draws")
    rpm: int | None = _option(None, "requests per minute (default: unlimited)")
    tpm: int | None = _option(None, "tokens per minute, by count_tokens or count_chars "
                                    "(default: unlimited)")
    burst_s: float = _option(2.0, "what each rate bucket holds, in seconds of its budget")
    latency_s: float = _option(0.0, "seconds added to every embedding answer")
    jitter_s: float = _option(0.0, "up to this many more seconds, uniformly drawn")
    p_500: float = _option(0.0, "probability of a 500 with an OpenAI error body")
    p_503_html: float = _option(0.0, "probability of a 503 with an HTML body")
    p_reset: float = _option(0.0, "probability of closing the connection without an answer")
    p_slow: float = _option(0.0, "probability of answering only after --slow seconds")
    slow_s: float = _option(30.0, "delay of a slow answer; keep it above the client's timeout")
    p_truncated: float = _option(0.0, "probability of a 200 whose JSON is cut in half")
    p_short: float = _option(0.0, "probability of a 200 with one embedding too few")
    p_shuffle: float = _option(0.0, "probability of a 200 with data in random order")
    quota_after: int | None = _option(None, "answer 429 insufficient_quota after N served requests")
    count_chars: bool = _option(False, "count tokens as characters, in usage and the TPM limit "
                                       "(as infinity does)")

    def __post_init__(self) -> None:
        probabilities = {name: getattr(self, name) for name, _ in _FAULTS}
        for name, p in probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        total = sum(probabilities.values())
        if total > 1.0 + _FIT_SLACK:
            raise ValueError(
                f"the fault probabilities add up to {total:g}; at most one fault hits a request, "
                f"so they must add up to at most 1"
            )
        for name in ("rpm", "tpm", "burst_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        for name in ("latency_s", "jitter_s", "slow_s", "quota_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value!r}")

    def fault_for(self, draw: float) -> Outcome:
        """The answer for a request whose uniform draw in ``[0, 1)`` is ``draw``."""
        edge = 0.0
        for name, outcome in _FAULTS:
            edge += getattr(self, name)
            if draw < edge:
                return outcome
        return Outcome.OK


NO_FAULTS = FaultPlan()


@dataclass(frozen=True, slots=True)
class FaultStats:
    """A consistent snapshot of what a :class:`FaultServer` did, for assertions and the benchmark.

    Taken at one instant, but outcomes are counted when decided, on arrival, and served texts,
    tokens and the ok timestamps (``time.monotonic``) when the intact answer leaves the handler:
    a request still in flight shows in ``counts`` only. Read it once the traffic has stopped.

    The rates are taken between the first and the last ok answer, counting what was served after
    the first one (n answers span n - 1 intervals). Over a span of T seconds a client that
    saturates a limit can exceed it by the initial burst, ``burst_s / T`` of the limit.
    """

    counts: Mapping[Outcome, int]
    first_ok_at: float | None
    last_ok_at: float | None
    tokens_served: int
    tokens_after_first_ok: int
    served_texts: Counter[str]  # a multiset: a count above 1 is a text served more than once

    @property
    def requests(self) -> int:
        """Well-formed embedding requests (a 400 from validation is not one)."""
        return sum(self.counts.values())

    @property
    def served_requests(self) -> int:
        return sum(n for outcome, n in self.counts.items() if outcome.served)

    @property
    def share_429(self) -> float:
        """The share of requests throttled by the rate limits (quota 429s are not throttling)."""
        return self.counts[Outcome.RATE_LIMITED] / self.requests if self.requests else 0.0

    @property
    def ok_span_s(self) -> float | None:
        if self.first_ok_at is None or self.last_ok_at is None:
            return None
        return self.last_ok_at - self.first_ok_at

    @property
    def tokens_per_minute(self) -> float | None:
        span = self.ok_span_s
        return self.tokens_after_first_ok * 60.0 / span if span else None

    @property
    def requests_per_minute(self) -> float | None:
        span = self.ok_span_s
        return (self.served_requests - 1) * 60.0 / span if span else None


def format_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format (``"20ms"``, ``"1.5s"``, ``"6m0s"``), rounded up.

    Rounding up means a client that waits exactly this long never arrives early.
    """
    ms = max(0, math.ceil(seconds * 1000.0 - _FIT_SLACK))
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:g}s"
    return f"{minutes}m{secs}" if minutes else secs


class _RateLimit:
    """One per-minute limit as a continuously refilled bucket; the caller holds the lock.

    Written apart from :class:`transforms.limits.TokenBucket` on purpose: this server is the
    yardstick the client's limiter is measured against, and a bug they shared would cancel out.
    """

    def __init__(self, kind: str, per_minute: int, burst_s: float, now: float) -> None:
        self.kind = kind  # "requests" or "tokens": OpenAI's header suffix and error type
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._capacity = max(1.0, self._rate * burst_s)
        self._level = self._capacity  # a fresh window is full
        self._updated = now

    def refill(self, now: float) -> None:
        self._level = min(self._capacity, self._level + (now - self._updated) * self._rate)
        self._updated = now

    def wait_for(self, amount: int) -> float:
        """Seconds until ``amount`` fits (0: now); more than the capacity fits a full bucket."""
        missing = min(amount, self._capacity) - self._level
        return missing / self._rate if missing > _FIT_SLACK else 0.0

    def cost(self, tokens: int) -> int:
        """What a request of ``tokens`` takes from this limit."""
        return tokens if self.kind == "tokens" else 1

    def take(self, amount: int) -> None:
        self._level -= amount

    def headers(self) -> list[tuple[str, str]]:
        """OpenAI's headers: what is left now, and how long until the bucket is full again."""
        remaining = max(0, math.floor(self._level + _FIT_SLACK))
        until_full = (self._capacity - self._level) / self._rate
        return [
            (f"x-ratelimit-limit-{self.kind}", str(self.per_minute)),
            (f"x-ratelimit-remaining-{self.kind}", str(remaining)),
            (f"x-ratelimit-reset-{self.kind}", format_duration(until_full)),
        ]


@dataclass
class _Tally:
    """The mutable measurements behind :class:`FaultStats`; guarded by the server's lock."""

    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    first_ok_at: float | None = None
    last_ok_at: float | None = None
    tokens_after_first_ok: int = 0


@dataclass(frozen=True, slots=True)
class _Verdict:
    """What :meth:`FaultServer._judge` decided on arrival, carried out after the delay."""

    outcome: Outcome
    delay_s: float
    headers: dict[str, str]  # x-ratelimit-* of the configured limits, once this request is judged
    refusal: Reply | None = None  # the whole answer, when it is decided without embedding
    permutation: tuple[int, ...] = ()  # the order of ``data`` in a shuffled answer


class FaultServer(EmbeddingServer):
    """An :class:`EmbeddingServer` that rate-limits, delays and breaks answers per its plan.

    ``poison`` and ``faults`` are the base's (:class:`~pipeline.local_server.Poison`,
    :class:`~pipeline.local_server.FaultSchedule`): a poisoned request is judged after the quota
    and before the limits, and a scripted reply pre-empts the plan (it is neither judged nor
    counted in :class:`FaultStats`). Thread-safe: one lock guards the buckets, the fault draws,
    the quota and the tally, and is never held while sleeping or embedding. Use it like its base::

        plan = FaultPlan(seed=1, tpm=20_000, latency_s=0.02, p_500=0.05, p_shuffle=0.2)
        with FaultServer(plan, dim=64, poison="<<poison>>") as server:
            ...  # point the client at server.base_url
        assert not [t for t, n in server.fault_stats.served_texts.items() if n > 1]
    """

    def __init__(
        self,
        plan: FaultPlan = NO_FAULTS,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        dim: int = DEFAULT_DIM,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        poison: str | Iterable[str] | None = None,
        faults: Mapping[int, Injection] | None = None,
    ) -> None:
        super().__init__(host, port, dim, api_key, model, faults=faults, poison=poison)
        self.plan = plan
        self._lock = threading.Lock()
        self._fault_rng = random.Random(plan.seed)
        self._jitter_rng = random.Random(f"{plan.seed}/jitter")
        now = time.monotonic()
        self._limits = [
            _RateLimit(kind, per_minute, plan.burst_s, now)
            for kind, per_minute in (("requests", plan.rpm), ("tokens", plan.tpm))
            if per_minute is not None
        ]
        self._quota_used = 0  # served requests since start; reset_stats leaves it alone
        self._tally = _Tally()

    # -- measurements ----------------------------------------------------------------------

    @property
    def fault_stats(self) -> FaultStats:
        """A consistent snapshot of the outcomes and what was served."""
        with self._lock:
            served = self.stats
            tally = self._tally
            return FaultStats(
                counts=dict(tally.counts),
                first_ok_at=tally.first_ok_at,
                last_ok_at=tally.last_ok_at,
                tokens_served=served.tokens,
                tokens_after_first_ok=tally.tokens_after_first_ok,
                served_texts=Counter(served.texts),
            )

    def report(self) -> dict[str, Any]:
        """The benchmark's figures, JSON-ready; ``efficiency`` is served TPM over the TPM limit.

        ``efficiency`` and ``request_efficiency`` are None without that limit or before two ok
        answers; ``duplicated_texts`` counts texts served more than once.
        """
        stats = self.fault_stats
        return {
            "requests": stats.requests,
            "outcomes": {outcome.value: n for outcome, n in stats.counts.items()},
            "served_requests": stats.served_requests,
            "tokens_served": stats.tokens_served,
            "ok_span_s": stats.ok_span_s,
            "tokens_per_minute": stats.tokens_per_minute,
            "requests_per_minute": stats.requests_per_minute,
            "efficiency": _ratio(stats.tokens_per_minute, self.plan.tpm),
            "request_efficiency": _ratio(stats.requests_per_minute, self.plan.rpm),
            "share_429": stats.share_429,
            "duplicated_texts": sum(1 for n in stats.served_texts.values() if n > 1),
        }

    def reset_stats(self) -> None:
        """Start measuring afresh (after a warm-up, say); buckets, quota and draws carry on."""
        with self._lock:
            super().reset_stats()
            self._tally = _Tally()

    # -- request handling --------------------------------------------------------------------

    def route(self, method: str, path: str, payload: Any, headers: Mapping[str, str]) -> Reply:
        """The base routes plus ``GET [/v1]/fault/report``, for a benchmark in another process."""
        if method == "GET" and path in (REPORT_PATH, "/v1" + REPORT_PATH):
            return Reply(200, self.report())
        return super().route(method, path, payload, headers)

    def handle_embeddings(self, payload: dict[str, Any], headers: Mapping[str, str]) -> Reply:
        """Validate as the base server does, judge on arrival, wait, then answer per the verdict."""
        texts = self.parse_embedding_request(payload).texts
        count = len if self.plan.count_chars else count_tokens
        tokens = sum(count(text) for text in texts)
        with self._lock:
            verdict = self._judge(texts, tokens)
        time.sleep(verdict.delay_s)
        if verdict.refusal is not None:
            return verdict.refusal
        match verdict.outcome:
            case Outcome.RESET:
                return Reply(500, drop_connection=True)  # the status is never sent
            case Outcome.ERROR_500:
                return error_reply(
                    500, _SERVER_ERROR_MESSAGE, error_type="server_error", headers=verdict.headers
                )
            case Outcome.ERROR_503_HTML:
                return Reply(503, _HTML_503, {**verdict.headers, "content-type": "text/html"})
        body = self.embedding_body(self.parse_embedding_request(payload))
        match verdict.outcome:
            case Outcome.TRUNCATED:
                raw = json.dumps(body).encode()
                return Reply(200, raw[: len(raw) // 2], verdict.headers)
            case Outcome.SHORT:
                body = {**body, "data": body["data"][:-1]}
            case Outcome.SHUFFLED:
                body = {**body, "data": [body["data"][i] for i in verdict.permutation]}
        if self.plan.count_chars:
            body = {**body, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        if verdict.outcome.served:  # a slow answer is not: the client has given up on it
            self._record_answer(texts, tokens)
        return Reply(200, body, verdict.headers)

    def _judge(self, texts: Sequence[str], tokens: int) -> _Verdict:
        """Decide one request's answer and count it; the caller holds the lock."""
        plan = self.plan
        now = time.monotonic()
        for limit in self._limits:
            limit.refill(now)
        refusal: Reply | None = None
        permutation: tuple[int, ...] = ()
        if plan.quota_after is not None and self._quota_used >= plan.quota_after:
            outcome = Outcome.QUOTA_EXHAUSTED
            refusal = error_reply(
                429, QUOTA_MESSAGE, error_type="insufficient_quota", code="insufficient_quota"
            )
        elif (poisoned := self.poisoned(texts)) is not None:
            outcome = Outcome.POISONED
            refusal = poisoned
        elif (throttle := self._throttle(tokens)) is not None:
            outcome = Outcome.RATE_LIMITED
            refusal = throttle
        else:
            for limit in self._limits:
                limit.take(limit.cost(tokens))
            outcome = plan.fault_for(self._fault_rng.random())
            if outcome is Outcome.SHUFFLED:
                permutation = tuple(self._fault_rng.sample(range(len(texts)), len(texts)))
            if outcome.served:
                self._quota_used += 1
        self._tally.counts[outcome] += 1
        rate_headers = {name: value for limit in self._limits for name, value in limit.headers()}
        if refusal is not None:
            refusal = dataclasses.replace(refusal, headers={**rate_headers, **refusal.headers})
        delay = plan.slow_s if outcome is Outcome.SLOW else plan.latency_s
        if plan.jitter_s and outcome is not Outcome.SLOW:
            delay += self._jitter_rng.uniform(0.0, plan.jitter_s)
        return _Verdict(outcome, delay, rate_headers, refusal, permutation)

    def _throttle(self, tokens: int) -> Reply | None:
        """OpenAI's 429 if the request does not fit every (refilled) limit, naming the binding one.

        The Retry-After headers say when it will fit; nothing is taken from any bucket.
        """
        waits = [(limit.wait_for(limit.cost(tokens)), limit) for limit in self._limits]
        wait, binding = max(waits, key=lambda pair: pair[0], default=(0.0, None))
        if binding is None or wait <= 0:
            return None
        message = (
            f"Rate limit reached for {binding.kind} per min (limit {binding.per_minute}) on "
            f"{self.model}: requested {binding.cost(tokens)}. "
            f"Please try again in {format_duration(wait)}."
        )
        retry_after = {
            "retry-after": str(math.ceil(wait)),
            "retry-after-ms": str(math.ceil(wait * 1000)),
        }
        return error_reply(
            429, message, error_type=binding.kind, code="rate_limit_exceeded", headers=retry_after
        )

    def _record_answer(self, texts: Sequence[str], tokens: int) -> None:
        """Count an intact answer, in the base stats and in the ok timestamps, atomically."""
        with self._lock:
            now = time.monotonic()
            tally = self._tally
            if tally.first_ok_at is None:
                tally.first_ok_at = now
            else:
                tally.tokens_after_first_ok += tokens
            tally.last_ok_at = now
            super().record_served(texts, tokens)


def _ratio(rate: float | None, limit: int | None) -> float | None:
    return None if rate is None or limit is None else rate / limit


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.fault_server``: print the base URL, then serve until killed.

    Every :class:`FaultPlan` field is a flag, its ``_s`` unit suffix dropped (``--latency 0.06``,
    ``--p-503-html 0.01``, ``--quota-after 100``); ``--poison MARKER`` (repeatable) is the
    server's poison.
    """
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fault_server",
        description="An OpenAI-compatible embedding server with rate limits and seeded faults. "
        f"GET {{base_url}}{REPORT_PATH} answers the measurements as JSON.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--poison", action="append", metavar="MARKER",
                        help="inputs containing it fail their request with 400 (repeatable)")
    hints = typing.get_type_hints(FaultPlan)
    plan_fields = dataclasses.fields(FaultPlan)
    for plan_field in plan_fields:
        flag = plan_field.name.removesuffix("_s").replace("_", "-")
        if hints[plan_field.name] is bool:
            parser.add_argument(f"--{flag}", dest=plan_field.name, action="store_true",
                                help=plan_field.metadata["help"])
            continue
        parser.add_argument(
            f"--{flag}",
            dest=plan_field.name,
            type=_scalar(hints[plan_field.name]),
            metavar="SECONDS" if plan_field.name.endswith("_s") else None,
            default=plan_field.default,
            help=plan_field.metadata["help"],
        )
    args = parser.parse_args(argv)
    try:
        plan = FaultPlan(**{f.name: getattr(args, f.name) for f in plan_fields})
        server = FaultServer(plan, host=args.host, port=args.port, dim=args.dim,
                             model=args.model, poison=args.poison)
    except ValueError as exc:
        parser.error(str(exc))
    print(server.base_url, flush=True)
    serve_until_interrupted(server)
    return 0


def _scalar(hint: Any) -> Any:
    """``int`` for ``int | None``: the type argparse converts a flag's value with."""
    return next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)


if __name__ == "__main__":
    sys.exit(main())
