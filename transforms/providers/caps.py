"""The cap on inputs per request that a server states when it refuses a request over it.

A server with a cap on inputs per request refuses a larger one, and says so in its own words.
Read, the cap is learned once per worker and later requests are cut to it before they are
sent (:class:`~transforms.bisection.RequestCap`); unread, every oversized request costs a
refusal and a bisection. The shapes met in practice::

    TEI 413           {"error": "batch size 64 > maximum allowed batch size 8", ...}
    FastAPI 422       {"detail": [{"type": "too_long", "loc": ["body", "input"],
                       "msg": "List should have at most 2048 items after validation, not 2049",
                       "ctx": {"max_length": 2048, ...}, "input": [...]}]}   (infinity, gateways)
    vLLM 400          {"object": "error", "message": "[{'type': 'too_long', ... 'msg': 'List
                       should have at most 8 items after validation, not 9' ...}]", "code": 400}
    OpenAI 400        "Invalid 'input': array too long. Expected an array with maximum length
                       2048, but got an array with length 2049 instead."
    Azure OpenAI 400  "Too many inputs. The max number of inputs is 16. ..."
    DashScope 400     "batch size is invalid, it should not be larger than 10."

Only the error's message (and a validation error's ``msg``) is read, never the whole body:
FastAPI and vLLM echo the inputs back, and an input's text must not set a cap. A number of
tokens, characters or bytes is a per-input limit (bisection's business), never a cap on inputs.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

#: The statuses a refusal over a cap comes with (400 and 422 are otherwise about an input).
CAP_STATUSES = (400, 413, 422)

_NOT_A_COUNT_OF_INPUTS = r"\b(?!\s*(?:tokens?|characters?|chars|bytes|words))"
_PATTERNS = tuple(re.compile(pattern + _NOT_A_COUNT_OF_INPUTS, re.IGNORECASE) for pattern in (
    r"maximum allowed batch size (\d+)",                       # TEI
    r"should have at most (\d+) items?",                       # pydantic v2 too_long
    r"ensure this value has at most (\d+) items",              # pydantic v1 max_items
    r"max(?:imum)? number of inputs is (\d+)",                 # Azure OpenAI
    r"array with maximum length (\d+)",                        # OpenAI
    r"maximum (?:of )?(\d+) (?:inputs|texts|items)",           # "maximum 2048 inputs"
    (r"(?:inputs?|batch(?: size)?|texts|list|array)\b[^.\d]{0,40}?"   # "inputs must be at
     r"(?:at most|no more than|not be larger than|not exceed|<=)\s*(\d+)"),  # most N", DashScope
))

#: Field names a validation error about the list of inputs is located at.
_INPUT_FIELDS = {"input", "inputs", "texts", "text", "sentences", "documents"}


def stated_input_cap(response: httpx.Response, message: str) -> int | None:
    """The cap on inputs per request that this refusal states, or None when it states none.

    ``message`` is the error's message as :func:`~transforms.providers.base.
    error_code_and_message` read it; a FastAPI ``detail`` list is read here, item by item.
    """
    if response.status_code not in CAP_STATUSES:
        return None
    items = _validation_errors(response)
    if items:  # the message is then the body itself, inputs and all: read the items alone
        return next((cap for item in items if (cap := _from_validation_error(item))), None)
    return cap_in_text(message)


def cap_in_text(text: str) -> int | None:
    """The first cap on inputs a message states, by its position in the text.

    >>> cap_in_text("Too many inputs. The max number of inputs is 16.")
    16
    >>> cap_in_text("This model's maximum context length is 8192 tokens") is None
    True
    """
    found = [match for pattern in _PATTERNS if (match := pattern.search(text))]
    if not found:
        return None
    value = int(min(found, key=lambda m: m.start()).group(1))
    return value if value >= 1 else None


def _validation_errors(response: httpx.Response) -> list[dict[str, Any]]:
    """FastAPI's ``{"detail": [...]}`` items, or none."""
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return []
    detail = body.get("detail") if isinstance(body, dict) else None
    return [item for item in detail if isinstance(item, dict)] if isinstance(detail, list) else []


def _from_validation_error(item: dict[str, Any]) -> int | None:
    loc = item.get("loc")
    if isinstance(loc, list | tuple) and loc and not _INPUT_FIELDS & {str(p) for p in loc}:
        return None  # about another field
    ctx = item.get("ctx")
    if not isinstance(ctx, dict):
        ctx = {}
    if item.get("type") in ("too_long", "value_error.list.max_items"):
        for key in ("max_length", "limit_value"):
            value = ctx.get(key)
            if isinstance(value, int) and value >= 1:
                return value
    msg = item.get("msg")
    return cap_in_text(msg) if isinstance(msg, str) else None
