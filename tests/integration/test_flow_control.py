"""Connection logs at a real control server on 127.0.0.1: the setting reaches nodes in their maps,
uploads are acknowledged, a re-sent batch is stored once, records survive a server restart, bad
records are refused, and `control flows ls` filters by node, peer, time and drops."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshnode.control.client import ControlClient, ControlError, generate_private_key
from meshnode.control.server import ControlServer, ServerConfig
from meshnode.control.store import ControlStore
from tests.support import async_wait_until

FAST = ServerConfig(poll_interval=0.05, coalesce=0.005, keepalive=5.0)
MESHNODE = [sys.executable, "-m", "meshnode.cli"]


def rec(**kw):
    base = {"start": time.time() - 5, "end": time.time(), "proto": 6, "src": "100.64.0.1", "dst": "100.64.0.2",
            "sport": 40000, "dport": 80, "peer": "beta", "kind": "tunnel", "tx_packets": 3, "tx_bytes": 300,
            "rx_packets": 2, "rx_bytes": 120}
    base.update(kw)
    return base


def test_flows_are_acked_stored_once_and_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "control.db"

    async def main() -> None:
        store = ControlStore(db)
        key, _ = store.create_authkey("alice@example.com", reusable=True)
        server = ControlServer(store, FAST)
        port = await server.start("127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        a = ControlClient(url, generate_private_key(), generate_private_key())
        await a.register(authkey=key, hostname="alpha")
        assert (await a.fetch_map()).flow_logs is False
        ControlStore(db).set_flow_logs(True)  # the admin CLI's path: another connection
        await async_wait_until(lambda: server.snapshot is not None and server.snapshot.flow_logs, timeout=2)
        assert (await a.fetch_map()).flow_logs is True

        body = {"boot_id": "b1", "lost": 0, "batches": [{"seq": 1, "records": [rec()]},
                                                        {"seq": 2, "records": [rec(dport=8001, dropped=True,
                                                                                    rule="not_allowed", tx_packets=0,
                                                                                    tx_bytes=0)]}]}
        assert (await a.upload_flows(body))["ack"] == 2
        assert (await a.upload_flows(body))["ack"] == 2  # the ack was lost: re-sent, stored once
        with pytest.raises(ControlError, match="tx_bytes must be a non-negative integer"):
            await a.upload_flows({"boot_id": "b1", "batches": [{"seq": 3, "records": [rec(tx_bytes=-1)]}]})
        with pytest.raises(ControlError, match="kind must be one of"):
            await a.upload_flows({"boot_id": "b1", "batches": [{"seq": 3, "records": [rec(kind="x")]}]})
        await a.close()
        await server.stop()
        store.close()

        # A restart: what was acknowledged is there, and the node's next batch goes on from it.
        store = ControlStore(db)
        server = ControlServer(store, FAST)
        port = await server.start("127.0.0.1", 0)
        b = ControlClient(f"http://127.0.0.1:{port}", a.machine_key_private, a.node_key_private)
        assert (await b.upload_flows({"boot_id": "b1", "batches": [{"seq": 2, "records": [rec()]},
                                                                   {"seq": 3, "records": [rec(dport=443)]}]}))["ack"] == 3
        await b.close()
        await server.stop()
        store.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    rows = ControlStore(db).flows()
    assert sorted(r["dport"] for r in rows) == [80, 443, 8001]

    def ls(*args: str) -> list[dict]:
        out = subprocess.run([*MESHNODE, "control", "flows", "ls", "--db", str(db), "--json", *args],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    assert [r["dport"] for r in ls("--dropped")] == [8001] and ls("--dropped")[0]["rule"] == "not_allowed"
    assert len(ls("--node", "alpha", "--peer", "beta")) == 3
    assert ls("--node", "nobody") == [] and ls("--since", str(time.time() + 60)) == []
    text = subprocess.run([*MESHNODE, "control", "flows", "ls", "--db", str(db)], capture_output=True, text=True,
                          check=True).stdout
    assert "100.64.0.2:8001" in text and "not_allowed" in text
    # Retention: records older than the setting go.
    s = ControlStore(db)
    s.set_flow_retention(1)
    assert s.prune_flows(time.time() + 2 * 86400) == 3 and s.flows() == []


class _TunnelHooks:
    """The one Tunnel method FlowLogger calls (the data plane itself is the e2e tests' business):
    it hands the counter over, and the test then counts packets into it as the device threads do."""

    def __init__(self) -> None:
        self.counter = None

    async def set_flow_counter(self, counter) -> None:
        self.counter = counter


def _udp4(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x" * 20) -> bytes:
    import ipaddress
    import struct

    total = 28 + len(payload)
    return (struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0, ipaddress.ip_address(src).packed,
                        ipaddress.ip_address(dst).packed)
            + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def test_unacknowledged_windows_survive_a_daemon_exit_and_count_once(tmp_path: Path) -> None:
    """Windows counted while control is unreachable are saved when the daemon exits (FlowLogger.cancel,
    what Daemon.close calls), uploaded by the next run, and a saved file replayed after its
    acknowledgement was lost (a crash between the ack and the save) is stored only once."""
    import base64
    import shutil

    from meshnode.node.flowlog import FlowLogger

    db = tmp_path / "control.db"
    pending = tmp_path / "state" / "flows-pending.json"
    pending.parent.mkdir()

    async def main() -> None:
        store = ControlStore(db)
        key, _ = store.create_authkey("alice@example.com", reusable=True)
        store.set_flow_logs(True)
        server = ControlServer(store, FAST)
        port = await server.start("127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        a = ControlClient(url, generate_private_key(), generate_private_key())
        b = ControlClient(url, generate_private_key(), generate_private_key())
        await a.register(authkey=key, hostname="alpha")
        await b.register(authkey=key, hostname="bravo")
        await async_wait_until(lambda: server.snapshot is not None and len(server.snapshot.rows) == 2, timeout=5)
        nm = await a.fetch_map()
        assert nm.flow_logs and len(nm.peers) == 1
        peer = base64.b64decode(nm.peers[0].node_key)
        me, them = nm.self_node.addresses[0], nm.peers[0].addresses[0]

        # Run 1: control unreachable (no client), 7 packets counted, then the daemon exits.
        tun = _TunnelHooks()
        run1 = FlowLogger(tun, lambda: None, window=3600, state_file=pending)
        await run1.on_map(nm)
        for _ in range(7):
            tun.counter.outbound(_udp4(me, them, 40000, 53), peer)
        run1.cancel()
        assert pending.exists(), "the unacknowledged window was not saved at exit"
        saved = pending.read_text()
        assert json.loads(saved)["windows"]

        # Run 2: the saved windows go up; once acknowledged the file is gone.
        tun2 = _TunnelHooks()
        run2 = FlowLogger(tun2, lambda: a, window=3600, state_file=pending)
        await run2.on_map(nm)
        await async_wait_until(lambda: not pending.exists(), timeout=5)
        assert sum(r["tx_packets"] for r in ControlStore(db).flows()) == 7
        run2.cancel()

        # Run 3: a crash lost the acknowledgement's save: the same windows are re-sent, stored once.
        pending.write_text(saved)
        run3 = FlowLogger(_TunnelHooks(), lambda: a, window=3600, state_file=pending)
        await run3.on_map(nm)
        await async_wait_until(lambda: not pending.exists(), timeout=5)
        run3.cancel()
        # A damaged file is ignored with a warning: the daemon still starts.
        pending.write_text("{not json")
        run4 = FlowLogger(_TunnelHooks(), lambda: a, window=3600, state_file=pending)
        assert not run4.queue.windows
        shutil.rmtree(pending.parent)
        await a.close()
        await b.close()
        await server.stop()
        store.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    rows = ControlStore(db).flows()
    assert sum(r["tx_packets"] for r in rows) == 7, rows
