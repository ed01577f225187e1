"""Which idle connections granian closes (issue 12's spike): a GranianDoh listener with a 2 s idle
timeout (mapped onto granian's HTTP/1.1 header_read_timeout; granian has no idle timeout for HTTP/2),
and three clients on loopback that finish the TLS handshake and then send nothing, half a request
line, or nothing over h2. Run by hand:

    .venv/bin/python bench/doh_granian_idle.py CERT KEY

2026-12-06 (granian 2.8.7): a half request is closed after 2.0 s; an idle HTTP/1.1 connection and an
idle HTTP/2 connection are still open after 8 s (the h2 listener closes all three after its timeout).
"""
import asyncio
import json
import socket
import ssl
import sys
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from doh_granian import DohApp, GranianDoh, listen_socket  # noqa: E402
from magicdns.server import DnsServer, ServerConfig  # noqa: E402
from magicdns.view import view_from_json  # noqa: E402

cert, key = sys.argv[1], sys.argv[2]
def probe(port, alpn, send=b""):
    ctx = ssl.create_default_context(); ctx.check_hostname=False; ctx.verify_mode=ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    t = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="dns.test")
    if send: t.sendall(send)
    t.settimeout(8); t0 = time.monotonic()
    try:
        while True:
            d = t.recv(4096)
            if not d: return f"{alpn} send={send[:10]!r}: closed after {time.monotonic()-t0:.1f}s"
    except socket.timeout:
        return f"{alpn} send={send[:10]!r}: still open after 8s"
    except Exception as e:
        return f"{alpn}: {type(e).__name__} after {time.monotonic()-t0:.1f}s"
async def main():
    srv = DnsServer(ServerConfig(listen=(("127.0.0.1", 0),)))
    await srv.start(view_from_json(json.loads((ROOT / "conf" / "view.json").read_text())))
    s = listen_socket("127.0.0.1", 0); port = s.getsockname()[1]
    g = GranianDoh(DohApp(srv.dispatch), s, cert, key, idle_timeout=2); g.start()
    loop = asyncio.get_running_loop()
    res = await asyncio.gather(*[loop.run_in_executor(None, probe, port, a, b) for a, b in
        [("http/1.1", b""), ("http/1.1", b"GET /dns-query HTTP/1.1\r\nho"), ("h2", b"")]])
    print("\n".join(res)); await g.stop(); await srv.stop()
uvloop.run(main())
