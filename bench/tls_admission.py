#!/usr/bin/env python3
"""What a refused TLS client costs the resolver, against what an admitted handshake costs. Run by
hand (not a test):

    .venv/bin/python bench/tls_admission.py            # 2000 connections of each kind
    .venv/bin/python bench/tls_admission.py 5000

Starts `magicdns serve --dot 127.0.0.1:0 --allow 127.0.0.2/32` (a test CA made here), then opens
N connections from 127.0.0.1 (outside the allow-list: reset before TLS) each sending a real
ClientHello, and N full TLS handshakes from 127.0.0.2 (admitted), one at a time. Prints the server's
CPU time per connection (from /proc/PID/stat) and the client-side rate for each kind. Traffic stays
on loopback; every loop is bounded by N.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.magicdns_proc import run_cli, start_magicdns  # noqa: E402
from tests.integration.tls_helpers import make_ca, make_leaf, write_pair  # noqa: E402

NAME = "dns.test"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def client_hello() -> bytes:
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=NAME)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def refused(port: int, hello: bytes) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(hello)
            if s.recv(4096):
                raise SystemExit("a refused client got bytes back: the allow-list is not checked before TLS")
        except (ConnectionResetError, BrokenPipeError):
            pass


def admitted(port: int, ctx: ssl.SSLContext) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        with ctx.wrap_socket(s, server_hostname=NAME):
            pass


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    d = Path(tempfile.mkdtemp(prefix="tls-admission-"))
    ca = make_ca("bench CA")
    cert, key = write_pair(d, make_leaf(ca, (NAME,), ()))
    ctx = ssl.create_default_context(cafile=str(ca.write(d / "ca.pem")))
    server = start_magicdns("--allow", "127.0.0.2/32", "--dot", "127.0.0.1:0", "--max-tcp-connections", "4096",
                            "--tls-cert", str(cert), "--tls-key", str(key), probe=None)
    try:
        st = json.loads(run_cli("status", "--control-socket", server.control_socket, "--json").stdout)
        port = int(st["encrypted"]["listeners"][0].rsplit(":", 1)[1])
        hello = client_hello()
        rows = []
        for kind, one in (("refused (outside --allow)", lambda: refused(port, hello)),
                          ("admitted TLS handshake", lambda: admitted(port, ctx))):
            cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
            for _ in range(n):
                one()
            wall, cpu = time.perf_counter() - t0, cpu_seconds(server.proc.pid) - cpu0
            rows.append((kind, n / wall, cpu / n * 1e6))
        st = json.loads(run_cli("status", "--control-socket", server.control_socket, "--json").stdout)
        print(f"{'connection':28} {'per second':>11} {'server CPU us each':>19}")
        for kind, rate, us in rows:
            print(f"{kind:28} {rate:11.0f} {us:19.1f}")
        print(f"refused_clients={st['queries']['refused_clients']} (expected {n})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
