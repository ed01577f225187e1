"""The policy's `tests` section: checked on every `policy set`, so a policy that breaks an asserted
access (or grants a forbidden one) is refused before it takes effect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from . import idpgroups
from .errors import PolicyTestError
from .identity import Identity, dst_matches, matches
from .model import Expectation, NodeInfo, Policy, Selector, SelectorKind
from .parse import parse_policy
from .protocols import PORT_PROTOS, IPProto


@dataclass(frozen=True, slots=True)
class TestFailure:
    """One failing check of the `tests` section."""

    __test__ = False  # not a pytest test class

    test_index: int
    src: str
    dst: str
    proto: int
    expected: Expectation

    def __str__(self) -> str:
        try:
            proto = IPProto(self.proto).name.lower()
        except ValueError:
            proto = str(self.proto)
        got = "deny" if self.expected is Expectation.ACCEPT else "accept"
        return (f"tests[{self.test_index}]: {self.src} -> {self.dst} ({proto}): "
                f"expected {self.expected.value}, policy would {got}")


def _node_identity(node: NodeInfo) -> Identity:
    return Identity(None if node.tags else node.user, frozenset(node.tags))


def _identities(policy: Policy, selector: Selector, nodes_by_ip: dict) -> list[Identity]:
    """Every identity a test endpoint stands for (a group: each of its members)."""
    kind = selector.kind
    if kind is SelectorKind.USER:
        return [Identity(user=selector.name)]
    if kind is SelectorKind.GROUP:
        return [Identity(user=u) for u in policy.groups.get(selector.name, ())]
    if kind is SelectorKind.TAG:
        return [Identity(tags=frozenset({selector.name}))]
    prefix = selector.prefix
    assert prefix is not None
    node = nodes_by_ip.get(prefix.network_address) if prefix.num_addresses == 1 else None
    # An address held by a node also carries that node's user or tags, as its packets would.
    base = _node_identity(node) if node is not None else Identity()
    return [Identity(base.user, base.tags, prefix)]


def evaluate(policy: Policy, src: Identity, dst: Identity, proto: int, port: int) -> bool:
    """Whether the policy lets `src` reach `dst` with `proto` (at `port` if the protocol has ports)."""
    for rule in policy.acls:
        if proto not in rule.protos or not any(matches(policy, s, src) for s in rule.src):
            continue
        for entry in rule.dst:
            if proto in PORT_PROTOS and not any(r.first <= port <= r.last for r in entry.ports):
                continue
            if dst_matches(policy, entry.selector, src, dst):
                return True
    return False


def run_tests(policy: Policy, nodes: Iterable[NodeInfo] | None = None) -> list[TestFailure]:
    """Every failing check of `policy.tests`; with `nodes`, test IPs also carry their node's identity."""
    nodes_by_ip = {a: n for n in (nodes or ()) for a in n.addresses}
    failures: list[TestFailure] = []
    for ti, test in enumerate(policy.tests):
        sources = _identities(policy, test.src, nodes_by_ip)
        for expected, dsts in ((Expectation.ACCEPT, test.accept), (Expectation.DENY, test.deny)):
            for dst in dsts:
                targets = _identities(policy, dst.selector, nodes_by_ip)
                want = expected is Expectation.ACCEPT
                if any(evaluate(policy, s, d, test.proto, dst.port) != want
                       for s in sources for d in targets):
                    failures.append(TestFailure(ti, test.src.name, dst.text, test.proto, expected))
    return failures


def check_policy(text: str, nodes: Sequence[NodeInfo] | None = None,
                 groups: Mapping[str, tuple[str, ...]] | None = None) -> Policy:
    """Parse `text` and run its tests; raise a PolicyError (PolicyTestError lists every failure).

    `groups`: the identity provider's members of the policy's declared groups (idpgroups), which
    the tests see as the maps do."""
    policy = idpgroups.merge(parse_policy(text), groups or {})
    assert policy is not None
    failures = run_tests(policy, nodes)
    if failures:
        raise PolicyTestError(tuple(failures))
    return policy


__all__ = ["TestFailure", "check_policy", "evaluate", "run_tests"]
