"""Locked-out peers' addresses cut out of the packet-filter rules (meshnode/tka/filterrules.py),
checked on the rule JSON, with hypothesis against a brute-force membership oracle, and through the
real TunnelFilter/PacketFilter a node installs."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.netmap import MapNode, NetMap
from meshnode.node.lock import LockService
from meshnode.node.lockcli import run_in_daemon
from meshnode.node.tunnel import TunnelFilter
from meshnode.tka.cli_format import format_public
from meshnode.tka.filterrules import host_addresses, without_hosts
from meshnode.tka.statedir import LockDir
from tests.unit.test_policy_filter import ipv4, ipv6, tcp

A = ipaddress.ip_address


def rule(src: list[str], dst: list[str]) -> dict:
    return {"src": src, "dst": dst, "ports": "22", "protos": [6]}


def covered(prefixes: list[str], addr: str) -> bool:
    a = A(addr)
    return any(a.version == n.version and a in n for n in map(ipaddress.ip_network, prefixes))


def test_exact_host_goes_and_an_empty_rule_is_dropped() -> None:
    rules = [rule(["100.64.0.3/32"], ["100.64.0.1/32"]),
             rule(["100.64.0.3/32", "100.64.0.4/32"], ["100.64.0.1/32"]),
             rule(["100.64.0.4/32"], ["100.64.0.1/32"])]
    out = without_hosts(rules, {A("100.64.0.3")})
    assert [r["src"] for r in out] == [["100.64.0.4/32"], ["100.64.0.4/32"]]
    assert out[1] is rules[2]   # untouched rules are the same objects: no churn in the tunnel


def test_a_range_containing_the_host_is_split_around_it() -> None:
    out = without_hosts([rule(["100.64.0.0/10", "10.0.0.0/8"], ["100.64.0.1/32"])], {A("100.64.0.3")})
    (r,) = out
    assert "10.0.0.0/8" in r["src"] and len(r["src"]) == 22 + 1   # /10 minus a host: 22 prefixes
    assert not covered(r["src"], "100.64.0.3")
    for keep in ("100.64.0.2", "100.64.0.4", "100.127.255.255", "100.64.0.0", "10.1.2.3"):
        assert covered(r["src"], keep), keep


def test_star_rule_both_families_and_destinations() -> None:
    out = without_hosts([rule(["0.0.0.0/0", "::/0"], ["0.0.0.0/0", "::/0"])],
                        host_addresses(["100.64.0.3", "fd7a:115c:a1e0::3/128"]))
    (r,) = out
    assert len(r["src"]) == 32 + 128 and len(r["dst"]) == 32 + 128
    for side in ("src", "dst"):
        assert not covered(r[side], "100.64.0.3") and not covered(r[side], "fd7a:115c:a1e0::3")
        assert covered(r[side], "100.64.0.2") and covered(r[side], "fd7a:115c:a1e0::4")
        assert covered(r[side], "8.8.8.8")


def test_the_only_destination_removed_drops_the_rule() -> None:
    assert without_hosts([rule(["100.64.0.0/10"], ["100.64.0.3/32"])], {A("100.64.0.3")}) == ()


def test_unreadable_rules_pass_through_for_the_tunnel_to_refuse() -> None:
    bad = [{"src": "100.64.0.3/32", "dst": []}, {"src": ["nonsense"], "dst": ["100.64.0.1/32"]}, {"x": 1}]
    assert without_hosts(bad, {A("100.64.0.3")}) == tuple(bad)
    assert without_hosts(bad, set()) == tuple(bad)


nets4 = st.builds(lambda a, p: str(ipaddress.ip_network((a, p), strict=False)),
                  st.integers(0, 2**32 - 1), st.integers(0, 32))
hosts4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)


@settings(max_examples=200, deadline=None)
@given(st.lists(nets4, min_size=1, max_size=4), st.lists(hosts4, max_size=5), st.lists(hosts4, max_size=20))
def test_subtraction_is_exact(prefixes: list[str], hosts: list[ipaddress.IPv4Address],
                              probes: list[ipaddress.IPv4Address]) -> None:
    """Every address is covered afterwards iff it was covered before and is not a removed host;
    the excluded hosts' neighbours (h±1) are probed too, where a split is most likely to go wrong."""
    out = without_hosts([rule(prefixes, ["100.64.0.1/32"])], set(hosts))
    after = out[0]["src"] if out else []
    near = [ipaddress.IPv4Address(int(h) + d) for h in hosts for d in (-1, 1) if 0 <= int(h) + d < 2**32]
    for p in probes + near + hosts:
        want = covered(prefixes, str(p)) and p not in hosts
        assert covered(after, str(p)) == want, (p, prefixes, hosts)
    assert len(after) <= len(prefixes) * (1 + 32 * len(set(hosts)))


def peer(i: int, sig: str = "") -> MapNode:
    return MapNode(i, f"n{i}", f"n{i}.tailnet", "u", (f"100.64.0.{i}", f"fd7a:115c:a1e0::{i}"),
                   base64.b64encode(bytes([i]) * 32).decode(), key_signature=sig)


def test_the_installed_filter_drops_a_locked_out_peer_and_accepts_it_once_signed(tmp_path: Path) -> None:
    """Through the daemon's LockService and the real TunnelFilter: the rules in force accept TCP/22
    from a signed peer and not from an unsigned one (v4 and v6) under a `*` rule; once signed, it
    is accepted too."""
    me = format_public(LockDir(tmp_path).lock_key().public)
    assert run_in_daemon(tmp_path, "init", {"n": 1, "args": [me]}, {})[1] is None

    def sign(i: int) -> str:
        return run_in_daemon(tmp_path, "sign", {"target": "nodekey:" + (bytes([i]) * 32).hex()}, {})[0].strip()

    star = ({"src": ["0.0.0.0/0", "::/0"], "dst": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
             "ports": "22", "protos": [6]},
            {"src": ["100.64.0.3/32"], "dst": ["100.64.0.1/32"], "ports": "80", "protos": [6]})
    nm = NetMap(1, "tailnet", peer(1), (peer(2, sign(2)), peer(3)), packet_filter=star)

    def installed(m: NetMap) -> TunnelFilter:
        got: list[NetMap] = []

        async def keep(x: NetMap) -> None:
            got.append(x)
        asyncio.run(LockService(tmp_path).apply(m, None, keep))
        tf = TunnelFilter()
        update = tf.rules_update(got[0])
        assert update is not None
        update()
        return tf

    def accepts(tf: TunnelFilter, src4: str, src6: str, port: int = 22) -> tuple[bool, bool]:
        return (tf.filter.check(ipv4(src4, "100.64.0.1", 6, tcp(4000, port)), 0.0),
                tf.filter.check(ipv6(src6, "fd7a:115c:a1e0::1", 6, tcp(4000, port)), 0.0))

    tf = installed(nm)
    assert accepts(tf, "100.64.0.2", "fd7a:115c:a1e0::2") == (True, True)
    assert accepts(tf, "100.64.0.3", "fd7a:115c:a1e0::3") == (False, False)
    assert accepts(tf, "100.64.0.3", "fd7a:115c:a1e0::3", 80) == (False, False)
    assert tf.rule_count == 1   # the rule naming only node3 is gone
    assert accepts(tf, "198.51.100.7", "2001:db8::7") == (True, True)   # the rest of `*` stays

    nm = NetMap(2, "tailnet", peer(1), (peer(2, sign(2)), peer(3, sign(3))), packet_filter=star)
    tf = installed(nm)
    assert accepts(tf, "100.64.0.3", "fd7a:115c:a1e0::3") == (True, True)
    assert accepts(tf, "100.64.0.3", "fd7a:115c:a1e0::3", 80)[0] and tf.rule_count == 2
