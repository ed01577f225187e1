"""The node and control-server state machines, driven together without any network: a tailnet's
lock from `init` to `disable`, with a control server that tries to cheat."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import pytest

from meshnode.tka import (AUM, AUMKind, Authority, MemoryStore, NodeKeyNotAuthorized, State, StateError,
                          UnknownKey, disablement_kdf)

from meshnode.tka.nodelock import ControlChain, NodeLock
from meshnode.tka.nodesig import sign_direct
from meshnode.tka.enforce import LockoutReason

from .tka_helpers import key, node_key, priv

SECRET = b"s" * 32


def wire(obj):
    return json.loads(json.dumps(obj))  # everything crosses as JSON


@dataclass(frozen=True)
class Peer:
    name: str
    node_key: str
    key_signature: str | None


def sync(node: NodeLock, control: ControlChain) -> None:
    if node.authority is None:
        node.bootstrap(control.bootstrap_aum())
    if node.needs_sync(control.head):
        back = node.apply(wire(control.answer(wire(node.offer()))))
        if back:
            control.receive(wire(back))


@pytest.fixture()
def tailnet():
    control = ControlChain(MemoryStore())
    b = NodeLock(MemoryStore(), priv(2))
    c = NodeLock(MemoryStore(), priv(3))
    # `lock init` on a: a and b are signers.
    state = State(disablement_values=(disablement_kdf(SECRET),), keys=(key(1), key(2)), state_id1=1, state_id2=2)
    store_a = MemoryStore()
    _, genesis = Authority.create(store_a, state, priv(1))
    a = NodeLock(store_a, priv(1))
    control.init(genesis.serialized)
    for n in (b, c):
        sync(n, control)
    return control, a, b, c, store_a


def test_nodes_converge_through_control(tailnet) -> None:
    control, a, b, c, store_a = tailnet
    assert a.head == b.head == c.head == control.head
    # a adds a key; its update reaches control through sync, then b and c.
    a.modify(add=[key(4)])
    with pytest.raises(UnknownKey):
        c.modify(add=[key(5)])  # c's lock key is not a signer
    sync(a, control)
    assert control.head == a.head
    for n in (b, c):
        sync(n, control)
        assert n.head == a.head and n.authority.key_trusted(key(4).key_id)
    st = b.status()
    assert st.enabled and {k.key for k in st.trusted_keys if k.is_self} == {st.node_lock_key}
    assert st.to_json()["trusted_keys"][0]["votes"] == 1


def test_unsigned_node_injected_by_control_is_locked_out(tailnet) -> None:
    control, a, b, c, _ = tailnet
    signed_sig = a.sign_node_key(node_key(3))
    control.check_signature(node_key(3), signed_sig)  # control stores only verifying signatures
    with pytest.raises(NodeKeyNotAuthorized):
        control.check_signature(node_key(3), sign_direct(priv(9), node_key(3)).serialize())
    peers = [Peer("c", base64.b64encode(node_key(3)).decode(), base64.b64encode(signed_sig).decode()),
             Peer("intruder", base64.b64encode(node_key(7)).decode(), None)]
    r = b.filter_peers(peers, node_key=lambda p: p.node_key, signature=lambda p: p.key_signature)
    assert [p.name for p in r.admitted] == ["c"]
    assert r.locked_out[0].reason == LockoutReason.NO_SIGNATURE
    assert control.locked_out(node_key(7), None) == "no node-key signature"
    assert control.locked_out(node_key(3), signed_sig) is None
    # Locally disabled: everything passes on that node only.
    b.locally_disabled = True
    assert len(b.filter_peers(peers, node_key=lambda p: p.node_key, signature=lambda p: p.key_signature).admitted) == 2
    assert b.status(node_key(2), None).self_locked_out is not None


def test_control_cannot_forge_or_replay(tailnet) -> None:
    control, a, b, c, _ = tailnet
    genesis = AUM.parse(control.bootstrap_aum())
    forged = priv(9).sign_aum(AUM(AUMKind.ADD_KEY, prev=genesis.hash, key=key(9)))
    answer = {"offer": {"head": str(forged.hash), "ancestors": [str(genesis.hash)]},
              "missing_aums": [base64.b64encode(forged.serialized).decode()]}
    head = b.head
    with pytest.raises(UnknownKey):
        b.apply(wire(answer))
    assert b.head == head and "UnknownKey" in b.status().last_refusal
    with pytest.raises(UnknownKey):
        control.receive([base64.b64encode(forged.serialized).decode()])
    with pytest.raises(StateError):
        b.bootstrap(control.bootstrap_aum())


def test_disablement_needs_the_real_secret(tailnet) -> None:
    control, a, b, c, _ = tailnet
    assert not b.disable(b"x" * 32)  # a control server claiming "disabled" with a wrong secret
    assert b.status().enabled and "invalid disablement" in b.status().last_refusal
    assert not control.disable(b"x" * 32)
    assert control.disable(SECRET)
    assert control.head is None and not b.needs_sync(control.head)
    for n in (a, b, c):
        assert n.disable(SECRET)
        assert not n.status().enabled
    peers = [Peer("any", base64.b64encode(node_key(7)).decode(), None)]
    assert len(c.filter_peers(peers, node_key=lambda p: p.node_key, signature=lambda p: p.key_signature).admitted) == 1
