"""The batched UDP listener and the answer engine without the event loop, for instruction counts.

    python bench/dns_loop.py VIEW.json PORT COUNT

Binds 127.0.0.1:PORT, serves exactly COUNT queries through BatchUdpListener (the server's own
listener, dispatch and engine) and exits; waiting is a blocking select(), so nothing but the
per-query work costs instructions. bench/dns_instr.sh runs it under callgrind twice (two COUNTs)
and divides the difference by the difference of the counts.
"""

from __future__ import annotations

import json
import select
import socket
import sys

from magicdns.dispatch import Dispatch, ListenerLimits
from magicdns.engine import Engine
from magicdns.server import DEFAULT_ALLOW
from magicdns.udpbatch import BatchUdpListener
from magicdns.view import view_from_json
from magicdns.zone import Zone


def main() -> None:
    view_path, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    view = view_from_json(json.loads(open(view_path).read()))

    def no_forward(*_: object) -> None:
        raise SystemExit("dns_loop.py: a query needed forwarding")

    dispatch = Dispatch(DEFAULT_ALLOW, no_forward, ListenerLimits())
    dispatch.engine = Engine(Zone(view))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    listener = BatchUdpListener(dispatch, sock)
    print("ready", flush=True)
    counters = dispatch.counters
    while counters.udp < count:
        select.select([sock], [], [])
        listener._on_readable()
    sock.close()


if __name__ == "__main__":
    main()
