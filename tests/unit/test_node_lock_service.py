"""The daemon's LockService without a control server: filtering by the chain on disk, and what
happens when the lock files are damaged (fail closed when a chain was there)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

from meshnode.netmap import MapNode, NetMap
from meshnode.node.lock import LockService
from meshnode.node.lockcli import run_in_daemon
from meshnode.tka.cli_format import format_public
from meshnode.tka.statedir import LockDir


def peer(i: int, sig: str = "") -> MapNode:
    return MapNode(i, f"n{i}", f"n{i}.tailnet", "u", (f"100.64.0.{i}",),
                   base64.b64encode(bytes([i]) * 32).decode(), key_signature=sig)


def apply(svc: LockService, nm: NetMap) -> NetMap:
    got: list[NetMap] = []

    async def keep(m: NetMap) -> None:
        got.append(m)
    asyncio.run(svc.apply(nm, None, keep))
    return got[0]


def test_filters_by_the_chain_and_fails_closed_when_it_is_damaged(tmp_path: Path) -> None:
    me = format_public(LockDir(tmp_path).lock_key().public)
    assert run_in_daemon(tmp_path, "init", {"n": 1, "args": [me]}, {})[1] is None
    sig = run_in_daemon(tmp_path, "sign", {"target": "nodekey:" + (bytes([2]) * 32).hex()}, {})[0].strip()
    nm = NetMap(1, "tailnet", peer(1), (peer(2, sig), peer(3)))
    svc = LockService(tmp_path)
    assert [p.name for p in apply(svc, nm).peers] == ["n2"]
    assert [p["name"] for p in svc.status()["locked_out"]] == ["n3"]

    # A damaged AUM file: nothing is trusted any more, so nobody is admitted, and status says why.
    f = next((tmp_path / "tka" / "aums").iterdir())
    f.write_bytes(b"\xff" + f.read_bytes()[1:])
    svc = LockService(tmp_path)
    assert apply(svc, nm).peers == ()
    assert "cannot run" in svc.status()["error"] and "move" in svc.status()["error"]

    # No chain at all (the lock was never on here) and an unreadable lock key: nothing to enforce.
    other = tmp_path / "other"
    (other / "tka").mkdir(parents=True)
    (other / "tka" / "lock.key").write_text("garbage")
    svc = LockService(other)
    assert len(apply(svc, nm).peers) == 2 and svc.status()["error"]
