"""Poison isolation: split a refused request until the input at fault is alone.

A provider that refuses one input (too long, unsafe content) refuses the whole request it came
in, and a server with a cap on inputs per request refuses any request above it. Neither is a
reason to lose the other inputs. :func:`bisect` sends a span of inputs through a ``call`` and,
when the answer is a per-input error, sends the two halves instead (or, when the server stated
its cap, pieces of that size), down to single inputs: only an input refused on its own is given
up, as a :class:`Refused`. With one poisoned input among ``n``, that costs ``2·log2(n) + 1``
calls; each span is answered exactly once, in input order.

Pure: no state of its own and no I/O beyond ``call``, so it is tested with plain callables.
What a call does with retries, limits or an aborted run is the caller's business; only
:class:`~transforms.errors.InputRejectedError` and
:class:`~transforms.errors.RequestTooLargeError` split, any other exception propagates.

:class:`RequestCap` is the one piece of state around it: the largest request a server takes,
learned from the caps it states, shared by every thread of a session. It also holds back a
request larger than any the server has answered while another such request is out, so that
a cap costs one refused request per worker, not one per thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from transforms.errors import InputRejectedError, RequestTooLargeError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: The errors that split a request: they are about an input, or about the request's size.
SPLITTING = (InputRejectedError, RequestTooLargeError)


@dataclass(frozen=True, slots=True)
class Refused(Generic[T]):
    """An input the provider refused on its own: ``error`` is about its content."""

    offset: int  # its position in the items given to :func:`bisect` (plus their offset)
    items: Sequence[T]  # exactly one
    error: InputRejectedError | RequestTooLargeError


def spans(items: Sequence[T], size: int, offset: int = 0) -> Iterator[tuple[int, Sequence[T]]]:
    """``(offset, piece)`` for consecutive pieces of at most ``size`` items.

    >>> list(spans("abcde", 2))
    [(0, 'ab'), (2, 'cd'), (4, 'e')]
    """
    step = max(1, size)
    for start in range(0, len(items), step):
        yield offset + start, items[start : start + step]


def bisect(
    items: Sequence[T],
    call: Callable[[int, Sequence[T]], R],
    *,
    offset: int = 0,
    on_cap: Callable[[int], object] | None = None,
) -> Iterator[R | Refused[T]]:
    """``call(offset, span)`` for ``items``, splitting every span a per-input error refuses.

    Yields, in input order, each accepted span's answer and a :class:`Refused` per input
    refused alone. A :class:`~transforms.errors.RequestTooLargeError` that states the server's
    cap (``max_inputs``) is passed to ``on_cap`` first, so the caller can size later requests
    by it, and the span is cut into pieces of that size; without a stated cap, or when the span
    is no larger than it, the span is halved. A lazy generator: each call is made when the
    answer before it has been consumed.

    >>> def call(offset, span):
    ...     if "x" in span:
    ...         raise InputRejectedError("bad input")
    ...     return span
    >>> [a if isinstance(a, str) else f"refused {a.items}" for a in bisect("abxd", call)]
    ['ab', 'refused x', 'd']
    """
    try:
        answer = call(offset, items)
    except SPLITTING as exc:
        if len(items) == 1:
            yield Refused(offset, items, exc)
            return
        cap = exc.max_inputs if isinstance(exc, RequestTooLargeError) else None
        if cap:
            # Only a stated cap is learned: one oversized input must not shrink every request.
            if on_cap is not None:
                on_cap(cap)
            if cap < len(items):
                for start, piece in spans(items, cap, offset):
                    yield from bisect(piece, call, offset=start, on_cap=on_cap)
                return
        half = len(items) // 2
        yield from bisect(items[:half], call, offset=offset, on_cap=on_cap)
        yield from bisect(items[half:], call, offset=offset + half, on_cap=on_cap)
        return
    yield answer


class RequestCap:
    """The most inputs one request may carry: the configured cap, lowered by what servers state.

    Shrinks only, and is shared by every thread of a session, so once one request learns that
    the server takes at most ``n`` inputs, every later batch is cut to ``n`` before it is sent
    instead of being refused first (text-embeddings-inference's ``--max-client-batch-size``,
    FastAPI's 422 ``too_long``, Azure's "max number of inputs").

    It is also a gate (:meth:`admit`): a request larger than any the server has answered waits
    while another such request is out. The first one finds out whether its size passes; the
    others then go (it passed, or they are no larger than what it found to pass) or are cut to
    the cap it stated, unsent. Without the gate every thread sent its own oversized request
    before the first refusal came back (and batches of two sizes each cost one). The first
    request of a session is such a probe, so its answer, alone, also teaches the rate limiter
    the provider's unit of count (:meth:`~transforms.limits.RateLimiter.settle`) before the
    other threads send: the price is one request's latency at the start.

    >>> cap = RequestCap(256)
    >>> cap.learn(8), cap.learn(16), cap.value
    (True, False, 8)
    """

    def __init__(self, configured: int) -> None:
        self._value = max(1, configured)
        self._answered = 0  # the largest request the server has answered
        self._probing = False  # a request larger than that is out
        self._cond = threading.Condition()

    @property
    def value(self) -> int:
        return self._value

    def learn(self, stated: int) -> bool:
        """Obey ``stated`` from now on if it is smaller; True when the cap was lowered."""
        stated = max(1, stated)
        with self._cond:
            if stated >= self._value:
                return False
            self._value = stated
            self._cond.notify_all()
        log.warning("embedpipe: the provider caps requests at %d inputs; sending at most that "
                    "many from now on (set provider.max_inputs_per_request=%d)", stated, stated)
        return True

    @contextmanager
    def admit(self, n: int) -> Iterator[None]:
        """Around sending a request of ``n`` inputs: wait while a larger-than-ever one is out.

        Raises :class:`~transforms.errors.RequestTooLargeError` stating the cap, without
        sending, when ``n`` is over a cap learned meanwhile: :func:`bisect` cuts it. Call
        :meth:`answered` inside the block when the server answered, and :meth:`learn` inside
        it when the server stated a cap, so the requests waiting see it when they wake.
        """
        probe = False
        with self._cond:
            while True:
                if n > self._value:
                    raise RequestTooLargeError(
                        f"{n} inputs, over the provider's stated cap of {self._value}",
                        max_inputs=self._value)
                if n <= self._answered:
                    break
                if not self._probing:
                    self._probing = probe = True
                    break
                self._cond.wait()
        try:
            yield
        finally:
            if probe:
                with self._cond:
                    self._probing = False
                    self._cond.notify_all()

    def answered(self, n: int) -> None:
        """The server answered a request of ``n`` inputs: that size passes without waiting."""
        with self._cond:
            if n > self._answered:
                self._answered = n
                self._cond.notify_all()
