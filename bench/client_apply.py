"""What one map frame costs a node (run by hand: .venv/bin/python bench/client_apply.py).

Frames come from the real map builder for node 1 of --nodes, sealed by the server's channel as
`_send` does; the node's side is what `ControlClient._stream_once` runs per frame
(`MapAssembler.apply_sealed`: unseal, JSON, apply, the NetMap it yields). Kinds: the first full map,
a filter-only delta (a policy change: a port added), a DNS-only delta (a record added) and a one-peer
patch (an endpoint change), each applied --repeat times. Default shape: the one `bench/scale.sh`
uses, `autogroup:self` over users of --group devices, so each node sees --group - 1 peers;
`--policy all-to-all` gives every node every other node as a peer.

Per kind it prints the whole per-frame cost and its parts (unseal, json.loads, apply). `--profile
KIND` prints where that kind's frames spend their time (cProfile). A delta must cost the node in
proportion to what it carries, not to the size of its map.

`--streams N` also measures the whole of a frame on the node as `bench/scale.sh`'s simulated nodes
pay it: N real `ControlClient.stream_map` streams in this process (uvloop, one shared aiohttp
session, as scale_bench's workers) read the same sealed frames from a plain aiohttp server in a
child process on loopback (a chunked response, one write per frame, as the control server's
`_send`); per kind, this process's CPU seconds from the push until every stream yielded its map,
divided by N. With --profile, that phase is cProfiled instead of the in-process loop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import dataclasses
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nacl.public import PrivateKey  # noqa: E402

import scale_fanout  # noqa: E402
from magicdns.records import Record  # noqa: E402
from meshnode.control.client import MapAssembler  # noqa: E402
from meshnode.control.mapbuilder import StreamState, build_snapshot, next_frame  # noqa: E402
from meshnode.control.protocol import Channel  # noqa: E402
from meshnode.control.store import DnsSettings  # noqa: E402
from meshnode.netmap import gc_paused  # noqa: E402
from meshnode.policy import parse_policy  # noqa: E402


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def daemon_costs(asm: MapAssembler, next_map, n: int) -> tuple[float | None, float]:  # noqa: ANN001
    """The daemon's pure per-map steps (node/daemon.py `_apply_map`: the resolver's view, the map it
    saves, the tunnel's WireGuard peers, the flow-log peer table), as it does them now (builders
    that reuse what an unchanged peer gave; peers set only when the peers tuple changed) and from
    scratch (what it did for every map before). Each round applies the frame again first, so a
    patch's peer is a new object every round, as on the wire."""
    import base64

    from meshnode.netmap import netmap_to_view
    from meshnode.node.flowlog import peer_table
    from meshnode.node.tunnel import peer_configs
    try:
        from meshnode.netmap import JsonBuilder, ViewBuilder
    except ImportError:   # an older tree: only "from scratch"
        JsonBuilder = ViewBuilder = None  # noqa: N806
    try:
        from meshnode.node.tunnel import PeerConfigBuilder
    except ImportError:
        PeerConfigBuilder = None  # noqa: N806

    def key(p):  # noqa: ANN001, ANN202
        return base64.b64decode(p.node_key)

    nm = next_map()
    now = scratch = 0.0
    if ViewBuilder is not None:
        views, saved, last = ViewBuilder(), JsonBuilder(), None
        configs = PeerConfigBuilder().build if PeerConfigBuilder is not None else peer_configs
        views.build(nm)
        saved.build(nm)
        configs(nm)
        last = nm.peers
        for _ in range(n):
            nm = next_map()
            t0 = time.perf_counter()
            views.build(nm)
            saved.build(nm)
            if nm.peers is not last:
                configs(nm)
                peer_table(nm.peers, key)
                last = nm.peers
            now += time.perf_counter() - t0
    for _ in range(n):
        nm = next_map()
        t0 = time.perf_counter()
        netmap_to_view(nm)
        nm.to_json()
        peer_configs(nm)
        peer_table(nm.peers, key)
        scratch += time.perf_counter() - t0
    return (now / n * 1e6 if ViewBuilder is not None else None), scratch / n * 1e6


def serve(frames_path: str) -> None:
    """The child process: every POST /machine/map gets the full frame, then each frame pushed
    (GET /push/KIND) as it comes. Prints its port on stdout."""
    from aiohttp import web

    from meshnode.control.protocol import frame

    frames = {k: frame(bytes.fromhex(v)) for k, v in json.loads(Path(frames_path).read_text()).items()}
    streams: list = []

    async def map_(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        await resp.write(frames["full"])
        done = asyncio.get_running_loop().create_future()
        streams.append((resp, done))
        await done
        return resp

    async def push(request: web.Request) -> web.Response:
        data = frames[request.match_info["kind"]]
        for resp, _ in streams:
            await resp.write(data)
        return web.Response(text=str(len(streams)))

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/machine/map", map_)
        app.router.add_get("/push/{kind}", push)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


def streams_phase(n: int, frames: dict[str, bytes], server_pub: str, machine_priv: str,
                  profile: str | None) -> None:
    """N real map streams in this process; per kind, this process's CPU per frame (see the docstring)."""
    import tempfile

    import aiohttp
    import uvloop

    from meshnode.control.client import ControlClient, generate_private_key

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({k: v.hex() for k, v in frames.items()}, f)
    child = subprocess.Popen([sys.executable, __file__, "--serve", f.name], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())  # type: ignore[union-attr]
        uvloop.install()
        asyncio.run(_streams(n, port, frames, server_pub, machine_priv, profile, aiohttp, ControlClient,
                             generate_private_key))
    finally:
        child.kill()
        child.wait()
        os.unlink(f.name)


async def _streams(n, port, frames, server_pub, machine_priv, profile, aiohttp, ControlClient,  # noqa: ANN001
                   generate_private_key) -> None:  # noqa: ANN001
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    counts = [0] * n
    clients = []
    for _ in range(n):
        c = ControlClient(f"http://127.0.0.1:{port}", machine_priv, generate_private_key(),
                          server_public_key=server_pub)
        c._session = session   # one connection pool, as scale_bench's workers
        clients.append(c)

    async def follow(k: int, c) -> None:  # noqa: ANN001
        async for _ in c.stream_map(reconnect=False):
            counts[k] += 1

    async def until(total: int, limit: float) -> None:
        end = time.monotonic() + limit
        while sum(counts) < total and time.monotonic() < end:
            await asyncio.sleep(0.002)   # bounded wait for a condition (a benchmark, not a test)
        if sum(counts) < total:
            raise SystemExit(f"only {sum(counts)} of {total} maps arrived")

    tasks = [asyncio.create_task(follow(k, c)) for k, c in enumerate(clients)]
    await until(n, 60)
    print(f"{n} streams (uvloop, aiohttp), this process's CPU per frame, from the push until all {n} maps:")
    want = n
    for name in ("filter-only delta", "dns-only delta", "one-peer patch"):
        kind = name.split()[0].split("-")[0]
        prof = cProfile.Profile() if profile and profile in name else None
        rounds, cpu, wall = 5, 0.0, 0.0
        for _ in range(rounds):
            want += n
            c0, w0 = time.process_time(), time.perf_counter()
            if prof is not None:
                prof.enable()
            async with session.get(f"http://127.0.0.1:{port}/push/{kind}") as resp:
                await resp.read()
            await until(want, 30)
            if prof is not None:
                prof.disable()
            cpu += time.process_time() - c0
            wall += time.perf_counter() - w0
        print(f"  {name:18} {cpu / rounds / n * 1e6:7.1f} us a frame ({wall / rounds * 1e3:.0f} ms for {n} streams)")
        if prof is not None:
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in clients:
        c._session = None
        await c.close()
    await session.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--group", type=int, default=100, help="devices per user (autogroup:self)")
    ap.add_argument("--policy", choices=sorted(scale_fanout.POLICIES), default="autogroup:self")
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--profile", metavar="KIND", help="cProfile the frames of the kind whose name has KIND")
    ap.add_argument("--streams", type=int, default=0, help="also measure N real map streams over loopback")
    ap.add_argument("--serve", help=argparse.SUPPRESS)   # the child process of --streams
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    base, port_added, _ = scale_fanout.POLICIES[args.policy]
    # Real 32-byte node keys (scale_fanout's are placeholders), so the tunnel's peers are all usable.
    rows = {i: dataclasses.replace(scale_fanout.node(i, args.group), node_key=_b64(i.to_bytes(32, "big")))
            for i in range(1, args.nodes + 1)}
    server_key, machine_key = PrivateKey.generate(), PrivateKey.generate()
    server = Channel(_b64(bytes(server_key)), _b64(bytes(machine_key.public_key)))
    node = Channel(_b64(bytes(machine_key)), _b64(bytes(server_key.public_key)))

    def build(prev, text, version, records=()):  # noqa: ANN001, ANN202
        with gc_paused(args.nodes):
            return build_snapshot(prev, version=version, domain="tailnet", nodes=list(rows.values()),
                                  online=dict.fromkeys(rows, 1), now=100.0, policy_text=text,
                                  policy=parse_policy(text), dns=DnsSettings(), records=records,
                                  tailnet_version=version, epoch="bench")[0]

    def seal(text: str) -> bytes:
        return server.seal_bytes(text.encode())

    # The per-frame function the stream's read loop calls (older trees: its inline equivalent).
    apply_sealed = getattr(MapAssembler, "apply_sealed", None)

    def per_frame(asm: MapAssembler, sealed: bytes):  # noqa: ANN202
        if apply_sealed is not None:
            return apply_sealed(asm, node, sealed)
        with gc_paused(len(sealed) // 256):
            return asm.apply(json.loads(node.open_bytes(sealed)))

    snap = build(None, base, 1)
    state, asm = StreamState(1, patches=True, sets=True), MapAssembler()
    full = seal(next_frame(snap, state))
    t0 = time.perf_counter()
    nm = per_frame(asm, full)
    print(f"{args.policy}, {args.nodes} nodes, node 1 sees {len(nm.peers)} peers; full map "
          f"{len(full)} bytes: {(time.perf_counter() - t0) * 1e3:.2f} ms")
    records = (Record("wiki.tailnet", "A", "100.64.0.9"),)
    snap2 = build(snap, port_added, 2)
    filter_only = seal(next_frame(snap2, state))
    snap3 = build(snap2, port_added, 3, records)
    dns_only = seal(next_frame(snap3, state))
    rows[5] = dataclasses.replace(rows[5], endpoints=("198.51.100.1:1",))
    patch = seal(next_frame(build(snap3, port_added, 4, records), state))
    daemon_rows: list = []
    print(f"{'kind':18} {'carries':14} {'bytes':>6} {'total':>8} {'unseal':>8} {'json':>8} {'apply':>8}  (us a frame)")
    for name, sealed in (("filter-only delta", filter_only), ("dns-only delta", dns_only),
                         ("one-peer patch", patch)):
        msg = json.loads(node.open_bytes(sealed))
        carried = sorted(set(msg) - {"type", "version", "resume"})
        n = args.repeat
        prof = cProfile.Profile() if args.profile and args.profile in name and not args.streams else None
        # Each part alone, then the whole (the whole is what a node pays; parts may not add up exactly).
        t0 = time.perf_counter()
        for _ in range(n):
            plain = node.open_bytes(sealed)
        t1 = time.perf_counter()
        for _ in range(n):
            json.loads(plain)
        t2 = time.perf_counter()
        for _ in range(n):
            asm.apply(json.loads(plain))
        t3 = time.perf_counter()
        if prof is not None:
            prof.enable()
        t4 = time.perf_counter()
        for _ in range(n):
            per_frame(asm, sealed)
        t5 = time.perf_counter()
        if prof is not None:
            prof.disable()
        us = 1e6 / n
        print(f"{name:18} {','.join(carried):14} {len(sealed):6} {(t5 - t4) * us:8.1f} {(t1 - t0) * us:8.1f} "
              f"{(t2 - t1) * us:8.1f} {(t3 - t2 - (t2 - t1)) * us:8.1f}")
        if prof is not None and not args.streams:
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        daemon_rows.append((name, daemon_costs(asm, lambda: per_frame(asm, sealed), max(50, n // 10))))
    print("the node daemon's own work on each map (pure parts of Daemon._apply_map), us a frame:")
    print(f"  {'kind':18} {'as now':>8} {'from scratch':>13}   (view + saved JSON + WireGuard peers + flow table, as with flow logs on)")
    for name, (now_us, scratch_us) in daemon_rows:
        shown = f"{now_us:8.1f}" if now_us is not None else f"{'n/a':>8}"   # n/a: a tree without the builders
        print(f"  {name:18} {shown} {scratch_us:13.1f}")
    if args.streams:
        streams_phase(args.streams, {"full": full, "filter": filter_only, "dns": dns_only, "one": patch},
                      _b64(bytes(server_key.public_key)), _b64(bytes(machine_key)), args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
