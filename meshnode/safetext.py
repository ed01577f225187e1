"""Printing strings that came from the network (host names, OS strings, user names, tags) safely.

A node chooses its own host name and OS string, and a user name comes from whoever made the key: any
of them can carry terminal escapes (ESC [ 2J clears the admin's screen, OSC 52 writes the clipboard),
carriage returns that overwrite a line, or bidirectional overrides that reorder what is shown. Every
table and message that shows such a string passes it through `safe()`, which replaces each control or
formatting character with a visible escape (`\\x1b`, `\\u202e`), so what the admin sees is what is
stored, and nothing can be hidden or forged in a table.
"""

from __future__ import annotations

_REPLACE: dict[int, str] = {}
for _cp in list(range(0x00, 0x20)) + [0x7F] + list(range(0x80, 0xA0)):
    _REPLACE[_cp] = f"\\x{_cp:02x}"
_REPLACE[ord("\\")] = "\\\\"     # so an escape shown can never be confused with a literal backslash


def _escape(ch: str) -> str:
    cp = ord(ch)
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def safe(value: object) -> str:
    """`str(value)` with control characters, terminal escapes and every other character Python does not
    call printable (bidi overrides, zero-width, line/paragraph separators, unusual spaces) replaced by
    visible escapes; ordinary text, including non-ASCII letters, is unchanged."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and "\\" not in text:
        return text   # the common case: nothing to do
    out = []
    for ch in text:
        cp = ord(ch)
        if cp in _REPLACE:
            out.append(_REPLACE[cp])
        elif ch.isprintable():
            out.append(ch)
        else:   # format (bidi, zero-width), separators, odd spaces, surrogates, unassigned
            out.append(_escape(ch))
    return "".join(out)
