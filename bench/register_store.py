"""Registration through the control store alone (run by hand): W processes, each its own connection
as a replica has, register N new nodes each against one database, all at once; prints registrations
per second for a throw-away PostgreSQL (tests/pg.py) and for a SQLite file. No HTTP, no crypto, no
map building: what is left is the store's statements and the one writer lock they serialise on.

    .venv/bin/python bench/register_store.py [--workers 3] [--nodes 300]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnode.control.store import ControlStore, Grant, Registration  # noqa: E402
from tests.pg import PostgresServer  # noqa: E402


def _allow(user, tags, reg, existing):  # noqa: ANN001, ANN202
    return Grant((), (), False)


def _worker(db: str, key: str, me: int, count: int, go, done) -> None:  # noqa: ANN001
    store = ControlStore(db)
    go.wait(60)
    for i in range(count):
        store.register(Registration(f"bench-m{me}-{i}", f"nk{me}-{i}", f"host{me}-{i}", "linux", key), _allow)
    done.put(me)
    store.close()


def run(db: str, workers: int, nodes: int) -> float:
    store = ControlStore(db)
    key, _ = store.create_authkey("bench", reusable=True)
    ctx = mp.get_context("spawn")
    go, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(db, key, w, nodes, go, done)) for w in range(workers)]
    for p in procs:
        p.start()
    time.sleep(2)   # let every worker open its connection (bench only: not a test)
    start = time.perf_counter()
    go.set()
    for _ in procs:
        done.get(timeout=600)
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join(30)
    total = len(store.list_nodes())
    assert total == workers * nodes, total
    assert store.verify_audit().ok
    store.close()
    return total / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=300, help="new nodes per worker")
    args = ap.parse_args()
    if not (0 < args.workers <= 16 and 0 < args.nodes <= 5000):
        ap.error("--workers 1-16, --nodes 1-5000")
    pg = PostgresServer.start()
    try:
        pg_rate = run(pg.fresh_database(), args.workers, args.nodes)
    finally:
        pg.stop()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_rate = run(str(Path(tmp) / "control.db"), args.workers, args.nodes)
    print(f"store registrations, {args.workers} workers x {args.nodes} new nodes:"
          f" PostgreSQL {pg_rate:.0f} /s, SQLite {sqlite_rate:.0f} /s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
