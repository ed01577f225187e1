"""Node-key rotation under Tailnet Lock over the real node protocol (control server in-process on
127.0.0.1, nodes with the daemon's LockService and a real ControlClient, as in test_tka_control.py).

Proves: a node signed with its own lock key as rotation (wrapping) key re-registers a new node key
with a rotation signature it makes itself (what the daemon does on `up --force-reauth`), the control
server keeps it, and locked peers keep admitting the node under its new key without a `lock sign`,
twice in a row (a chain of rotations); a rotation signature made with a key that is not the one the
original signature names is refused by the control server and, if a control server mapped it anyway,
by every locked node; a node whose signature names another rotation key does not try (and says why).
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Callable

import pytest
from nacl.public import PrivateKey

from meshnode.control.client import ControlClient, ControlError
from meshnode.netmap import MapNode
from meshnode.node.state import encode_key
from meshnode.tka import LockPrivateKey
from meshnode.tka.nodesig import NodeKeySignature, SigKind, sign_rotation
from tests.integration.test_tka_control import LockNode, _tlpub, tailnet
from tests.support import async_wait_until


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def peer_of(n: LockNode, name: str) -> MapNode | None:
    return next((p for p in (n.applied.peers if n.applied else ()) if p.name == name), None)


async def rotate(n: LockNode, state: Path, signer: Callable[[bytes], str | None] | None = None) -> str:
    """What the daemon's `up --force-reauth` does for the node key: a new one, re-registered (an
    active node needs no auth key) with the rotation signature LockService makes."""
    url, machine, pin = n.client.server_url, n.client.machine_key_private, n.client.server_public_key
    await n.stop()
    nk = PrivateKey.generate()
    (state / "node.key").write_text(encode_key(nk))
    n.client = ControlClient(url, machine, b64(bytes(nk)), server_public_key=pin)
    if signer is None:
        key_signature = await n.lock.rotation_signature(n.client.node_key_public)
    else:
        key_signature = signer(bytes(nk.public_key))
    await n.client.register(hostname=n.name, key_signature=key_signature)
    n.start()
    return n.client.node_key_public


def run(coro_fn):
    def wrapper(tmp_path: Path) -> None:
        async def main() -> None:
            async with tailnet(tmp_path) as (server, store, nodes, tmp):
                await coro_fn(server, nodes, tmp)
        asyncio.run(asyncio.wait_for(main(), 60))
    wrapper.__name__ = coro_fn.__name__
    return wrapper


@run
async def test_a_rotated_node_key_stays_trusted_without_lock_sign(server, nodes, tmp) -> None:
    a, b, c = nodes["alpha"], nodes["beta"], nodes["gamma"]
    # alpha's map must carry beta's lock key: `lock init` signs beta with it as rotation key.
    await async_wait_until(lambda: peer_of(a, "beta") is not None and peer_of(a, "beta").lock_key == _tlpub(b),
                           timeout=5, what="beta's lock key in alpha's map")
    out = await a.cmd("init", n=1, args=[_tlpub(a), _tlpub(b)])
    assert "Signed the node keys of: beta" in out
    await async_wait_until(lambda: b.lock.dir.own_signature() is not None and a.peers() == {"beta"}
                           and b.peers() == {"alpha"}, timeout=5, what="lock on, beta signed")
    first = NodeKeySignature.parse(b.lock.dir.own_signature())
    assert first.kind == SigKind.DIRECT and first.wrapping_pubkey == b.lock.dir.lock_key().public

    # beta rotates its node key twice; alpha keeps it each time, under the new key, with no `lock sign`.
    old_key = b.client.node_key_public
    for round_ in (1, 2):
        new_key = await rotate(b, tmp / "beta")
        await async_wait_until(lambda: (p := peer_of(a, "beta")) is not None and p.node_key == new_key,
                               timeout=5, what=f"beta's new key in alpha's map (rotation {round_})")
        assert "beta" in a.peers() and [p["name"] for p in a.lock.status()["locked_out"]] == ["gamma"]
        sig = NodeKeySignature.parse(base64.b64decode(peer_of(a, "beta").key_signature))
        assert sig.kind == SigKind.ROTATION and len(sig.prev_node_keys()) == round_
        assert sig.prev_node_keys()[-1] == base64.b64decode(old_key)
        await async_wait_until(lambda: b.lock.dir.own_signature() == sig.serialize(), timeout=5,
                               what="beta keeping its rotation signature")
    assert b.peers() == {"alpha"}   # and beta, signed, still admits alpha
    # alpha (the signer) rotates too: two rotated nodes, each chain rooted in its own lock key, are
    # not mistaken for clones of one another (Tailscale's rotation tracker groups by that key).
    a_key = await rotate(a, tmp / "alpha")
    await async_wait_until(lambda: (p := peer_of(b, "alpha")) is not None and p.node_key == a_key,
                           timeout=5, what="alpha's new key in beta's map")
    await async_wait_until(lambda: a.peers() == {"beta"}, timeout=5, what="alpha back with beta")
    assert b.peers() == {"alpha"} and [p["name"] for p in b.lock.status()["locked_out"]] == ["gamma"]

    # A rotation signed by a key other than the one beta's signature names: the control server
    # refuses to register it, and a locked node refuses it even when a map carries it.
    stranger = LockPrivateKey.generate()
    nested = NodeKeySignature.parse(b.lock.dir.own_signature())
    with pytest.raises(ControlError, match="NodeKeyNotAuthorized: invalid signature"):
        await rotate(b, tmp / "beta", lambda nk: b64(sign_rotation(stranger, nk, nested).serialize()))
    evil_key = PrivateKey.generate().public_key.encode()
    forged = sign_rotation(stranger, evil_key, nested).serialize()
    fake = MapNode(99, "mallory", "mallory.tailnet", "u", ("100.64.0.99",), b64(evil_key), key_signature=b64(forged))
    result = a.lock.node().filter_peers([fake], node_key=lambda p: p.node_key, signature=lambda p: p.key_signature)
    assert result.admitted == () and "invalid signature" in result.locked_out[0].detail


@run
async def test_a_node_signed_with_another_rotation_key_does_not_rotate(server, nodes, tmp) -> None:
    a, b, c = nodes["alpha"], nodes["beta"], nodes["gamma"]
    await a.cmd("init", n=1, args=[_tlpub(a)])
    # gamma signed naming alpha's lock key as its rotation key: only alpha could re-sign it.
    await a.cmd("sign", target=c.client.node_key_public, rotation_key=_tlpub(a))
    await async_wait_until(lambda: c.lock.dir.own_signature() is not None and "gamma" in a.peers(), timeout=5)
    assert await c.lock.rotation_signature(b64(PrivateKey.generate().public_key.encode())) is None
    assert "not this node's lock key" in c.lock.status()["last_refusal"]
    # Without a rotation signature the new key registers, and locked nodes leave it out until signed.
    new_key = await rotate(c, tmp / "gamma", lambda nk: None)
    await async_wait_until(lambda: any(p["node_key"] == new_key for p in a.lock.status()["locked_out"]),
                           timeout=5, what="gamma's new key locked out on alpha")
    assert "gamma" not in a.peers()
