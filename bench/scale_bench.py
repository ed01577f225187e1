"""Scale benchmark (run by hand through bench/scale.sh): loopback only, every phase bounded.

In one run, the same load against
  A. three control replicas (`meshnode control serve --replica-id`) on one PostgreSQL (a throw-away
     server started like the test suite's, tests/pg.py), nodes spread across them, each node given
     all three URLs (its own replica first), and
  B. one control server on SQLite.
Every simulated node is the real client (`ControlClient.stream_map`: MapAssembler, NetMap), with no
tunnel. The policy is `autogroup:self` over --groups users, so each node sees the other devices of
its user (a whole-tailnet-visible map of 10,000 peers in each of 10,000 simulated clients would need
~100 GB on the client side alone). Measured:
registration rate; every stream's first map; a policy change and a DNS record reaching every node,
and a rename reaching every node that sees the renamed one (p50 / p99 / last); endpoint churn of
--churn nodes/s for --churn-seconds with each server's CPU; resident memory per server; and for A,
after SIGKILL of one replica: the time until each of its nodes has a map from another replica,
and how many of them resumed (a delta) rather than starting over (a full map).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from control_bench import BIN, rss_kib, settle  # noqa: E402

from magicdns.records import parse_record  # noqa: E402
from meshnode.control.access import set_policy  # noqa: E402
from meshnode.control.store import ControlStore  # noqa: E402
from tests.pg import PostgresServer  # noqa: E402

POLICY = json.dumps({"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]})
POLICY2 = json.dumps({"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
                               {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:4242"]}]})


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve(db: str, tmp: Path, name: str, replica: str | None) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    token_file = tmp / f"{name}.token"
    args = [str(BIN / "meshnode"), "control", "serve", "--listen", f"127.0.0.1:{port}", "--db", db,
            "--register-rate", "100000", "--admin-token-file", str(token_file)]
    if replica:
        args += ["--replica-id", replica]
    proc = subprocess.Popen(args, stderr=open(tmp / f"{name}.log", "w"))
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > end or proc.poll() is not None:
                raise SystemExit(f"{name} did not start: " + (tmp / f"{name}.log").read_text())
            time.sleep(0.05)   # startup poll of a subprocess; bounded above
    return proc, url, token_file


# -- worker processes: real clients ---------------------------------------------------------------

def node_urls(servers: list[str], i: int) -> str:
    """Node i's login servers: its own replica first (nodes spread evenly), then the others, the
    order of the two alternating from node to node, so a dead replica's nodes split between the
    survivors instead of all landing on the next one in a fixed list."""
    n = len(servers)
    own = i % n
    rest = [servers[(own + j) % n] for j in range(1, n)]
    if (i // n) % 2:
        rest.reverse()
    return ",".join([servers[own]] + rest)


def worker(idx: int, servers: list[str], keys: list[str], first: int, count: int, conc: int, opening: int,
           deadline: float, cmd: mp.Queue, res: mp.Queue, client_gc: str = "normal") -> None:
    import aiohttp

    from meshnode.control.client import ControlClient, generate_private_key

    # The client's reconnect messages (one per stream and attempt) are counted, not printed: at
    # 10,000 nodes a reconnect storm would write megabytes to the terminal from the very processes
    # that are measured, and the counts say more (what failed, how often).
    import collections
    import logging
    failures: collections.Counter[str] = collections.Counter()

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.DEBUG and record.args:
                failures[str(record.args[0])[:90]] += 1
    client_log = logging.getLogger("meshnode.control.client")
    client_log.propagate = False
    client_log.setLevel(logging.DEBUG)
    client_log.addHandler(Count())

    async def main() -> None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                        timeout=aiohttp.ClientTimeout(total=None, connect=15, sock_read=None))
        probe = ControlClient(",".join(servers), generate_private_key(), generate_private_key())
        server_key = await probe.fetch_server_key()
        await probe.close()
        clients: list[ControlClient] = []
        sem = asyncio.Semaphore(conc)
        errors = 0

        async def register(i: int) -> None:
            nonlocal errors
            c = ControlClient(node_urls(servers, i), generate_private_key(), generate_private_key(),
                              server_public_key=server_key)
            c._session = session   # one connection pool per process, not one per simulated node
            async with sem:
                if time.monotonic() > deadline:
                    errors += 1
                    return
                try:
                    await c.register(keys[i % len(keys)], hostname=f"n{i}", os="linux",
                                     endpoints=[f"192.0.2.{i % 250 + 1}:41641"])
                    clients.append(c)
                except Exception:
                    errors += 1
        t0 = time.time()   # wall clock: the coordinator compares the workers' spans
        await asyncio.gather(*(register(i) for i in range(first, first + count)))
        res.put(("registered", idx, len(clients), errors, t0, time.time()))

        maps: list[int] = [0] * len(clients)
        last_map: list[float] = [0.0] * len(clients)
        latest: list = [None] * len(clients)
        seen: dict[str, dict[int, float]] = {}
        wanted: dict[str, object] = {}
        expect: dict[str, list[int]] = {}

        checking = [0.0]   # seconds this process spent in the bench's own marker tests
        # Seconds in the cyclic GC (every generation): a process holding 2,500 simulated nodes' maps
        # has a heap no real node has, and its full collections walk all of it.
        import gc
        collecting = [0.0, 0.0]   # total, start of the collection under way

        def gc_timer(phase: str, _info: dict) -> None:
            if phase == "start":
                collecting[1] = time.perf_counter()
            else:
                collecting[0] += time.perf_counter() - collecting[1]
        gc.callbacks.append(gc_timer)

        def check(k: int, nm) -> None:  # noqa: ANN001
            now = time.time()
            maps[k] += 1
            last_map[k] = now
            latest[k] = nm
            for marker, test in wanted.items():
                if k not in seen[marker] and test(nm):  # type: ignore[operator]
                    seen[marker][k] = now
            checking[0] += time.time() - now

        # At most --opening streams per worker wait for their first map at once: a tailnet whose
        # nodes all connect in the same second is a reconnect storm, measured elsewhere (resume).
        gate = asyncio.Semaphore(opening)

        async def follow(k: int, c: ControlClient) -> None:
            held = True
            await gate.acquire()
            try:
                async for nm in c.stream_map(max_backoff=2.0):
                    if held:
                        gate.release()
                        held = False
                    check(k, nm)
            finally:
                if held:
                    gate.release()
        tasks = [asyncio.create_task(follow(k, c)) for k, c in enumerate(clients)]
        t0 = time.time()
        while sum(1 for m in maps if m) < len(clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)   # bounded wait for a condition (a benchmark, not a test)
        if client_gc == "off":
            # The cyclic GC stays off while changes are measured: a full collection here walks 2,500
            # simulated nodes' maps (a heap no real node, holding one map, has); in one 10,000-node
            # run it took 1.2-1.3 CPU-s per client process during a policy change, more than the
            # frames. Reference counting still frees what a frame replaces; the collections the GC
            # would have made run between changes, outside the measured windows ("collect" below).
            gc.collect()
            gc.disable()
        if client_gc == "freeze":
            # The maps held so far leave the collector's view: each full collection otherwise walks
            # every simulated node's map (2,500 of them in one process), which a real node, holding
            # one, never does (--client-gc freeze; in one 10,000-node run the clients still spent
            # 0.4-1.1 s in the GC during the policy change, so it is not the default).
            gc.collect()
            gc.freeze()
        res.put(("ready", idx, sum(1 for m in maps if m), t0, time.time()))
        loop = asyncio.get_running_loop()
        while True:
            msg = await loop.run_in_executor(None, cmd.get)
            if msg[0] == "watch":
                _, marker, kind, arg, old = msg
                seen[marker] = {}
                checking[0] = 0.0
                collecting[0] = 0.0
                if kind == "peer":
                    wanted[marker] = lambda nm, a=arg: any(p.name == a for p in nm.peers)
                elif kind == "filter":
                    # The rules' port strings, not repr() of the whole filter: that repr (every
                    # rule's source and destination lists) cost 0.14 ms a frame, about 45% of the
                    # client processes' CPU while a policy change reached 10,000 nodes.
                    wanted[marker] = lambda nm, a=arg: any(a in str(r.get("ports", "")) for r in nm.packet_filter)
                else:
                    wanted[marker] = lambda nm, a=arg: any(r.name.startswith(a) for r in nm.dns.records)
                # Nodes that should see the change: all, or those with the renamed node as a peer.
                expect[marker] = [k for k, nm in enumerate(latest)
                                  if kind != "peer" or (nm is not None and any(p.name == old for p in nm.peers))]
                res.put(("watching", idx, len(expect[marker])))
            elif msg[0] == "collect":
                _, marker, timeout = msg
                want = expect[marker]
                end = time.monotonic() + timeout
                while time.monotonic() < end and not all(k in seen[marker] for k in want):
                    await asyncio.sleep(0.01)
                # This process's CPU so far goes with the answer: what the coordinator reads from /proc
                # after every worker has answered would include the collection below (a second or
                # more at 2,500 simulated nodes a process), which is not the change's. The next
                # change's window opens after its "watch", which this process takes after collecting.
                res.put(("seen", idx, marker, [seen[marker][k] for k in want if k in seen[marker]], len(want),
                         checking[0], collecting[0], time.process_time()))
                if client_gc == "freeze":   # the maps this change left: out of the collector's view too
                    gc.freeze()
                elif client_gc == "off":   # this change's cyclic garbage, after its window
                    gc.collect()
                wanted.pop(marker, None)
            elif msg[0] == "churn":
                _, rate, seconds = msg
                t0 = time.monotonic()
                failed = [0]
                took: list[float] = []

                async def report(c: ControlClient) -> None:
                    t = time.monotonic()
                    try:
                        await c.update_endpoints([f"198.51.100.{random.randint(1, 250)}:{random.randint(1024, 65000)}"])
                        took.append(time.monotonic() - t)
                    except Exception:
                        failed[0] += 1
                # Reports go out at the rate whatever the server's latency (open loop), as roaming
                # nodes would send them.
                pending, n = [], 0
                while time.monotonic() - t0 < seconds:
                    pending.append(asyncio.create_task(report(random.choice(clients))))
                    n += 1
                    await asyncio.sleep(max(0.0, t0 + n / rate - time.monotonic()))
                await asyncio.wait(pending, timeout=30) if pending else None
                res.put(("churned", idx, n, took, failed[0]))
            elif msg[0] == "moved":
                _, victim, timeout, t_kill = msg
                moving = [k for k, c in enumerate(clients) if c.server_url == victim]
                before = {k: clients[k].resumes for k in moving}
                failures.clear()
                end = time.monotonic() + timeout
                while time.monotonic() < end and not all(
                        clients[k].server_url != victim and last_map[k] > t_kill for k in moving):
                    await asyncio.sleep(0.02)
                done = [last_map[k] - t_kill for k in moving if last_map[k] > t_kill]
                resumed = sum(clients[k].resumes - before[k] for k in moving)
                res.put(("moved", idx, len(moving), done, resumed, dict(failures)))
            else:
                break
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()

    try:   # the simulated nodes' side must stay cheap, so the figures measure the servers
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())


# -- coordinator ------------------------------------------------------------------------------------

def _refusals(servers: list, token: str) -> dict[str, int]:
    """Why the live servers sent full maps to nodes that asked to resume (their /metrics)."""
    out: dict[str, int] = {}
    for proc, url, _ in servers:
        if proc.poll() is not None:
            continue
        req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read().decode()
        except OSError:   # an overloaded survivor: say so rather than report "none"
            out["(a survivor's /metrics did not answer)"] = out.get("(a survivor's /metrics did not answer)", 0) + 1
            continue
        for line in text.splitlines():
            if line.startswith("meshnode_control_resume_refused_total{"):
                why = line.split('reason="', 1)[1].rsplit('"', 1)[0]
                out[why] = out.get(why, 0) + int(line.rsplit(" ", 1)[1])
    return out


class Inbox:
    """The workers' answers, taken by kind. A message of another kind than the one awaited is kept
    for later, never dropped: a fast worker's "ready" may arrive while a slow one has not yet said
    "registered" (on SQLite it did, and the run then waited forever for a "ready" it had thrown away:
    the SQLite side's "no first map")."""

    def __init__(self, queue: mp.Queue) -> None:
        self.queue = queue
        self.early: list[tuple] = []

    def get(self, kind: str, n: int, timeout: float) -> list[tuple]:
        out = [m for m in self.early if m[0] == kind][:n]
        for m in out:
            self.early.remove(m)
        end = time.monotonic() + timeout
        while len(out) < n:
            msg = self.queue.get(timeout=max(0.1, end - time.monotonic()))
            (out if msg[0] == kind else self.early).append(msg)
        return out


def _phase_stamps(url: str, token: str) -> list[dict[str, float]]:
    """A server's last snapshots' `meshnode_control_publish_timestamp_seconds` (when it noticed the
    change, built and published the snapshot, wrote its last frame), oldest first."""
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return []
    out: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("meshnode_control_publish_timestamp_seconds{"):
            version = int(line.split('{version="', 1)[1].split('"', 1)[0])
            phase = line.split('phase="', 1)[1].split('"', 1)[0]
            stamps = out.setdefault(version, {})
            stamps[phase] = float(line.rsplit(" ", 1)[1])
            if 'store_version="' in line:
                stamps["store_version"] = int(line.split('store_version="', 1)[1].split('"', 1)[0])
    return [out[v] for v in sorted(out)]


_COUNTERS = ("meshnode_control_frames_total", "meshnode_control_frames_direct_total",
             "meshnode_control_fanout_cpu_seconds_total", 'meshnode_control_gc_seconds_total{generation="2"}')


def _counters(url: str, token: str) -> dict[str, float]:
    """A server's frame counters and the CPU its publisher spent writing frames itself (/metrics)."""
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in _COUNTERS:
            out[name] = float(value)
    return out


def _per_frame(label: str, what: str, servers: list, token: str, before: list[dict[str, float]],
               cpu: list[float]) -> tuple[str, str]:
    """Each server's CPU per frame over the change: all of its CPU (build, frames, everything else
    in the window) divided by the frames it sent, and the publisher's own fan-out CPU per frame it
    wrote itself (the rest went through the streams' tasks)."""
    parts = []
    for i, ((proc, url, _), b) in enumerate(zip(servers, before)):
        a = _counters(url, token) if proc.poll() is None else {}
        if not a or not b:
            continue
        frames = a.get(_COUNTERS[0], 0) - b.get(_COUNTERS[0], 0)
        direct = a.get(_COUNTERS[1], 0) - b.get(_COUNTERS[1], 0)
        fan = a.get(_COUNTERS[2], 0) - b.get(_COUNTERS[2], 0)
        full_gc = a.get(_COUNTERS[3], 0) - b.get(_COUNTERS[3], 0)
        parts.append(f"s{i} {frames:.0f} frames ({direct:.0f} direct), {cpu[i] / max(frames, 1) * 1e3:.3f} ms CPU a frame"
                     f" all in, fan-out {fan / max(direct, 1) * 1e6:.0f} us a direct frame, full GC {full_gc:.2f} s")
    return (f"{label}: {what}: server CPU per frame", "; ".join(parts))


def _phases(label: str, what: str, servers: list, token: str, workers: list, cpu0: list[float], got: list[tuple],
            t_change: float, t_stored: float, t_last: float,
            before: list[dict[str, float]] | None = None, v_change: int = 0) -> list[tuple[str, str]]:
    """Where a change's time went: storing it (the admin's transaction, measured here), each server
    noticing it, building its snapshot, writing its last frame, and the client processes'
    CPU over the whole change (ms after the change began; CPU in seconds over that window)."""
    wall = max(1e-3, time.time() - t_change)
    n = len(servers)
    cpu = [cpu_seconds(p.pid) - c for (p, _, _), c in zip(servers, cpu0)]
    by_worker = {r[1]: r[7] for r in got}   # each client process's CPU when it answered (worker above)
    cpu += [by_worker.get(i, cpu_seconds(p.pid)) - c for i, (p, c) in enumerate(zip(workers, cpu0[n:]))]
    ms = lambda t: f"{(t - t_change) * 1e3:.0f}" if t >= t_change else "-"   # noqa: E731
    parts = []
    for i, (proc, url, _) in enumerate(servers):
        after = [st for st in (_phase_stamps(url, token) if proc.poll() is None else [])
                 if st["build_start"] >= t_change]
        # Not a snapshot some other write started before the change committed (presence, a heartbeat):
        # the first that stands for the change's store version, where the server says it.
        with_change = [st for st in after if st.get("store_version", v_change) >= v_change]
        after = with_change or after
        if after:   # the first snapshot built after the change began (later ones: counted)
            st = after[0]
            parts.append(f"s{i} noticed {ms(st['noticed'])}, built {ms(st['build_start'])}-{ms(st['published'])},"
                         f" last frame {ms(st['last_frame'])}" + (f" (+{len(after) - 1} later)" if len(after) > 1 else ""))
    return [(f"{label}: {what}: phases (ms after the change)",
             f"stored {ms(t_stored)}; " + "; ".join(parts) + f"; last node saw it {ms(t_last)}"),
            (f"{label}: {what}: CPU s over {wall:.1f} s: servers; client processes; their marker tests; their GC",
             " / ".join(f"{c:.2f}" for c in cpu[:n]) + "; " + " / ".join(f"{c:.2f}" for c in cpu[n:])
             + "; " + " / ".join(f"{r[5]:.2f}" for r in got) + "; " + " / ".join(f"{r[6]:.2f}" for r in got))] + (
        [_per_frame(label, what, servers, token, before, cpu)] if before else [])


def _pct(lat: list[float], q: float) -> float:
    return lat[min(len(lat) - 1, max(0, int(len(lat) * q + 0.999) - 1))]


def _latency_row(label: str, what: str, seen: list[float], expected: int, t_change: float) -> tuple[str, str]:
    if not seen:
        return (f"{label}: {what}", f"0 of {expected}")
    lat = sorted(t - t_change for t in seen)
    return (f"{label}: {what} (p50 / p99 / last)",
            f"{len(seen)} of {expected}: {statistics.median(lat) * 1e3:.0f} / {_pct(lat, 0.99) * 1e3:.0f}"
            f" / {lat[-1] * 1e3:.0f} ms")


class Rows(list):
    """The table, also printed row by row as measured (a run cut short still says what it saw)."""

    def append(self, row: tuple[str, str]) -> None:  # type: ignore[override]
        print(f"  {row[0]}: {row[1]}", file=sys.stderr, flush=True)
        super().append(row)

    def __iadd__(self, rows):  # noqa: ANN001, ANN204
        for row in rows:
            self.append(row)
        return self


def _one_setup(label: str, db: str, tmp: Path, replicas: int, args: argparse.Namespace,
               rows: list[tuple[str, str]]) -> None:
    admin = ControlStore(db)
    keys = [admin.create_authkey(f"user{g}@example.com", reusable=True)[0] for g in range(args.groups)]
    set_policy(admin, POLICY)
    admin.close()   # not held open while the server runs (a SQLite server must own its file)
    servers = [_serve(db, tmp, f"{label}-{i}", f"r{i}" if replicas > 1 else None) for i in range(replicas)]
    token = next((Path(tf).read_text().strip() for _, _, tf in servers if Path(tf).exists()), "")
    workers: list[mp.Process] = []
    try:
        ctx = mp.get_context("spawn")
        n_workers = max(args.workers, replicas)
        cmd = [ctx.Queue() for _ in range(n_workers)]
        res = ctx.Queue()
        inbox = Inbox(res)
        per = [args.nodes // n_workers + (1 if i < args.nodes % n_workers else 0) for i in range(n_workers)]
        first = 0
        for i in range(n_workers):
            p = ctx.Process(target=worker, args=(i, [u for _, u, _ in servers], keys, first, per[i], args.concurrency, args.opening,
                                                 time.monotonic() + args.deadline, cmd[i], res,
                                                 args.client_gc), daemon=True)
            first += per[i]
            p.start()
            workers.append(p)
        regs = inbox.get("registered", n_workers, args.deadline + 60)
        # From the first registration sent to the last answered (not the workers' start-up).
        reg_time = max(r[5] for r in regs) - min(r[4] for r in regs)
        registered, errors = sum(r[2] for r in regs), sum(r[3] for r in regs)
        rows += [(f"{label}: nodes registered", f"{registered} ({errors} errors)"),
                 (f"{label}: registration rate", f"{registered / reg_time:.0f} /s")]
        ready = inbox.get("ready", n_workers, args.deadline + 60)
        rows.append((f"{label}: streams with their first map",
                     f"{sum(r[2] for r in ready)} of {registered} in"
                     f" {max(r[4] for r in ready) - min(r[3] for r in ready):.1f} s"))
        if token:
            try:
                settle(servers[0][1], token, 120)
            except OSError as exc:   # an overloaded server: go on, and say so
                rows.append((f"{label}: settling", f"gave up: {exc}"))
        admin = ControlStore(db)
        victim_name = f"n{min(7, args.nodes - 1)}"
        changes = [("policy", "filter", "4242", None, lambda: set_policy(admin, POLICY2)),
                   ("record", "dns", "recordbench", None, lambda: admin.records.add(
                       parse_record("recordbench", "TXT", "bench", 60, admin.domain()))),
                   ("rename", "peer", "renamedbench", victim_name, lambda: admin.rename_node(victim_name, "renamedbench"))]
        for what, kind, arg, old, do in changes:
            for i in range(n_workers):
                cmd[i].put(("watch", what, kind, arg, old))
            inbox.get("watching", n_workers, 60)
            spy = client_spy = None
            if args.pyspy and what == "policy":   # sample server 0 through the policy change
                spy = subprocess.Popen([args.pyspy, "record", "-d", "6", "-r", "250", "-f", "raw", "-o",
                                        f"{args.pyspy_out}.{label.split()[0]}.txt", "-p", str(servers[0][0].pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if args.pyspy_client:   # and client process 0 (the simulated nodes' side of a frame)
                    client_spy = subprocess.Popen(
                        [args.pyspy, "record", "-d", "6", "-r", "250", "-f", "raw", "-o",
                         f"{args.pyspy_out}.{label.split()[0]}.client.txt", "-p", str(workers[0].pid)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)   # py-spy attaching (a benchmark's coordinator, not a test)
            before = [_counters(url, token) for _, url, _ in servers]
            cpu0 = [cpu_seconds(p.pid) for p, _, _ in servers] + [cpu_seconds(p.pid) for p in workers]
            t_change = time.time()
            do()
            t_stored = time.time()
            v_change = admin.version()
            for i in range(n_workers):
                cmd[i].put(("collect", what, 30.0))
            got = inbox.get("seen", n_workers, 90)
            seen = [t for r in got for t in r[3]]
            expected = sum(r[4] for r in got)
            rows.append(_latency_row(label, f"{what} reached nodes", seen, expected, t_change))
            for sampler in (spy, client_spy):
                if sampler is not None:
                    sampler.wait(timeout=30)
            if seen:
                rows += _phases(label, what, servers, token, workers, cpu0, got, t_change, t_stored, max(seen), before, v_change)
        # Endpoint churn: --churn reports a second, spread over the workers, for --churn-seconds.
        # CPU over the sending window: the servers' and the simulated nodes' own (if the clients
        # were near a core each, the figures would measure them, not the servers).
        cpu0 = [cpu_seconds(p.pid) for p, _, _ in servers]
        wcpu0 = [cpu_seconds(p.pid) for p in workers]
        t_cpu = time.monotonic()
        for i in range(n_workers):
            cmd[i].put(("churn", args.churn / n_workers, args.churn_seconds))
        time.sleep(args.churn_seconds)   # the window itself (a benchmark's coordinator, not a test)
        wall = time.monotonic() - t_cpu
        cpu = [(cpu_seconds(p.pid) - c0) / wall * 100 for (p, _, _), c0 in zip(servers, cpu0)]
        wcpu = [(cpu_seconds(p.pid) - c0) / wall * 100 for p, c0 in zip(workers, wcpu0)]
        churned = inbox.get("churned", n_workers, args.churn_seconds + 60)
        took = sorted(t for r in churned for t in r[3])
        sent = sum(r[2] for r in churned)
        rows.append((f"{label}: endpoint churn: sent, answered, answer time p50 / p99",
                     f"{sent / args.churn_seconds:.0f} nodes/s for {args.churn_seconds:.0f} s, {len(took)} answered"
                     f" ({sum(r[4] for r in churned)} failed), "
                     + (f"{statistics.median(took) * 1e3:.0f} / {_pct(took, 0.99) * 1e3:.0f} ms" if took else "-")))
        rows.append((f"{label}: CPU during churn: each server; all client processes together",
                     " / ".join(f"{c:.0f}%" for c in cpu) + f"; {sum(wcpu):.0f}% ({len(workers)} processes)"))
        for i, (proc, _, _) in enumerate(servers):
            rss, hwm = rss_kib(proc.pid)
            rows.append((f"{label}: server {i} RSS / peak", f"{rss / 1024:.0f} / {hwm / 1024:.0f} MiB"))
        if replicas > 1:
            victim = servers[1]
            victim[0].send_signal(signal.SIGKILL)
            t_kill = time.time()
            for i in range(n_workers):
                cmd[i].put(("moved", victim[1], args.resume_wait, t_kill))
            moved = inbox.get("moved", n_workers, args.resume_wait + 60)
            n_moving = sum(r[2] for r in moved)
            done = sorted(t for r in moved for t in r[3])
            resumed = sum(r[4] for r in moved)
            if done:
                rows.append((f"{label}: killed replica's nodes with a map from another (p50 / p99 / last)",
                             f"{len(done)} of {n_moving}: {statistics.median(done) * 1e3:.0f} /"
                             f" {_pct(done, 0.99) * 1e3:.0f} / {done[-1] * 1e3:.0f} ms; {resumed} resumed,"
                             f" {len(done) - resumed} full maps"))
            failed: dict[str, int] = {}
            for r in moved:
                for why, n in r[5].items():
                    failed[why] = failed.get(why, 0) + n
            rows.append((f"{label}: failed stream attempts after the kill (all nodes)",
                         "; ".join(f"{n}x {why}" for why, n in sorted(failed.items(), key=lambda x: -x[1])[:4])
                         or "none"))
            rows.append((f"{label}: resume tokens refused by the survivors",
                         "; ".join(f"{why} {n}" for why, n in sorted(_refusals(servers, token).items())) or "none"))
        for i in range(n_workers):
            cmd[i].put(("stop",))
    finally:
        for p in workers:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
        for proc, _, _ in servers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        admin.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--groups", type=int, default=100, help="users; each node sees its user's other devices")
    ap.add_argument("--workers", type=int, default=4, help="client processes")
    ap.add_argument("--concurrency", type=int, default=32, help="registrations in flight per worker")
    ap.add_argument("--opening", type=int, default=200, help="streams awaiting their first map, per worker")
    ap.add_argument("--churn", type=float, default=100.0, help="endpoint reports a second")
    ap.add_argument("--churn-seconds", type=float, default=20.0)
    ap.add_argument("--resume-wait", type=float, default=60.0,
                    help="seconds the killed replica's nodes are given to get a map from another")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds allowed per phase")
    ap.add_argument("--only", choices=("pg", "sqlite"), help="run one of the two setups")
    ap.add_argument("--pyspy", help="py-spy binary: sample server 0 for 6 s through the policy change")
    ap.add_argument("--client-gc", choices=("off", "freeze", "normal"), default="off",
                    help="off (default): the client processes keep the cyclic GC off while changes are measured"
                         " and collect between them (a process of 2,500 simulated nodes has a heap no real node"
                         " has); freeze: they move the maps they hold out of the GC's view after the first maps"
                         " and after each change (one run at 10,000 nodes: not clearly cheaper); normal: as any"
                         " process")
    ap.add_argument("--pyspy-client", action="store_true",
                    help="with --pyspy, also sample client process 0 (PREFIX.pg.client.txt / .sqlite.client.txt)")
    ap.add_argument("--pyspy-out", default="/tmp/scale-pyspy", help="its raw output: PREFIX.pg.txt / .sqlite.txt")
    args = ap.parse_args()
    if not (0 < args.nodes <= 20_000 and 0 < args.groups <= args.nodes):
        ap.error("--nodes 1-20000, --groups 1-nodes")
    rows: list[tuple[str, str]] = Rows()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "sqlite":
            pg = PostgresServer.start()
            try:
                _one_setup("pg x3", pg.fresh_database(), Path(tmp), 3, args, rows)
            finally:
                pg.stop()
        if args.only != "pg":
            _one_setup("sqlite x1", str(Path(tmp) / "control.db"), Path(tmp), 1, args, rows)
    width = max(len(k) for k, _ in rows)
    print(f"scale benchmark ({args.nodes} nodes in {args.groups} users, {os.cpu_count()} CPUs, loopback,"
          f" load average {os.getloadavg()[0]:.1f})")
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
