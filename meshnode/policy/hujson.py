"""HuJSON (JSON with comments and trailing commas), read strictly.

The text is first standardized into plain JSON of the same length, with comments and trailing commas
replaced by spaces, so the standard `json` module reports errors at the original line and column.
JSON5 extras that are not HuJSON (unquoted keys, single quotes, NaN, Infinity, hex numbers, leading
'+') are refused, always, with a position: a policy that only one parser accepts is a trap.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import HuJSONError

_WS = " \t\r\n"
_LITERALS = frozenset({"true", "false", "null"})
_WORD = re.compile(r"[A-Za-z0-9_$]+")
_IDENT_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_$")


def position(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, column


def _fail(text: str, index: int, message: str) -> HuJSONError:
    return HuJSONError(message, *position(text, index))


def _skip_string(text: str, start: int) -> int:
    """Index just past the string starting at text[start] == '"' (json checks its contents later)."""
    n = len(text)
    i = start + 1
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
        elif c == '"':
            return i + 1
        elif c == "\n":
            break
        else:
            i += 1
    raise _fail(text, start, "unterminated string (a string cannot span lines)")


def standardize(text: str) -> str:
    """Turn HuJSON into JSON of identical length (comments and trailing commas become spaces)."""
    out = list(text)
    n = len(text)
    i = 0
    if text.startswith("\ufeff"):  # a byte-order mark some editors write: whitespace to us
        out[0] = " "
        i = 1
    last_comma = -1      # index of a comma not yet followed by a value
    after_value = False  # whether the last token ended a value (only then may a comma follow)
    while i < n:
        c = text[i]
        if c == '"':
            i = _skip_string(text, i)
            last_comma, after_value = -1, True
        elif c == "/" and i + 1 < n and text[i + 1] == "/":
            end = text.find("\n", i)
            end = n if end < 0 else end
            out[i:end] = " " * (end - i)
            i = end
        elif c == "/" and i + 1 < n and text[i + 1] == "*":
            end = text.find("*/", i + 2)
            if end < 0:
                raise _fail(text, i, "unterminated /* comment")
            for j in range(i, end + 2):
                if out[j] != "\n":
                    out[j] = " "
            i = end + 2
        elif c in "]}":
            if last_comma >= 0:
                out[last_comma] = " "  # the one comma HuJSON adds to JSON: before a closing bracket
            last_comma, after_value = -1, True
            i += 1
        elif c == ",":
            if not after_value:
                raise _fail(text, i, "unexpected ',' (no value before it)")
            last_comma, after_value = i, False
            i += 1
        elif c in _WS:
            i += 1
        elif c == "'":
            raise _fail(text, i, "single-quoted strings are not HuJSON; use double quotes")
        elif c in _IDENT_START:
            m = _WORD.match(text, i)
            assert m is not None  # c itself matches
            word = m.group(0)
            if word not in _LITERALS:
                raise _fail(text, i, f"unexpected identifier {word!r} (keys and strings need double quotes;"
                                     " NaN and Infinity are not JSON)")
            last_comma, after_value = -1, True
            i = m.end()
        else:  # digits, signs, ':', '[', '{' and stray characters json will judge
            last_comma, after_value = -1, c not in "[{:"
            i += 1
    return "".join(out)


def _find_key(text: str, key: str, occurrence: int) -> int | None:
    pattern = re.compile(re.escape(json.dumps(key)) + r"\s*:")
    for k, m in enumerate(pattern.finditer(text)):
        if k == occurrence:
            return m.start()
    return None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def loads(text: str) -> Any:
    """Parse HuJSON text; raise `HuJSONError` with line and column on anything that is not HuJSON."""
    plain = standardize(text)
    try:
        return json.loads(plain, object_pairs_hook=_pairs)
    except json.JSONDecodeError as exc:
        raise HuJSONError(exc.msg, exc.lineno, exc.colno) from None
    except _DuplicateKey as dup:
        # Go's decoder would silently keep the last value; a duplicated section is almost always a
        # merge accident, so refuse it. The position is the key's second spelling, found by search.
        index = _find_key(plain, dup.key, 1)
        if index is None:
            raise HuJSONError(f"duplicate key {dup.key!r}") from None
        raise _fail(text, index, f"duplicate key {dup.key!r}") from None
    except RecursionError:
        raise HuJSONError("nesting too deep") from None
