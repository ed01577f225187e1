"""The optional query log: one line per answered query, for operators who switch it on.

It costs a little per query, so the server only calls it when `--query-log` is given.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from dnslib import QTYPE, RCODE


def question_text(data: bytes) -> tuple[str, str]:
    """(name, type) of a query's first question, read without a full parse; '?' when unreadable."""
    labels = []
    i = 12
    try:
        length = data[i]
        while length:
            if length > 63:
                return "?", "?"
            labels.append(data[i + 1:i + 1 + length].decode("ascii", "backslashreplace"))
            i += length + 1
            length = data[i]
        qtype = data[i + 1] << 8 | data[i + 2]
    except IndexError:
        return "?", "?"
    return ".".join(labels) + ".", QTYPE.get(qtype, str(qtype))


class QueryLog:
    """Appends `time client name type rcode source` lines to a file or stderr."""

    def __init__(self, stream: TextIO, owned: bool) -> None:
        self.stream = stream
        self.owned = owned

    @classmethod
    def open(cls, path: str) -> "QueryLog":
        if path == "-":
            return cls(sys.stderr, False)
        return cls(open(path, "a", buffering=1), True)  # line-buffered: operators tail it

    def write(self, client: str, query: bytes, reply: bytes, source: str) -> None:
        name, qtype = question_text(query)
        rcode = RCODE.get(reply[3] & 0xF, "?") if len(reply) >= 4 else "?"
        self.stream.write(f"{time.time():.3f} {client} {name} {qtype} {rcode} {source}\n")

    def close(self) -> None:
        if self.owned:
            self.stream.close()
        else:
            self.stream.flush()
