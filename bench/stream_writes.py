"""What writing one small frame to every open map stream costs the server's event loop (run by hand:
.venv/bin/python bench/stream_writes.py --streams 3400).

A policy or DNS change wakes every stream of a replica at once; each writes its own sealed delta of a
few hundred bytes. This opens N real HTTP streams on loopback (aiohttp server in this process, a
child process reading them all), wakes N stream tasks the way the server does (one event each), and
times until every frame was written: once through ControlServer._write's no-wait path (a frame that
fits under the send buffer's high-water mark) and once forced through the watched path (a task, a
timer and a deadline watch per frame, as every frame took before); and once the way the publisher
now writes them itself (`_write_now`: no task woken, one chunk straight to each transport). Wall
time and the server process's CPU time are printed; the child's reading is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import socket
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web  # noqa: E402

from meshnode.control import server as control_server  # noqa: E402
from meshnode.control.server import ControlServer, ServerConfig  # noqa: E402


def reader(port: int, n: int, ready: "multiprocessing.synchronize.Event") -> None:
    """Open n streams and read whatever comes until the parent goes away."""
    import selectors
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    ready.set()
    while True:
        for key, _ in sel.select(timeout=5):
            try:
                if not key.fileobj.recv(1 << 16):   # type: ignore[union-attr]
                    return
            except OSError:
                return


async def main_async(n: int, rounds: int) -> None:
    streams: list[tuple[web.Request, web.StreamResponse]] = []
    opened = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        streams.append((request, resp))
        if len(streams) == n:
            opened.set()
        await asyncio.Event().wait()
        return resp

    app = web.Application()
    app.router.add_post("/s", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    ready = multiprocessing.Event()
    child = multiprocessing.Process(target=reader, args=(port, n, ready), daemon=True)
    child.start()
    await asyncio.wait_for(opened.wait(), 120)
    fake = types.SimpleNamespace(config=ServerConfig(), stats={"frames": 0, "slow_streams_closed": 0},
                                 _framed=lambda: None)
    data = b"\0" * 300
    fits = control_server._fits
    try:
        for _ in range(rounds):
            c0, t0 = time.process_time(), time.perf_counter()
            for request, resp in streams:   # as ControlServer._write_now hands a frame over
                transport = control_server._chunk_sink(request, resp)
                assert transport is not None and fits(transport, len(data))
                transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"publisher's direct write: {n} frames written in {wall * 1e3:6.1f} ms wall, {cpu * 1e3:6.1f} ms CPU "
                  f"({cpu / n * 1e6:5.1f} us a stream)", flush=True)
            await asyncio.sleep(0.3)   # let the child drain the kernel buffers
        for label, forced in (("no-wait path", None), ("watched path", lambda *_: False)) * rounds:
            control_server._fits = forced or fits   # type: ignore[assignment]
            wakes = [asyncio.Event() for _ in streams]
            done = 0
            all_done = asyncio.Event()

            async def stream(i: int) -> None:
                nonlocal done
                await wakes[i].wait()
                request, resp = streams[i]
                await ControlServer._write(fake, request, resp, data)   # type: ignore[arg-type]
                done += 1
                if done == n:
                    all_done.set()
            tasks = [asyncio.create_task(stream(i)) for i in range(n)]
            await asyncio.sleep(0.2)   # every task parked on its event, as the server's are
            c0, t0 = time.process_time(), time.perf_counter()
            for w in wakes:
                w.set()
            await asyncio.wait_for(all_done.wait(), 60)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"{label}: {n} frames written in {wall * 1e3:6.1f} ms wall, {cpu * 1e3:6.1f} ms CPU "
                  f"({cpu / n * 1e6:5.1f} us a stream)", flush=True)
            await asyncio.gather(*tasks)
            await asyncio.sleep(0.3)   # let the child drain the kernel buffers
    finally:
        control_server._fits = fits   # type: ignore[assignment]
        child.kill()
        await runner.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=3400)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * args.streams + 100)), hard))
    asyncio.run(main_async(args.streams, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
