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
