"""Tailnet Lock's chain kept in the control store, so that replicas share it.

Proves, on SQLite and on a real PostgreSQL: two control servers on one database (replicas), `lock
init` through a node on replica A is followed by a node streaming from replica B, a signature made on
A lets a node in everywhere, and `lock disable` sent to B turns the lock off on A; a write made from a
stale copy of the chain (another replica wrote since) is refused by the store, not forked. A SQLite
deployment whose chain was in `<db>.tka/` has it moved into the store on first start (the node's
chain head is unchanged), and `control migrate` carries it to PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import re
import sqlite3
from pathlib import Path

import pytest

from meshnode.control import migrate
from meshnode.control.lock import StoreChain, locked_out
from meshnode.control.server import ControlServer, ServerConfig
from meshnode.control.store import ControlStore, StaleChain
from meshnode.tka import AUM, AUMKind, ed25519_key
from meshnode.tka.nodelock import ControlChain
from meshnode.tka.store import FileStore
from tests.integration.test_tka_control import LockNode, _tlpub
from tests.support import async_wait_until
from tests.unit.tka_helpers import genesis, key, priv

FAST = ServerConfig(poll_interval=0.05, coalesce=0.005, keepalive=5.0)


def _config(db_spec: str, rid: str) -> ServerConfig:
    if db_spec.startswith("postgres"):
        return ServerConfig(poll_interval=0.05, coalesce=0.005, keepalive=5.0, replica_id=rid)
    return FAST


def test_replicas_share_the_chain(db_spec: str, tmp_path: Path) -> None:
    async def main() -> None:
        store_a, store_b = ControlStore(db_spec), ControlStore(db_spec)
        a_srv, b_srv = ControlServer(store_a, _config(db_spec, "a")), ControlServer(store_b, _config(db_spec, "b"))
        urls = [f"http://127.0.0.1:{await s.start('127.0.0.1', 0)}" for s in (a_srv, b_srv)]
        key_, _ = store_a.create_authkey("alice@example.com", reusable=True)
        nodes = {}
        try:
            for name, url in (("alpha", urls[0]), ("beta", urls[0]), ("gamma", urls[1]), ("delta", urls[1])):
                n = LockNode(url, tmp_path / name, name)
                await n.client.register(authkey=key_, hostname=name)
                n.start()
                nodes[name] = n
            a, b, c, d = (nodes[k] for k in ("alpha", "beta", "gamma", "delta"))
            await async_wait_until(lambda: all(len(n.peers()) == 3 for n in nodes.values()), timeout=10)
            # lock init through alpha on replica A, trusting alpha's and gamma's lock keys.
            out = await a.cmd("init", n=1, args=[_tlpub(a), _tlpub(c)])
            secret = re.findall(r"disablement-secret:[0-9A-Fa-f]+", out)[0]
            assert a_srv.tka.head is not None
            await async_wait_until(lambda: b_srv.tka.head == a_srv.tka.head, timeout=5)
            # gamma and delta stream from B: they follow the same chain, and delta (unsigned) is out.
            await async_wait_until(lambda: c.lock.node().head == d.lock.node().head == a_srv.tka.head, timeout=10)
            await async_wait_until(lambda: "delta" not in a.peers() and "delta" not in c.peers(), timeout=5)
            assert set(locked_out(ControlStore(db_spec))) >= {d.client.node_key_public}
            # gamma (on B, trusted) signs delta: in everywhere.
            await c.cmd("sign", target=d.client.node_key_public, rotation_key=None)
            await async_wait_until(lambda: "delta" in a.peers() and "delta" in b.peers(), timeout=5)
            # The disablement secret sent to B turns the lock off on A too.
            await d.cmd("disable", secret=secret)
            await async_wait_until(lambda: a_srv.tka.head is None and b_srv.tka.head is None, timeout=5)
            await async_wait_until(lambda: all(not n.lock.status()["enabled"] for n in nodes.values()), timeout=10)
        finally:
            for n in nodes.values():
                await n.stop()
            await a_srv.stop()
            await b_srv.stop()
    asyncio.run(asyncio.wait_for(main(), 90))


def test_a_stale_copy_cannot_fork_the_chain(db_spec: str) -> None:
    s1, s2 = ControlStore(db_spec), ControlStore(db_spec)
    one, two = ControlChain(StoreChain(s1)), ControlChain(StoreChain(s2))
    _, _, g1 = genesis(key(1), signer=priv(1))
    _, _, g2 = genesis(key(2), signer=priv(2))
    one.init(g1.serialized)
    with pytest.raises(StaleChain):     # two read the chain before one's init: refused, nothing written
        two.init(g2.serialized)
    assert [a.hash for a in StoreChain(ControlStore(db_spec)).heads()] == [g1.hash]
    # Read again, the second copy sees the lock is on.
    fresh = ControlChain(StoreChain(s2))
    assert fresh.head == one.head
    # An update through the fresh copy is seen by the first once it reads again.
    upd = priv(1).sign_aum(AUM(AUMKind.ADD_KEY, prev=g1.hash, key=ed25519_key(priv(3).public)))
    fresh.receive([base64.b64encode(upd.serialized).decode()], allow_known=False)
    first = StoreChain(s1)
    assert ControlChain(first).head == fresh.head == str(upd.hash)
    assert first.commit_time(upd.hash) > 0


def test_sqlite_chain_on_disk_moves_into_the_store_and_migrates(tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "control.db"
    ControlStore(db).close()
    # The layout before: schema 10, the chain in control.db.tka/ (a FileStore).
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE tka_aums")
    conn.execute("ALTER TABLE changes DROP COLUMN nodes")                    # and what _m12_resume added
    conn.execute("DELETE FROM control_meta WHERE key = 'tailnet_epoch'")
    conn.execute("UPDATE control_meta SET value = '10' WHERE key = 'control_schema'")
    conn.commit()
    conn.close()
    old = FileStore(str(db) + ".tka")
    authority, _, g = genesis(key(1), signer=priv(1), store=old)
    upd = priv(1).sign_aum(AUM(AUMKind.ADD_KEY, prev=g.hash, key=ed25519_key(priv(3).public)))
    authority = authority.inform(old, [upd])
    head = str(authority.head)

    store = ControlStore(db)
    assert store.schema_version() >= 11
    chain = StoreChain(store)
    assert ControlChain(chain).head == head and len(chain.all_hashes()) == 2
    assert ControlStore(db).tka_generation() == store.tka_generation()   # imported once, not on every open
    # `control migrate` to PostgreSQL carries the chain (compared in full by migrate itself).
    list(migrate.copy(str(db), pg_url))
    assert ControlChain(StoreChain(ControlStore(pg_url))).head == head


def test_an_unreadable_chain_on_disk_is_a_clear_error_not_a_lost_lock(tmp_path: Path) -> None:
    from meshnode.control.store import ControlStoreError
    db = tmp_path / "control.db"
    ControlStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE tka_aums")
    conn.execute("ALTER TABLE changes DROP COLUMN nodes")                    # and what _m12_resume added
    conn.execute("DELETE FROM control_meta WHERE key = 'tailnet_epoch'")
    conn.execute("UPDATE control_meta SET value = '10' WHERE key = 'control_schema'")
    conn.commit()
    conn.close()
    (tmp_path / "control.db.tka" / "aums").mkdir(parents=True)
    (tmp_path / "control.db.tka" / "aums" / "GARBAGE").write_bytes(b"not an AUM")
    with pytest.raises(ControlStoreError, match="Tailnet Lock chain in .*control.db.tka cannot be read"):
        ControlStore(db)
    assert sqlite3.connect(db).execute(
        "SELECT value FROM control_meta WHERE key = 'control_schema'").fetchone()[0] == "10"   # nothing half-applied
