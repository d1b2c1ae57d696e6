"""JSON request bodies, parsed only when nested no deeper than any mintq body needs.

eth_account (through py_ecc) raises the interpreter's recursion limit to 100,000, so the C
parser of `json` no longer stops a deeply nested document with a RecursionError: it runs
out of C stack and the worker dies with a segfault. A few hundred kilobytes of `[` are
enough. The nesting is therefore measured before the parser sees the text.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from flask import Request
from flask.json.provider import DefaultJSONProvider

from mintq.errors import MintqError

# The deepest mintq body is a gasless mint's {"authorization": {...}}; 32 leaves room.
MAX_DEPTH = 32

# A JSON string; an unterminated one runs to the end (the body is invalid JSON anyway).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


class InvalidJSON(MintqError, ValueError):
    """Not a JSON document mintq reads. A ValueError too, as `json.loads` would raise, so
    `request.get_json(silent=True)` still answers None."""

    status = 400
    code = "invalid_json"


def loads(raw: bytes | bytearray | str) -> Any:
    """Parse a UTF-8 JSON document nested at most MAX_DEPTH deep, or raise InvalidJSON."""
    try:
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidJSON("The body is not valid JSON: it is not UTF-8.") from None
    # Every bracket counted, in C: a bound on the depth that almost every body stays under.
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(text) > MAX_DEPTH:
        raise InvalidJSON(
            f"The body is nested more than {MAX_DEPTH} levels deep.",
            details={"maxDepth": MAX_DEPTH},
        )
    try:
        return json.loads(text)
    except ValueError:
        raise InvalidJSON("The body is not valid JSON.") from None


def _depth(text: str) -> int:
    """How deep arrays and objects nest; brackets inside strings do not count.

    Every step runs in C (a Python loop over each bracket of a large body would cost more
    than parsing it): strings are cut out, every byte but a bracket is deleted, and the
    deepest point is the largest running sum of +1 per opening and -1 per closing bracket.
    """
    brackets = _STRING.sub("", text).encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON, reading through `loads` above: `request.get_json()` everywhere is safe."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads(s)


class JSONRequest(Request):
    """`get_json()` answers our `invalid_json` error rather than a bare 400 Bad Request."""

    def on_json_loading_failed(self, e: ValueError | None) -> Any:
        if isinstance(e, InvalidJSON):
            raise e
        return super().on_json_loading_failed(e)
