"""How much of a granian DoH request is granian and its hop to the loop, and how much is our handler:
the same GranianDoh listener with `DohApp` (mode doh) or with a handler that returns fixed bytes
(mode fixed). Run by hand (issue 12's spike), e.g. with the server on core 0 and h2load on core 1:

    taskset -c 0 .venv/bin/python bench/doh_granian_floor.py fixed PORT CERT KEY &
    taskset -c 1 h2load -i URIS -c 16 -m 10 -D 5      (and CPU per query from bench/dns_bench.py cpu PID)
"""
import asyncio
import json
import sys
from pathlib import Path

import dns.message
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from doh_granian import DohApp, GranianDoh, listen_socket  # noqa: E402

mode, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
REPLY = dns.message.make_response(dns.message.make_query("my-server.tailnet", "A")).to_wire()
class Fixed:
    async def __call__(self, scope, proto):
        proto.response_bytes(200, [("content-type", "application/dns-message"), ("cache-control", "max-age=300")], REPLY)
async def main():
    if mode == "fixed":
        app = Fixed()
    else:
        from magicdns.server import DnsServer, ServerConfig
        from magicdns.view import view_from_json
        srv = DnsServer(ServerConfig(listen=(("127.0.0.1", 0),)))
        await srv.start(view_from_json(json.loads((ROOT / "conf" / "view.json").read_text())))
        app = DohApp(srv.dispatch)
    g = GranianDoh(app, listen_socket("127.0.0.1", port), cert, key)
    g.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
