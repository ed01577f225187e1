"""Control server under abuse (run by hand; never part of the test suite).

    .venv/bin/python bench/control_abuse.py [--seconds 5] [--keys 100000]

1. The replay guard alone: checks a second while one key floods and while `--keys` minted keys each
   send one request (the old guard kept every nonce for 240 s and, once full, scanned its whole
   table on each check), with the memory it holds.
2. A real server (`meshnode control serve`, its own process) on 127.0.0.1: sealed /machine/endpoints requests a second from registered
   nodes (each request also persists its replay mark), then the same while a flood of freshly minted
   machine keys hits /machine/map: how much of the flood is turned away (429) and what the
   registered nodes still get.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from meshnode.control.client import ControlClient, generate_private_key  # noqa: E402
from meshnode.control.protocol import MACHINE_KEY_HEADER, Channel, ReplayGuard, public_key_of  # noqa: E402
from meshnode.control.store import ControlStore  # noqa: E402


def bench_guard(keys: int) -> list[tuple[str, str]]:
    rows = []
    guard = ReplayGuard()
    now = 1_000_000.0
    n = 1_000_000
    t0 = time.perf_counter()
    for i in range(n):
        guard.check("flood", i.to_bytes(8, "big"), now + i * 1e-4, now + i * 1e-4)
    dt = time.perf_counter() - t0
    rows.append(("guard: one key, 1M requests", f"{n / dt:,.0f} checks/s, {guard.entries('flood')} nonces kept"))
    guard = ReplayGuard()
    t0 = time.perf_counter()
    for i in range(keys):
        guard.check(f"k{i}", b"n", now, now)
    dt = time.perf_counter() - t0
    tracemalloc.start()
    guard = ReplayGuard()
    for i in range(keys):
        guard.check(f"k{i}", b"n", now, now)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rows.append((f"guard: {keys:,} minted keys, one request each",
                 f"{keys / dt:,.0f} checks/s, {len(guard):,} keys held, {size / 2**20:.1f} MiB"))
    return rows


async def _endpoints_loop(client: ControlClient, until: float) -> int:
    done = 0
    while time.monotonic() < until:
        await client.update_endpoints([f"192.0.2.1:{1000 + done % 50000}"])
        done += 1
    return done


def _flood_requests(server_pub: str, count: int) -> list[tuple[str, bytes]]:
    """Requests from freshly minted machine keys, made before the clock starts (minting costs the
    client more than answering costs the server)."""
    out = []
    for _ in range(count):
        mk = generate_private_key()
        out.append((public_key_of(mk), Channel(mk, server_pub).seal({"ts": time.time(), "node_key": mk})))
    return out


async def _flood(url: str, requests: list[tuple[str, bytes]], until: float, counts: dict[int, int]) -> None:
    async with aiohttp.ClientSession() as http:
        while requests and time.monotonic() < until:
            pub, body = requests.pop()
            async with http.post(url + "/machine/map", data=body, headers={MACHINE_KEY_HEADER: pub}) as resp:
                counts[resp.status] = counts.get(resp.status, 0) + 1


async def bench_server(seconds: float, register_rate: float) -> list[tuple[str, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "c.db"
        admin = ControlStore(db)
        key, _ = admin.create_authkey("bench@example.com", reusable=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        # The server in its own process, as in production: its CPU is not shared with the clients'.
        server = subprocess.Popen([sys.executable, "-c", "from meshnode.cli import main; main()", "control",
                                   "serve", "--listen", f"127.0.0.1:{port}", "--db", str(db),
                                   "--register-rate", str(register_rate)],
                                  stderr=open(Path(tmp) / "server.log", "w"))
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("server did not start: " + (Path(tmp) / "server.log").read_text())
                time.sleep(0.05)  # startup poll of a subprocess; bounded above
        clients = [ControlClient(url, generate_private_key(), generate_private_key()) for _ in range(8)]
        for i, c in enumerate(clients):
            await c.register(key, hostname=f"n{i}")
        until = time.monotonic() + seconds
        done = await asyncio.gather(*(_endpoints_loop(c, until) for c in clients))
        rows.append(("server: registered nodes' sealed requests (8 clients)", f"{sum(done) / seconds:,.0f} /s"))
        counts: dict[int, int] = {}
        requests = _flood_requests(clients[0].server_public_key or "", int(seconds * 2000))
        until = time.monotonic() + seconds
        flood = [asyncio.create_task(_flood(url, requests, until, counts)) for _ in range(8)]
        done = await asyncio.gather(*(_endpoints_loop(c, until) for c in clients))
        await asyncio.gather(*flood)
        rows.append((f"server: same, during a flood of minted keys (--register-rate {register_rate:g})",
                     f"{sum(done) / seconds:,.0f} /s for nodes; flood answered "
                     + ", ".join(f"{s}: {n / seconds:,.0f}/s" for s, n in sorted(counts.items()))))
        for c in clients:
            await c.close()
        server.terminate()
        server.wait(10)
        admin.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--register-rate", type=float, default=50.0,
                    help="the server's budget for unregistered machine keys (serve --register-rate)")
    args = ap.parse_args()
    rows = bench_guard(args.keys) + asyncio.run(bench_server(args.seconds, args.register_rate))
    print(f"control server under abuse (cpus: {os.cpu_count()})")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
