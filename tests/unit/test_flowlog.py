"""Flow counting and windows (meshnode/node/flowlog.py), with real packets from the policy filter."""

from __future__ import annotations

import ipaddress
import struct

from meshnode.node.flowlog import FlowCounter, PeerInfo, UploadQueue, build_window, counting_hooks, flow_key
from meshnode.policy import PacketFilter
from meshnode.policy.rules import rules_from_json


def ipv4(src: str, dst: str, proto: int, sport: int, dport: int, payload: bytes = b"x" * 10) -> bytes:
    l4 = struct.pack("!HH", sport, dport) + b"\0" * (16 if proto == 6 else 4) + payload
    total = 20 + len(l4)
    return (struct.pack("!BBHHHBBH", 0x45, 0, total, 0, 0, 64, proto, 0)
            + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + l4)


PEER = b"p" * 32


def test_flow_key_and_counts_per_direction() -> None:
    out = ipv4("100.64.0.1", "100.64.0.2", 6, 40000, 80)
    back = ipv4("100.64.0.2", "100.64.0.1", 6, 80, 40000, b"y" * 100)
    assert flow_key(out) == (6, ipaddress.ip_address("100.64.0.1").packed, ipaddress.ip_address("100.64.0.2").packed,
                             40000, 80)
    assert flow_key(b"\x45" * 5) is None
    c = FlowCounter()
    for _ in range(3):
        c.outbound(out, PEER)
    c.inbound(back, PEER, True)
    assert c.harvest() == ({}, {}, {})  # read one window later (in-flight increments land first)
    recs = build_window(0, 5, c.harvest(), {PEER: PeerInfo("web")})
    (tx,) = [r for r in recs if r["tx_packets"]]
    assert tx["tx_bytes"] == 3 * len(out) and tx["peer"] == "web" and tx["kind"] == "tunnel"
    (rx,) = [r for r in recs if r["rx_packets"]]
    assert rx["rx_bytes"] == len(back) and rx["src"] == "100.64.0.2"


def test_kinds_subnet_and_exit() -> None:
    c = FlowCounter()
    c.outbound(ipv4("100.64.0.1", "192.168.5.9", 17, 5000, 53), PEER)
    c.outbound(ipv4("100.64.0.1", "198.18.0.10", 6, 5001, 443), PEER)
    c.outbound(ipv4("100.64.0.1", "100.64.0.7", 6, 5001, 443), PEER)
    c.harvest()
    gw = PeerInfo("gw", ("192.168.5.0/24", "0.0.0.0/0", "::/0"), exit_node=True)
    recs = build_window(0, 5, c.harvest(), {PEER: gw})
    assert {r["dst"]: r["kind"] for r in recs} == {"192.168.5.9": "subnet", "198.18.0.10": "exit",
                                                   "100.64.0.7": "tunnel"}
    # On the router: packets from a client to the routed network are subnet traffic by its own routes.
    c.inbound(ipv4("100.64.0.1", "192.168.5.9", 17, 5000, 53), PEER, True)
    c.inbound(ipv4("100.64.0.1", "198.18.0.10", 17, 5000, 53), PEER, True)
    c.harvest()
    recs = build_window(0, 5, c.harvest(), {PEER: PeerInfo("client"), b"": gw})
    assert {r["dst"]: r["kind"] for r in recs} == {"192.168.5.9": "subnet", "198.18.0.10": "exit"}


def test_dropped_packets_carry_the_filter_reason() -> None:
    rules = rules_from_json([{"src": ["100.64.0.0/10"], "dst": ["100.64.0.1/32"], "ports": "8000", "protos": [6]}])
    pf = PacketFilter(rules)
    c = FlowCounter()
    inbound, _ = counting_hooks(pf, c)
    assert inbound(ipv4("100.64.0.2", "100.64.0.1", 6, 1234, 8000), PEER, 0.0)
    assert not inbound(ipv4("100.64.0.2", "100.64.0.1", 6, 1234, 8001), PEER, 0.0)
    assert not inbound(b"\x45" + b"\0" * 30, PEER, 0.0)
    c.harvest()
    recs = build_window(0, 5, c.harvest(), {})
    drops = sorted((r["dport"], r["rule"]) for r in recs if r.get("dropped"))
    # A default-deny drop says what was refused (no rule matched, so there is no rule to name).
    assert drops == [(0, "malformed"), (8001, "no rule allowed tcp 100.64.0.1:8001")]
    assert [r["dport"] for r in recs if not r.get("dropped")] == [8000]


def test_default_deny_drop_names_protocol_destination_and_port() -> None:
    from meshnode.control.flows import check_record
    from meshnode.node.flowlog import not_allowed_text

    longest = "fd7a:115c:a1e0:ab12:4843:cd96:6258:b240"
    v6 = (struct.pack("!IHBB", 0x60000000, 12, 17, 64) + ipaddress.ip_address("fd7a:115c:a1e0::1").packed
          + ipaddress.ip_address(longest).packed + struct.pack("!HHHH", 5000, 65535, 12, 0) + b"abcd")
    assert not_allowed_text(v6) == f"no rule allowed udp [{longest}]:65535"
    assert not_allowed_text(ipv4("100.64.0.2", "100.64.0.1", 1, 0x0800, 0)) == "no rule allowed icmp 100.64.0.1"
    assert not_allowed_text(b"\x45") == "not_allowed"
    # The longest text fits what the control server stores.
    rec = {"start": 0.0, "end": 1.0, "dropped": True, "rule": not_allowed_text(v6)}
    assert check_record(rec)["rule"] == rec["rule"]


def test_upload_queue_is_bounded_oldest_first_and_acked() -> None:
    q = UploadQueue("boot", max_windows=3)
    for i in range(5):
        q.add([{"i": i}])
    assert [s for s, _ in q.windows] == [3, 4, 5] and q.dropped_windows == 2
    q.add([])  # an empty window is not queued
    q.ack(4)
    assert [s for s, _ in q.windows] == [5]
