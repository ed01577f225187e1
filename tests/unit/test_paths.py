"""The path layer, driven on a simulated network with time passed in: multi-homed peers, map
updates that must not reset a working path, hysteresis, trust expiry and relay fallback,
data-plane liveness, call-me-maybe hole punching, and property tests."""

from __future__ import annotations

import heapq
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.disco import DiscoKey, Ping
from meshnode.paths import (DATA_TIMEOUT, DataPlane, PathChanged, PathLayer, PathType, PeerInfo,
                            PingResult, SendRelay, SendUDP, better)


class Node:
    def __init__(self, name: str, seed: int, addresses: list[tuple[str, int]]) -> None:
        counter = itertools.count()
        self.name = name
        self.node_key = bytes([seed]) * 32
        self.disco = DiscoKey(bytes([seed + 100]) * 32)
        self.layer = PathLayer(self.disco, self.node_key,
                               random_bytes=lambda n: next(counter).to_bytes(n, "big"))
        self.addresses = addresses
        self.engine_endpoint = None  # what WireGuard would send to (the last PathChanged)
        self.changes: list[PathChanged] = []
        self.results: list[PingResult] = []
        self.relay_region: int | None = None

    def info(self, endpoints=None) -> PeerInfo:
        return PeerInfo(self.node_key, self.disco.public, tuple(endpoints or self.addresses),
                        self.relay_region)


class Net:
    """Datagrams between nodes: `routes[(sender, dst)] = src seen` says dst is reachable from
    sender; `stateful[receiver]` makes a NAT/firewall that only lets in what answers its own
    sends. One-way delay per destination (default 1 ms)."""

    def __init__(self, *nodes: Node, relay: bool = False) -> None:
        self.nodes = nodes
        self.now = 0.0
        self.routes: dict[tuple[str, tuple[str, int]], tuple[str, int]] = {}
        self.delay: dict[tuple[str, int], float] = {}
        self.relay = relay
        self.stateful: set[str] = set()
        self.opened: set[tuple[str, tuple[str, int]]] = set()  # (node, remote endpoint) it sent to
        self._queue: list = []
        self._seq = itertools.count()
        self.sent: list[tuple[str, object]] = []
        for n in nodes:
            if relay:
                n.relay_region = 1
                n.layer.set_relay(1, 0.0)
        for n in nodes:
            n.layer.set_local_endpoints(n.addresses)
            n.layer.set_peers([m.info() for m in nodes if m is not n], 0.0)
        self.pump()

    def owner(self, ep):
        return next((n for n in self.nodes if ep in n.addresses), None)

    def pump(self) -> None:
        for n in self.nodes:
            for out in n.layer.drain():
                self.sent.append((n.name, out))
                if isinstance(out, PathChanged):
                    n.engine_endpoint = out.send_to
                    n.changes.append(out)
                elif isinstance(out, PingResult):
                    n.results.append(out)
                elif isinstance(out, SendUDP):
                    self.opened.add((n.name, out.endpoint))
                    dst = self.owner(out.endpoint)
                    src = self.routes.get((n.name, out.endpoint))
                    if dst is None or src is None:
                        continue
                    if dst.name in self.stateful and (dst.name, src) not in self.opened:
                        continue  # the receiver's NAT has no mapping for this sender yet
                    at = self.now + self.delay.get(out.endpoint, 0.001)
                    heapq.heappush(self._queue, (at, next(self._seq), dst, out.data, src))
                elif isinstance(out, SendRelay) and self.relay:
                    dst = next(m for m in self.nodes if m.node_key == out.node_key)
                    heapq.heappush(self._queue, (self.now + 0.01, next(self._seq), dst, out.data, None))

    def run(self, until: float) -> None:
        self.pump()
        while True:
            deadlines = [d for n in self.nodes if (d := n.layer.next_deadline()) is not None]
            nxt = min(deadlines, default=None)
            if self._queue and (nxt is None or self._queue[0][0] <= nxt):
                at, _, dst, data, src = self._queue[0]
                if at > until:
                    break
                heapq.heappop(self._queue)
                self.now = max(self.now, at)
                dst.layer.receive(data, src, self.now)
            elif nxt is not None and nxt <= until:
                self.now = max(self.now, nxt)
                for n in self.nodes:
                    n.layer.tick(self.now)
            else:
                break
            self.pump()
        self.now = until
        for n in self.nodes:
            n.layer.tick(until)
        self.pump()

    def traffic(self, *nodes: Node) -> None:
        """WireGuard traffic flows both ways between the nodes right now."""
        for n in nodes:
            for m in self.nodes:
                if m is not n:
                    n.layer.data_plane(m.node_key, DataPlane(self.now, self.now, None), self.now)
        self.pump()


def link(net: Net, a: Node, a_ep, b: Node, b_ep) -> None:
    """a_ep and b_ep reach each other both ways (no NAT)."""
    net.routes[(a.name, b_ep)] = a_ep
    net.routes[(b.name, a_ep)] = b_ep


def multihomed_pair(relay: bool = False):
    a = Node("a", 1, [("10.1.0.1", 41641), ("10.2.0.1", 41641)])
    b = Node("b", 2, [("10.1.0.2", 41641), ("10.2.0.2", 41641)])
    net = Net(a, b, relay=relay)
    link(net, a, ("10.2.0.1", 41641), b, ("10.2.0.2", 41641))  # only the second network works
    return a, b, net


def test_multihomed_peers_find_the_address_that_works() -> None:
    a, b, net = multihomed_pair()
    # Before any pong the engine gets the map's first endpoint: the old behaviour, and a guess.
    assert a.engine_endpoint == ("10.1.0.2", 41641)
    net.run(1.0)
    path = a.layer.path(b.node_key)
    assert path.type is PathType.DIRECT and path.endpoint == ("10.2.0.2", 41641)
    assert a.engine_endpoint == ("10.2.0.2", 41641) and b.engine_endpoint == ("10.2.0.1", 41641)
    assert path.latency_ms is not None and path.latency_ms < 5
    assert path.describe() == "direct 10.2.0.2:41641"


def test_map_update_never_resets_a_working_path() -> None:
    a, b, net = multihomed_pair()
    net.run(1.0)
    changes = len(a.changes)
    for t in range(2, 40):  # a record added, a policy set, a tag changed: same peer info
        net.traffic(a, b)
        a.layer.set_peers([b.info()], net.now)
        net.run(float(t))
        assert a.layer.path(b.node_key).endpoint == ("10.2.0.2", 41641)
    assert len(a.changes) == changes and a.engine_endpoint == ("10.2.0.2", 41641)


def test_changed_endpoints_are_probed_while_the_old_path_carries_traffic() -> None:
    a, b, net = multihomed_pair()
    net.run(1.0)
    b.addresses.append(("192.168.9.2", 41641))
    a.addresses.append(("192.168.9.1", 41641))
    net.delay[("192.168.9.1", 41641)] = 0.0002
    link(net, a, ("192.168.9.1", 41641), b, ("192.168.9.2", 41641))
    net.delay[("192.168.9.2", 41641)] = 0.0002  # the new LAN is much faster
    net.sent.clear()
    a.layer.set_peers([b.info()], net.now)
    net.pump()
    assert a.layer.path(b.node_key).endpoint == ("10.2.0.2", 41641)  # not reset by the update
    net.run(net.now + 0.5)
    pinged = {o.endpoint for who, o in net.sent if who == "a" and isinstance(o, SendUDP)}
    assert ("192.168.9.2", 41641) in pinged and ("10.2.0.2", 41641) in pinged
    assert a.layer.path(b.node_key).endpoint == ("192.168.9.2", 41641)


def test_a_dead_path_is_left_for_the_relay_within_7s_and_none_without() -> None:
    for relay in (True, False):
        a, b, net = multihomed_pair(relay=relay)
        net.traffic(a, b)
        net.run(1.0)
        assert a.layer.path(b.node_key).type is PathType.DIRECT
        for t in range(2, 10):
            net.traffic(a, b)
            net.run(float(t))
        assert a.layer.path(b.node_key).type is PathType.DIRECT  # heartbeats keep it trusted
        died = net.now
        net.routes.clear()
        while a.layer.path(b.node_key).type is PathType.DIRECT:
            net.traffic(a, b)
            net.run(net.now + 0.1)
        assert net.now - died <= 7.0
        path = a.layer.path(b.node_key)
        if relay:
            assert path.type is PathType.RELAY and path.relay_region == 1
            assert a.engine_endpoint is None
        else:
            assert path.type is PathType.NONE and path.describe() == "-"
            assert a.engine_endpoint == ("10.2.0.2", 41641)  # nothing better: keep trying it


def test_unanswered_wireguard_traffic_abandons_a_path_that_still_answers_pings() -> None:
    a, b, net = multihomed_pair(relay=True)
    net.traffic(a, b)
    net.run(1.0)
    start = net.now
    while net.now - start < DATA_TIMEOUT + 5:
        a.layer.data_plane(b.node_key, DataPlane(net.now, start, start), net.now)
        net.pump()
        net.run(net.now + 0.5)
        if a.layer.path(b.node_key).type is not PathType.DIRECT:
            break
    path = a.layer.path(b.node_key)
    assert path.type is PathType.RELAY
    assert "unanswered" in path.reason and "10.2.0.2" in path.reason
    assert DATA_TIMEOUT <= net.now - start <= DATA_TIMEOUT + 1


def test_hysteresis_keeps_a_near_equal_path() -> None:
    a = Node("a", 1, [("198.51.100.1", 41641)])
    b = Node("b", 2, [("198.51.100.2", 41641), ("203.0.113.2", 41641)])
    net = Net(a, b)
    link(net, a, ("198.51.100.1", 41641), b, ("198.51.100.2", 41641))
    link(net, a, ("198.51.100.1", 41641), b, ("203.0.113.2", 41641))
    net.delay[("198.51.100.2", 41641)] = 0.0100
    net.delay[("203.0.113.2", 41641)] = 0.0100
    seen = set()
    for t in range(1, 200):
        net.delay[("203.0.113.2", 41641)] = 0.0100 - (t % 2) * 0.00004  # flickers by < 1%
        net.traffic(a, b)
        net.run(float(t))
        seen.add(a.layer.path(b.node_key).endpoint)
    assert len(seen) == 1
    assert sum(1 for c in a.changes if c.path.type is PathType.DIRECT) == 1


def test_call_me_maybe_through_the_relay_punches_both_nats() -> None:
    a = Node("a", 1, [("198.51.100.1", 1111)])
    b = Node("b", 2, [("203.0.113.2", 2222)])
    net = Net(a, b, relay=True)
    link(net, a, ("198.51.100.1", 1111), b, ("203.0.113.2", 2222))
    net.stateful = {"a", "b"}
    net.traffic(a, b)
    net.run(1.5)  # a ping that finally gets through is answered by a ping back at once
    assert a.layer.path(b.node_key).type is PathType.DIRECT
    assert b.layer.path(a.node_key).type is PathType.DIRECT
    assert a.layer.counters["call_me_maybe_received"] >= 1


def test_without_a_relay_the_nats_open_only_after_both_probe() -> None:
    a = Node("a", 1, [("198.51.100.1", 1111)])
    b = Node("b", 2, [("203.0.113.2", 2222)])
    net = Net(a, b)
    link(net, a, ("198.51.100.1", 1111), b, ("203.0.113.2", 2222))
    net.stateful = {"a", "b"}
    net.traffic(a, b)
    net.run(1.0)
    assert a.layer.path(b.node_key).type is PathType.NONE  # both first pings hit closed NATs...
    for t in range(2, 8):
        net.traffic(a, b)
        net.run(float(t))
    assert a.layer.path(b.node_key).type is PathType.DIRECT  # ...the next round gets through


def test_pong_source_becomes_our_discovered_endpoint() -> None:
    a = Node("a", 1, [("192.168.1.10", 41641)])
    b = Node("b", 2, [("203.0.113.2", 41641)])
    net = Net(a, b)
    net.routes[("a", ("203.0.113.2", 41641))] = ("198.51.100.77", 60000)  # a is behind a NAT
    net.routes[("b", ("198.51.100.77", 60000))] = ("203.0.113.2", 41641)
    a.addresses.append(("198.51.100.77", 60000))  # so the simulated NAT delivers to a
    net.run(1.0)
    assert ("198.51.100.77", 60000) in a.layer.discovered
    # b learned the NAT's address from a's ping and found its way back through it.
    assert b.layer.path(a.node_key).endpoint == ("198.51.100.77", 60000)


def test_user_ping_reports_the_answering_path() -> None:
    a, b, net = multihomed_pair(relay=True)
    net.run(1.0)
    pid = a.layer.ping(b.node_key, net.now)
    net.run(net.now + 1.0)
    [res] = [r for r in a.results if r.ping_id == pid]
    assert res.endpoint == ("10.2.0.2", 41641) and res.latency_ms < 5
    assert a.layer.ping(b"\x09" * 32, net.now) is None


def test_user_ping_on_a_direct_path_goes_only_to_that_path() -> None:
    """As Tailscale's discoPing: with a direct path in use, `meshnode ping` asks it alone, so a
    relay that happens to answer first cannot be reported instead (`ping --until-direct`)."""
    a, b, net = multihomed_pair(relay=True)
    net.run(1.0)
    path = a.layer.path(b.node_key)
    assert path is not None and path.type is PathType.DIRECT
    a.layer.drain()
    assert a.layer.ping(b.node_key, net.now) is not None
    sent = [o for o in a.layer.drain() if isinstance(o, (SendUDP, SendRelay))]
    assert [o.endpoint for o in sent if isinstance(o, SendUDP)] == [path.endpoint]
    assert not [o for o in sent if isinstance(o, SendRelay)]


def test_strangers_and_forged_pings_are_dropped() -> None:
    a, b, net = multihomed_pair()
    eve = DiscoKey(b"\x07" * 32)
    fake = eve.box_with(a.disco.public).seal(Ping(b"x" * 12, b.node_key))
    assert not a.layer.receive(fake, ("10.2.0.2", 41641), 0.5)
    assert a.layer.counters["disco_unknown_sender"] == 1
    # b's disco key claiming another node key: no pong
    wrong = b.disco.box_with(a.disco.public).seal(Ping(b"y" * 12, b"\x05" * 32))
    a.layer.receive(wrong, ("10.2.0.2", 41641), 0.5)
    assert not [o for o in a.layer.drain() if isinstance(o, SendUDP) and o.endpoint == ("10.2.0.2", 41641)
                and b.disco.box_with(a.disco.public).open(o.data).__class__.__name__ == "Pong"]


def test_peer_without_disco_key_is_direct_where_wireguard_hears_it() -> None:
    a = Node("a", 1, [("10.1.0.1", 41641)])
    layer = a.layer
    layer.set_peers([PeerInfo(b"\x02" * 32, None, (("10.1.0.2", 41641), ("10.2.0.2", 41641)))], 0.0)
    [change] = [o for o in layer.drain() if isinstance(o, PathChanged)]
    assert change.send_to == ("10.1.0.2", 41641) and change.path.type is PathType.NONE
    layer.data_plane(b"\x02" * 32, DataPlane(1.0, 1.0, None, ("10.2.0.2", 41641)), 1.0)
    assert layer.path(b"\x02" * 32).endpoint == ("10.2.0.2", 41641)
    assert layer.next_deadline() is None  # nothing to probe: no busy loop


def test_better_prefers_private_and_ipv6_and_never_both_ways() -> None:
    assert better(("10.0.0.1", 1), 0.010, ("198.51.100.1", 1), 0.010)
    assert better(("2001:db8::1", 1), 0.010, ("198.51.100.1", 1), 0.010)
    assert not better(("198.51.100.2", 1), 0.00999, ("198.51.100.1", 1), 0.010)
    assert better(("198.51.100.2", 1), 0.005, ("198.51.100.1", 1), 0.010)


ADDRS = st.sampled_from(["10.0.0.1", "198.51.100.1", "2001:db8::1", "fd00::1", "127.0.0.1",
                         "169.254.0.1", "203.0.113.9"])


@given(ADDRS, ADDRS, st.floats(0, 1), st.floats(0, 1))
def test_better_is_antisymmetric(x, y, lx, ly) -> None:
    a, b = (x, 1), (y, 2)
    assert not (better(a, lx, b, ly) and better(b, ly, a, lx))


OPS = st.lists(st.tuples(st.sampled_from(["tick", "map", "data", "junk", "ping", "relay"]),
                         st.floats(0, 3), st.binary(max_size=80)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_any_sequence_of_inputs_is_safe_and_deadlines_move_forward(ops) -> None:
    a, b, net = multihomed_pair()
    for op, dt, junk in ops:
        net.now += dt
        if op == "tick":
            a.layer.tick(net.now)
            d = a.layer.next_deadline()
            assert d is None or d > net.now or d == float("-inf")
        elif op == "map":
            a.layer.set_peers([b.info(b.addresses[: 1 + len(junk) % 2])], net.now)
        elif op == "data":
            a.layer.data_plane(b.node_key, DataPlane(net.now, None, net.now - dt), net.now)
        elif op == "junk":
            assert a.layer.receive(junk, ("10.2.0.2", 41641), net.now) is False
        elif op == "ping":
            a.layer.ping(b.node_key, net.now)
        else:
            a.layer.set_relay(None if junk else 1, net.now)
        net.pump()
        net.run(net.now + 0.01)


from meshnode.disco import CallMeMaybe, Pong  # noqa: E402

SEALED = st.one_of(
    st.builds(Ping, st.binary(min_size=12, max_size=12), st.one_of(st.none(), st.just(b"\x02" * 32))),
    st.builds(Pong, st.binary(min_size=12, max_size=12), st.tuples(ADDRS, st.integers(0, 65535))),
    st.builds(CallMeMaybe, st.lists(st.tuples(ADDRS, st.integers(1, 65535)), max_size=40).map(tuple)))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(SEALED, st.one_of(st.none(), st.tuples(ADDRS, st.integers(1, 65535))),
                          st.floats(0, 2)), max_size=60))
def test_a_hostile_peer_cannot_crash_or_bloat_the_layer(msgs) -> None:
    """Whatever a peer with a valid disco key sends (floods of call-me-maybe, pongs for pings
    never sent, pings from anywhere), nothing raises and its candidates stay bounded."""
    a, b, net = multihomed_pair(relay=True)
    box = b.disco.box_with(a.disco.public)
    for msg, src, dt in msgs:
        net.now += dt
        assert a.layer.receive(box.seal(msg), src, net.now) is True
        a.layer.tick(net.now)
        a.layer.drain()
    peer = a.layer._peers[b.node_key]
    assert len(peer.candidates) <= 16 and len(a.layer.discovered) <= 8


def test_wireguard_roaming_off_a_working_path_is_put_back() -> None:
    """A handshake that arrives over a one-way path (node2 drops what node1 sends there) moves
    WireGuard's endpoint; the path layer puts back the path that answers pings."""
    a, b, net = multihomed_pair()
    net.traffic(a, b)
    net.run(1.0)
    assert a.engine_endpoint == ("10.2.0.2", 41641)
    a.layer.data_plane(b.node_key, DataPlane(net.now, net.now, None, ("10.1.0.2", 41641)), net.now)
    net.pump()
    assert a.engine_endpoint == ("10.2.0.2", 41641)
    assert a.layer.counters["path_reasserted"] == 1


def test_a_peer_that_moves_is_followed_not_pulled_back() -> None:
    """The peer's address changes (a laptop changing networks): WireGuard follows its packets to
    the new address, which is pinged at once; the path moves there, and is never forced back to
    the old one."""
    a, b, net = multihomed_pair()
    net.traffic(a, b)
    net.run(1.0)
    assert a.layer.path(b.node_key).endpoint == ("10.2.0.2", 41641)
    b.addresses.append(("10.3.0.2", 41641))
    net.routes.clear()  # the old networks are gone...
    link(net, a, ("10.2.0.1", 41641), b, ("10.3.0.2", 41641))  # ...b now sends from a new one
    moved_at = net.now
    a.layer.data_plane(b.node_key, DataPlane(net.now, net.now, None, ("10.3.0.2", 41641)), net.now)
    a.engine_endpoint = ("10.3.0.2", 41641)  # WireGuard roamed with the authenticated packet
    net.pump()
    assert a.engine_endpoint == ("10.3.0.2", 41641) and a.layer.counters["path_reasserted"] == 0
    while a.layer.path(b.node_key).endpoint != ("10.3.0.2", 41641):
        net.traffic(a, b)
        net.run(net.now + 0.5)
        assert net.now - moved_at < 8
    assert a.engine_endpoint == ("10.3.0.2", 41641)
