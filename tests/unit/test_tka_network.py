"""A tailnet as a hypothesis state machine: signer nodes make updates offline, sync with the control
server in any order, a hostile party injects forged AUMs; once everyone has synced, every node and
the control server hold the same head and state, and nothing forged was ever accepted."""

from __future__ import annotations

import base64

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from meshnode.tka import AUM, AUMKind, Authority, MemoryStore, State, TKAError
from meshnode.tka.nodelock import ControlChain, NodeLock

from .tka_helpers import DISABLEMENT, key, priv

N_NODES = 3


class Tailnet(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        state = State(disablement_values=(DISABLEMENT,), keys=(key(1, 1), key(2, 2), key(3, 1)),
                      state_id1=5, state_id2=6)
        store = MemoryStore()
        _, genesis = Authority.create(store, state, priv(1))
        self.control = ControlChain(MemoryStore())
        self.control.init(genesis.serialized)
        self.nodes = [NodeLock(store, priv(1))] + [NodeLock(MemoryStore(), priv(i + 1)) for i in range(1, N_NODES)]
        for n in self.nodes[1:]:
            n.bootstrap(self.control.bootstrap_aum())
        self.forged: set[bytes] = set()

    @rule(i=st.integers(0, N_NODES - 1), op=st.sampled_from(["add", "remove", "votes"]),
          who=st.integers(1, 6), votes=st.integers(1, 3))
    def update_offline(self, i: int, op: str, who: int, votes: int) -> None:
        node = self.nodes[i]
        if node.authority is None or not node.authority.key_trusted(priv(i + 1).public):
            return
        try:
            if op == "add":
                node.modify(add=[key(who, votes)])
            elif op == "remove":
                node.modify(remove=[key(who).key_id])
            else:
                node.modify(votes={key(who).key_id: votes})
        except TKAError:
            pass  # not applicable in this state (unknown key, last key, duplicate...)

    @rule(i=st.integers(0, N_NODES - 1))
    def sync(self, i: int) -> None:
        node = self.nodes[i]
        if node.needs_sync(self.control.head):
            answer = self.control.answer(node.offer())
            back = node.apply(answer)
            if back:
                self.control.receive(back)
            if back and answer["missing_aums"]:
                event("fork resolved during sync")

    @rule(signer=st.integers(7, 9), i=st.integers(0, N_NODES - 1))
    def inject_forged(self, signer: int, i: int) -> None:
        node = self.nodes[i]
        head = node.authority.head
        forged = priv(signer).sign_aum(AUM(AUMKind.ADD_KEY, prev=head, key=key(signer)))
        self.forged.add(bytes(forged.hash))
        answer = {"offer": {"head": str(forged.hash), "ancestors": [str(head)]},
                  "missing_aums": [base64.b64encode(forged.serialized).decode()]}
        try:
            node.apply(answer)
        except TKAError:
            pass
        else:
            raise AssertionError("forged AUM accepted")

    @invariant()
    def nothing_forged_stored(self) -> None:
        for n in self.nodes:
            assert not any(bytes(h) in self.forged for h in n.store.all_hashes())
            assert not any(n.authority.key_trusted(key(s).key_id) for s in (7, 8, 9))

    def teardown(self) -> None:
        # Two rounds of everyone syncing: the first carries each node's updates to the control
        # server, the second brings the resolved chain back to everyone.
        for _ in range(2):
            for i in range(N_NODES):
                self.sync(i)
        heads = {n.head for n in self.nodes} | {self.control.head}
        assert len(heads) == 1, heads
        states = {n.authority.state for n in self.nodes}
        assert len(states) == 1


Tailnet.TestCase.settings = settings(max_examples=40, stateful_step_count=15, deadline=None)
test_tailnet = Tailnet.TestCase
