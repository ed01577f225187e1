"""Scale benchmark (run by hand through bench/scale.sh): loopback only, every phase bounded.

In one run, the same load against
  A. three control replicas (`meshnode control serve --replica-id`) on one PostgreSQL (a throw-away
     server started like the test suite's, tests/pg.py), nodes spread across them, and
  B. one control server on SQLite:
registration rate; map streams (the real stream protocol, light readers) receiving their full maps;
a rename and a DNS record written through the store reaching every stream (p50 / p99 / last);
resident memory per server; and, for A, the time until a SIGKILLed replica's nodes are shown
offline through `meshnode control nodes ls --json` of the others.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
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

from control_bench import BIN, _get, rss_kib, settle, worker  # noqa: E402

from magicdns.records import parse_record  # noqa: E402
from meshnode.control.store import ControlStore  # noqa: E402
from tests.pg import PostgresServer  # noqa: E402


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(db: str, tmp: Path, name: str, replica: str | None) -> tuple[subprocess.Popen, str, str]:
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


def _one_setup(label: str, db: str, tmp: Path, replicas: int, args: argparse.Namespace,
               rows: list[tuple[str, str]]) -> None:
    key = subprocess.run([str(BIN / "meshnode"), "control", "authkey", "create", "--db", db, "--reusable",
                          "--user", "bench@example.com", "--create-user"], capture_output=True, text=True, check=True).stdout.strip()
    servers = [_serve(db, tmp, f"{label}-{i}", f"r{i}" if replicas > 1 else None) for i in range(replicas)]
    token = ""
    for _, _, tf in servers:
        if Path(tf).exists():
            token = Path(tf).read_text().strip()
    workers: list[mp.Process] = []
    try:
        ctx = mp.get_context("spawn")
        n_workers = max(args.workers, replicas)
        cmd = [ctx.Queue() for _ in range(n_workers)]
        res = ctx.Queue()
        per = [args.nodes // n_workers + (1 if i < args.nodes % n_workers else 0) for i in range(n_workers)]
        t0 = time.monotonic()
        for i in range(n_workers):
            url = servers[i % replicas][1]
            p = ctx.Process(target=worker, args=(i, url, key, per[i], args.concurrency,
                                                 time.monotonic() + args.deadline, cmd[i], res), daemon=True)
            p.start()
            workers.append(p)
        regs = _get(res, "registered", n_workers, args.deadline + 60)
        reg_time = time.monotonic() - t0
        registered, errors = sum(r[2] for r in regs), sum(r[3] for r in regs)
        rows += [(f"{label}: nodes registered", f"{registered} ({errors} errors)"),
                 (f"{label}: registration rate", f"{registered / reg_time:.0f} /s")]
        markers = ["renamedbench", "recordbench"]
        share = [args.streams // n_workers + (1 if i < args.streams % n_workers else 0) for i in range(n_workers)]
        t0 = time.monotonic()
        for i in range(n_workers):
            cmd[i].put(("streams", share[i], markers))
        connected = sum(r[2] for r in _get(res, "ready", n_workers, args.deadline + 60))
        rows.append((f"{label}: streams with full map", f"{connected} of {args.streams} in {time.monotonic() - t0:.1f} s"))
        if token:
            settle(servers[0][1], token, 120)
        store = ControlStore(db)
        for marker in markers:
            t_change = time.time()
            if marker == "renamedbench":
                store.rename_node("w0-7", marker)
            else:
                store.records.add(parse_record(marker, "TXT", "bench", 60, store.domain()))
            for i in range(n_workers):
                cmd[i].put(("collect", marker, 60.0))
            seen = [t for r in _get(res, "seen", n_workers, 90) for t in r[3]]
            if seen:
                lat = sorted(t - t_change for t in seen)
                rows.append((f"{label}: {marker[:-5]} reached streams (p50 / p99 / last)",
                             f"{len(seen)} of {connected}: {statistics.median(lat) * 1e3:.0f} /"
                             f" {lat[max(0, int(len(lat) * 0.99) - 1)] * 1e3:.0f} / {lat[-1] * 1e3:.0f} ms"))
        for i, (proc, _, _) in enumerate(servers):
            rss, hwm = rss_kib(proc.pid)
            rows.append((f"{label}: server {i} RSS / peak", f"{rss / 1024:.0f} / {hwm / 1024:.0f} MiB"))
        if replicas > 1:
            victim_ids = {r.id: r.online for r in store.list_replicas()}.get("r1", frozenset())
            servers[1][0].send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            while time.monotonic() - t_kill < 60:
                out = subprocess.run([str(BIN / "meshnode"), "control", "nodes", "ls", "--db", db, "--json"],
                                     capture_output=True, text=True).stdout
                online = {n["id"] for n in json.loads(out) if n.get("online")}
                if victim_ids and not (victim_ids & online):
                    break
                time.sleep(0.2)   # bounded poll of the CLI's view
            rows.append((f"{label}: a killed replica's {len(victim_ids)} nodes shown offline after",
                         f"{time.monotonic() - t_kill:.1f} s"))
        store.close()
        for i in range(n_workers):
            cmd[i].put(("stop",))
    finally:
        for p in workers:
            p.join(timeout=10)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--streams", type=int, default=3_000)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32, help="registrations in flight per worker")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds allowed per phase")
    args = ap.parse_args()
    if not (0 < args.nodes <= 20_000 and 0 < args.streams <= min(args.nodes, 10_000)):
        ap.error("--nodes 1-20000, --streams 1-min(nodes, 10000)")
    rows: list[tuple[str, str]] = []
    pg = PostgresServer.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _one_setup("pg x3", pg.fresh_database(), Path(tmp), 3, args, rows)
            _one_setup("sqlite x1", str(Path(tmp) / "control.db"), Path(tmp), 1, args, rows)
    finally:
        pg.stop()
    width = max(len(k) for k, _ in rows)
    print(f"scale benchmark ({args.nodes} nodes, {args.streams} streams, {os.cpu_count()} CPUs, loopback)")
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
