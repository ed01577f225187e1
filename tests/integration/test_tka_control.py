"""Tailnet Lock over the real node protocol: a control server in-process on 127.0.0.1, three nodes
each with the daemon's `LockService` over its own state directory and a real `ControlClient`, and
the `meshnode lock` commands run as the daemon runs them for the LocalAPI.

Proves: `lock init` on one node reaches the control server and every node; a node no trusted key
signed is left out of every locked node's map (the control server still lists it); signing it lets
it in within a second; the control server refuses a forged signature, a replayed AUM and a chain over
the limits with messages that say so; a disablement secret turns the lock off on every node, and a
control server that claims the lock is off without the secret is not obeyed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from pathlib import Path

import pytest

from meshnode.control.client import ControlClient, ControlError, generate_private_key
from meshnode.control.lock import locked_out
from meshnode.control.protocol import decode_key
from meshnode.control.server import ControlServer, ServerConfig
from meshnode.control.store import ControlStore
from meshnode.netmap import NetMap
from meshnode.node.lock import LockService
from meshnode.node.state import encode_key
from meshnode.tka import AUM, AUMKind, LockPrivateKey, ed25519_key
from meshnode.tka.cli_format import format_public
from meshnode.tka.limits import MAX_KEYS
from meshnode.tka.nodesig import sign_direct
from meshnode.tka.signing import key_proof_message
from nacl.public import PrivateKey
from tests.support import async_wait_until

FAST = ServerConfig(poll_interval=0.05, coalesce=0.005, keepalive=5.0)


class LockNode:
    """The daemon's map path, without the data plane: stream maps, let LockService sync and filter,
    keep what would be applied."""

    def __init__(self, url: str, state: Path, name: str) -> None:
        state.mkdir()
        nk = PrivateKey.generate()
        (state / "node.key").write_text(encode_key(nk))
        self.name = name
        self.client = ControlClient(url, generate_private_key(), base64.b64encode(bytes(nk)).decode())
        self.lock = LockService(state)
        self.applied: NetMap | None = None
        self.task: asyncio.Task | None = None

    async def _apply(self, nm: NetMap) -> None:
        self.applied = nm

    def start(self) -> None:
        async def run() -> None:
            async for nm in self.client.stream_map():
                await self.lock.apply(nm, self.client, self._apply)
        self.task = asyncio.create_task(run())

    async def cmd(self, command: str, **params) -> str:
        ans = await self.lock.command(command, params, self.client, self._apply)
        if ans["error"]:
            raise RuntimeError(ans["error"])
        return ans["output"]

    def peers(self) -> set[str]:
        return {p.name for p in self.applied.peers} if self.applied else set()

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        await self.client.close()


@contextlib.asynccontextmanager
async def tailnet(tmp_path: Path):
    store = ControlStore(tmp_path / "control.db")
    server = ControlServer(store, FAST)
    port = await server.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    key, _ = ControlStore(tmp_path / "control.db").create_authkey("alice@example.com", reusable=True)
    nodes = {}
    for name in ("alpha", "beta", "gamma"):
        n = LockNode(url, tmp_path / name, name)
        await n.client.register(authkey=key, hostname=name)
        n.start()
        nodes[name] = n
    await async_wait_until(lambda: all(len(n.peers()) == 2 for n in nodes.values()), timeout=5)
    yield server, store, nodes, tmp_path
    for n in nodes.values():
        await n.stop()
    await server.stop()


def _tlpub(n: LockNode) -> str:
    return format_public(n.lock.dir.lock_key().public)


async def _init(nodes) -> str:
    a, b = nodes["alpha"], nodes["beta"]
    out = await a.cmd("init", n=2, args=[_tlpub(a), _tlpub(b)])
    secrets = re.findall(r"disablement-secret:[0-9A-Fa-f]+", out)
    assert len(secrets) == 2
    await a.cmd("sign", target=b.client.node_key_public, rotation_key=None)
    return secrets[0]


def run(coro_fn):
    def wrapper(tmp_path: Path) -> None:
        async def main() -> None:
            async with tailnet(tmp_path) as net:
                await coro_fn(*net)
        asyncio.run(asyncio.wait_for(main(), 60))
    wrapper.__name__ = coro_fn.__name__
    return wrapper


@run
async def test_lock_through_the_control_server(server, store, nodes, tmp) -> None:
    a, b, c = nodes["alpha"], nodes["beta"], nodes["gamma"]
    secret = await _init(nodes)
    # Every node follows the control server's chain; gamma (unsigned) is locked out on alpha and beta.
    await async_wait_until(lambda: a.lock.node().head == b.lock.node().head == c.lock.node().head
                           == server.tka.head is not None, timeout=5)
    await async_wait_until(lambda: a.peers() == {"beta"} and b.peers() == {"alpha"}, timeout=5)
    # The control server still puts gamma in the maps: it is the nodes that refuse it.
    assert {p.name for p in server.snapshot.nodes.values()} == {"alpha", "beta", "gamma"}
    assert [p["name"] for p in b.lock.status()["locked_out"]] == ["gamma"]
    assert "no-signature" in b.lock.status()["locked_out"][0]["reason"]
    assert set(locked_out(ControlStore(tmp / "control.db"))) == {c.client.node_key_public}
    st = await b.cmd("status", as_json=False)
    assert "gamma" in st and "LOCKED OUT" not in st  # beta itself is signed

    # Signing gamma on alpha lets it in everywhere within a second.
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await a.cmd("sign", target=c.client.node_key_public, rotation_key=None)
    await async_wait_until(lambda: a.peers() == {"beta", "gamma"} and b.peers() == {"alpha", "gamma"}, timeout=1)
    assert loop.time() - t0 < 1.0
    assert locked_out(ControlStore(tmp / "control.db")) == {}

    # A pre-signed auth key: a node joining with it signs its own node key with the credential,
    # and locked nodes admit it at once.
    plain, _ = ControlStore(tmp / "control.db").create_authkey("alice@example.com")
    wrapped = (await a.cmd("sign", target=plain, rotation_key=None)).strip()
    assert wrapped.startswith(plain + "--TL")
    await async_wait_until(lambda: server.tka.head == a.lock.node().head, timeout=5)
    d = LockNode(a.client.server_url, tmp / "delta", "delta")
    try:
        await d.client.register(authkey=wrapped, hostname="delta")
        await async_wait_until(lambda: "delta" in a.peers() and "delta" in b.peers(), timeout=2)
        # The same auth key with a signature that does not verify is refused before registering.
        e = LockNode(a.client.server_url, tmp / "epsilon", "epsilon")
        with pytest.raises(ControlError, match="pre-signed auth key is not valid|NodeKeyNotAuthorized"):
            await e.client.register(authkey=wrapped[:-8] + "AAAAAAAA", hostname="epsilon")
        await e.client.close()
    finally:
        await d.stop()

    # The control server refuses what does not verify, with the reason.
    stranger = LockPrivateKey.generate()
    forged = base64.b64encode(sign_direct(stranger, decode_key(c.client.node_key_public, "k")).serialize()).decode()
    with pytest.raises(ControlError, match="NodeKeyNotAuthorized: .* is not trusted"):
        await c.client.tka("sign", {"target": c.client.node_key_public, "signature": forged})
    # A node cannot claim another node's lock key (it would be signed by a `lock init` trusting it).
    with pytest.raises(ControlError, match="proof does not verify"):
        await c.client.tka("key", {"lock_key": _tlpub(a), "proof": base64.b64encode(b"\0" * 64).decode()})
    own = c.lock.dir.lock_key()
    with pytest.raises(ControlError, match="proof does not verify"):   # a proof for another node key
        await c.client.tka("key", {"lock_key": format_public(own.public), "proof": base64.b64encode(
            own.sign(key_proof_message(decode_key(a.client.node_key_public, "k")))).decode()})
    assert server.store.tka_lock_keys()[c.client.node_key_public] == format_public(own.public)  # its own stays
    genesis = (await c.client.tka("bootstrap", {}))["genesis"]
    with pytest.raises(ControlError, match="ReplayedAUM"):
        await c.client.tka("sync/send", {"aums": [genesis]})
    # A chain over Tailscale's key limit, signed by a trusted key: refused as a whole.
    me = a.lock.dir.lock_key()
    prev = AUM.parse(base64.b64decode(genesis)).hash
    head_aum = a.lock.node().authority.head
    prev = head_aum
    aums = []
    for i in range(MAX_KEYS):
        u = me.sign_aum(AUM(AUMKind.ADD_KEY, prev=prev, key=ed25519_key(bytes([i % 256, i // 256]) + bytes(30))))
        aums.append(base64.b64encode(u.serialized).decode())
        prev = u.hash
    before = server.tka.head
    with pytest.raises(ControlError, match="LimitExceeded"):
        await a.client.tka("sync/send", {"aums": aums})
    assert server.tka.head == before

    # A wrong disablement secret is refused; the right one turns the lock off on every node.
    with pytest.raises(ControlError, match="invalid disablement secret"):
        await c.client.tka("disable", {"secret": "00" * 32})
    await b.cmd("disable", secret=secret)
    await async_wait_until(lambda: server.tka.head is None, timeout=5)
    await async_wait_until(lambda: all(not n.lock.status()["enabled"] for n in nodes.values()), timeout=10)
    await async_wait_until(lambda: all(n.peers() == {"alpha", "beta", "gamma", "delta"} - {n.name}
                                       for n in nodes.values()), timeout=5)
    assert not (tmp / "alpha" / "tka" / "aums").exists() or not any((tmp / "alpha" / "tka" / "aums").iterdir())


@run
async def test_control_cannot_turn_the_lock_off_alone(server, store, nodes, tmp) -> None:
    a, b, c = nodes["alpha"], nodes["beta"], nodes["gamma"]
    await _init(nodes)
    await async_wait_until(lambda: b.peers() == {"alpha"}, timeout=5)
    # A compromised control server wipes its chain: the maps say "lock off", but no secret exists.
    server.tka.chain._store.clear()
    server.tka.chain._authority = None
    server.mark_dirty()
    await async_wait_until(lambda: b.lock.status()["last_refusal"] is not None, timeout=5)
    assert "no disablement secret" in b.lock.status()["last_refusal"]
    # Still enforcing: gamma stays out (and so does alpha, now that the map carries no signatures:
    # the lock fails closed).
    assert b.lock.status()["enabled"] and "gamma" not in b.peers()
