"""`meshnode serve` overhead on loopback (run by hand): `python bench/serve.py [--requests 3000]`.

Starts a local aiohttp web server and a local TCP sink, and a `ServeRunner` on 127.0.0.1 in front of
them (as the daemon runs it on the tailnet addresses), in this process's event loop. Reports, each
direct and through serve: HTTP requests/s and median latency (keep-alive client, --concurrency
requests in flight, small GETs), and TCP throughput of one --megabytes stream. Everything stays on
127.0.0.1; each run is bounded by --requests and --megabytes.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from meshnode.node.serve import Caller, Kind, ServeConfig, ServeEntry, ServeRunner  # noqa: E402


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def http_run(url: str, requests: int, concurrency: int) -> tuple[float, float]:
    """(requests per second, median latency in ms)."""
    latencies: list[float] = []
    queue = iter(range(requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def worker() -> None:
            for _ in queue:
                t = time.perf_counter()
                async with http.get(url) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - t)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return requests / elapsed, statistics.median(latencies) * 1000


async def tcp_run(port: int, megabytes: int) -> float:
    """MB/s of one stream of `megabytes` into a sink that answers with the byte count."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = b"\0" * (1 << 20)
    start = time.perf_counter()
    for _ in range(megabytes):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    count = int(await reader.read())
    elapsed = time.perf_counter() - start
    writer.close()
    assert count == megabytes << 20, count
    return megabytes / elapsed


async def main(args: argparse.Namespace) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("Tailscale-User-Login", "-"))
    app = web.Application()
    app.router.add_get("/", hello)
    backend = web.AppRunner(app, access_log=None)
    await backend.setup()
    http_port = free_port()
    await web.TCPSite(backend, "127.0.0.1", http_port).start()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        total = 0
        while data := await r.read(1 << 16):
            total += len(data)
        w.write(str(total).encode())
        await w.drain()
        w.close()
    tcp_sink = await asyncio.start_server(sink, "127.0.0.1", 0)
    sink_port = tcp_sink.sockets[0].getsockname()[1]

    runner = ServeRunner(lambda ip: Caller(ip, "bench.tailnet", "bench@example.com"))
    serve_http, serve_tcp = free_port(), free_port()
    cfg = ServeConfig().with_entry(ServeEntry(serve_http, Kind.HTTP, f"http://127.0.0.1:{http_port}"))
    cfg = cfg.with_entry(ServeEntry(serve_tcp, Kind.TCP, f"127.0.0.1:{sink_port}"))
    await runner.apply(cfg, ("127.0.0.1",))
    try:
        print(f"HTTP GET, {args.requests} requests, {args.concurrency} in flight")
        for label, port in (("direct", http_port), ("serve --http", serve_http)):
            rps, med = await http_run(f"http://127.0.0.1:{port}/", args.requests, args.concurrency)
            print(f"  {label:<13} {rps:8.0f} req/s   median {med:6.2f} ms")
        print(f"TCP, one stream of {args.megabytes} MB")
        for label, port in (("direct", sink_port), ("serve --tcp", serve_tcp)):
            print(f"  {label:<13} {await tcp_run(port, args.megabytes):8.0f} MB/s")
    finally:
        await runner.close()
        await backend.cleanup()
        tcp_sink.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--megabytes", type=int, default=200)
    asyncio.run(main(p.parse_args()))
