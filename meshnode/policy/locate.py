"""Finding where in the policy text an entry named like `acls[2].dst[0]` starts, so semantic
errors can carry a line and column as syntax errors do."""

from __future__ import annotations

import ast
import json
import re

_TOKEN = re.compile(r"""\.?([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\]""")
_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\r\n]*")
_ALIASES = {"src": "users", "dst": "ports"}


def path_of(where: str) -> list[str | int] | None:
    """`acls[0].dst[1]` -> ['acls', 0, 'dst', 1]; None when `where` is not such a path."""
    path: list[str | int] = []
    pos = 0
    while pos < len(where):
        m = _TOKEN.match(where, pos)
        if m is None:
            return None
        name, index, quoted = m.groups()
        if name is not None:
            path.append(name)
        elif index is not None:
            path.append(int(index))
        else:
            path.append(ast.literal_eval(quoted))
        pos = m.end()
    return path


def _skip(text: str, pos: int) -> int:
    m = _WS.match(text, pos)
    return m.end() if m else pos


def _child(text: str, pos: int, step: str | int) -> int | None:
    """Start of the member `step` of the object or array starting at `pos`."""
    opener = text[pos:pos + 1]
    pos = _skip(text, pos + 1)
    index = 0
    while pos < len(text) and text[pos] not in "]}":
        if opener == "{":
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip(text, pos)
            pos = _skip(text, pos + 1)  # the ':'
            if key == step:
                return pos
        elif opener == "[":
            if index == step:
                return pos
            index += 1
        else:
            return None
        _, pos = _DECODER.raw_decode(text, pos)
        pos = _skip(text, pos)
        if text[pos:pos + 1] == ",":
            pos = _skip(text, pos + 1)
    return None


def locate(plain: str, where: str) -> int | None:
    """Offset in `plain` (standardized JSON) of the deepest value on the path `where` names."""
    path = path_of(where)
    if not path or path == ["policy"]:
        return _skip(plain, 0) if path else None
    pos: int | None = _skip(plain, 0)
    found = None
    try:
        for step in path:
            assert pos is not None
            nxt = _child(plain, pos, step)
            if nxt is None and isinstance(step, str) and step in _ALIASES:
                nxt = _child(plain, pos, _ALIASES[step])
            if nxt is None:
                # A dynamic key is named as written; a section absent from the text has no place.
                return found
            pos = found = nxt
    except (ValueError, IndexError, AssertionError):
        return found
    return found
