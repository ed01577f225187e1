"""The router's pure part: the routing plan from a map and prefs, the nftables ruleset text, and
which of a peer's allowed IPs the tunnel takes (subnet routes only with --accept-routes)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from meshnode.netmap import MapNode, NetMap, default_allowed_ips
from meshnode.node.router import (NFT_TABLE, Router, RoutingPlan, control_addresses, find_exit_node,
                                  nft_delete, nft_ruleset, plan_routing)
from meshnode.node.tunnel import peer_configs
from tests.unit.test_node_tunnel import KEY


def node(i: int, routes: tuple[str, ...] = (), exit_node: bool = False, **kw) -> MapNode:  # noqa: ANN003
    addrs = (f"100.64.0.{i}", f"fd7a:115c:a1e0::{i}")
    base = dict(id=i, name=f"n{i}", fqdn=f"n{i}.tailnet", user="u", addresses=addrs, node_key=KEY,
                allowed_ips=default_allowed_ips(addrs, routes, exit_node), advertised_routes=routes,
                approved_routes=routes, exit_node=exit_node, advertises_exit_node=exit_node)
    base.update(kw)
    return MapNode(**base)


def nets(peer) -> list[str]:  # noqa: ANN001
    return [str(n) for n in peer.allowed_ips]


# -- allowed IPs: what the client side takes from the map --------------------------------------

def test_subnet_routes_only_with_accept_routes() -> None:
    nm = NetMap(1, "tailnet", node(1), (node(2, routes=("10.77.0.0/24", "fd00:77::/64")),))
    (without,) = peer_configs(nm)
    assert nets(without) == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]
    (with_routes,) = peer_configs(nm, accept_routes=True)
    assert nets(with_routes) == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128", "10.77.0.0/24", "fd00:77::/64"]


def test_exit_routes_need_the_choice_not_accept_routes() -> None:
    nm = NetMap(1, "tailnet", node(1), (node(3, routes=("10.1.0.0/16",), exit_node=True),))
    (p,) = peer_configs(nm, accept_routes=True)
    assert "0.0.0.0/0" not in nets(p) and "10.1.0.0/16" in nets(p)
    (p,) = peer_configs(nm, exit_node="n3")
    assert nets(p) == ["100.64.0.3/32", "fd7a:115c:a1e0::3/128", "0.0.0.0/0", "::/0"]
    (p,) = peer_configs(nm, exit_node="100.64.0.3", accept_routes=True)
    assert nets(p)[-3:] == ["10.1.0.0/16", "0.0.0.0/0", "::/0"]


# -- the plan ------------------------------------------------------------------------------------

def test_plan_of_a_subnet_router_serves_only_approved_routes() -> None:
    me = node(1, advertised_routes=("10.77.0.0/24", "10.88.0.0/24"), approved_routes=("10.77.0.0/24",))
    plan = plan_routing(NetMap(1, "tailnet", me))
    assert plan.subnets == ("10.77.0.0/24",) and not plan.exit_node and plan.forwarding
    assert plan.families() == frozenset({4}) and not plan.use_exit


def test_plan_of_a_node_advertising_unapproved_routes_forwards_nothing() -> None:
    me = node(1, advertised_routes=("10.77.0.0/24",), approved_routes=(), advertises_exit_node=True)
    plan = plan_routing(NetMap(1, "tailnet", me))
    assert not plan.forwarding and plan.families() == frozenset()
    assert nft_ruleset(plan, "mn0") == ""


def test_plan_of_an_approved_exit_node_forwards_both_families() -> None:
    plan = plan_routing(NetMap(1, "tailnet", node(1, exit_node=True)))
    assert plan.exit_node and plan.subnets == () and plan.families() == frozenset({4, 6})


def test_plan_of_a_client_using_an_exit_node() -> None:
    nm = NetMap(1, "tailnet", node(1), (node(2), node(3, exit_node=True)))
    plan = plan_routing(nm, "n3.tailnet", control=["10.80.0.1", "10.80.0.1", "fd00::1"])
    assert plan.use_exit and plan.exit_peer == "n3.tailnet" and not plan.forwarding
    assert plan.control == ("10.80.0.1", "fd00::1")
    assert find_exit_node(nm, "100.64.0.3") is nm.peers[1]
    # A peer that is no exit node, or one missing from the map: still routed into the tunnel
    # (internet traffic blocked, never leaked around the chosen exit node).
    for ref in ("n2", "gone"):
        plan = plan_routing(nm, ref)
        assert plan.use_exit and plan.exit_peer is None
    assert plan_routing(nm, "") == RoutingPlan()
    assert plan_routing(None, "n3").use_exit


def test_plan_blocks_the_local_networks_only_with_an_exit_node() -> None:
    nm = NetMap(1, "tailnet", node(1), (node(3, exit_node=True),))
    plan = plan_routing(nm, "n3", control=["10.78.0.1"], lan=["10.78.0.11/24", "10.78.0.0/24", "fd00:1::/64"])
    assert plan.lan == ("10.78.0.0/24", "fd00:1::/64")
    # Without an exit node nothing is blocked, whatever the local networks are.
    assert plan_routing(nm, "", lan=["10.78.0.0/24"]) == RoutingPlan()


def test_control_addresses_of_literal_urls() -> None:
    assert control_addresses("http://10.80.0.1:8080") == ("10.80.0.1",)
    assert control_addresses("https://[fd00::1]:443/x") == ("fd00::1",)
    assert control_addresses("") == ()
    assert control_addresses("http://localhost:8080")  # resolved (no network: /etc/hosts)


# -- the nft ruleset ------------------------------------------------------------------------------

def test_ruleset_of_a_subnet_router() -> None:
    text = nft_ruleset(RoutingPlan(subnets=("10.77.0.0/24", "10.78.0.0/16")), "mn0")
    lines = [line.strip() for line in text.splitlines()]
    # Atomic replace of our own table only: declare, delete, define, in one script.
    assert lines[:3] == [f"table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}", f"table inet {NFT_TABLE} {{"]
    assert 'iifname "mn0" oifname != "mn0" ip daddr != { 10.77.0.0/24, 10.78.0.0/16 } drop' in lines
    assert 'iifname "mn0" oifname != "mn0" meta nfproto ipv6 drop' in lines
    # Masquerade only what leaves through a real interface: never what stays in the tunnel or on
    # this machine (lo), never queries to the node's own resolver (they used to be masqueraded,
    # then refused by the resolver as a foreign client: 5 s per lookup on every router).
    post = lines[lines.index("chain postrouting {") + 2:]
    assert post[:5] == ['oifname { "mn0", "lo" } accept', "ip daddr 100.100.100.100 accept",
                        "ip6 daddr fd7a:115c:a1e0::53 accept", "ip saddr 100.64.0.0/10 masquerade",
                        "ip6 saddr fd7a:115c:a1e0::/48 masquerade"]
    assert "type nat hook postrouting priority srcnat; policy accept;" in lines
    assert all(f"table {fam}" not in text for fam in ("ip ", "ip6 ", "bridge "))  # no other table


def test_ruleset_of_an_exit_node_forwards_everything() -> None:
    text = nft_ruleset(RoutingPlan(subnets=("10.77.0.0/24",), exit_node=True), "wg7")
    assert "drop" not in text and 'oifname { "wg7", "lo" } accept' in text
    assert "ip saddr 100.64.0.0/10 masquerade" in text


def test_ruleset_refuses_odd_interface_names() -> None:
    with pytest.raises(ValueError):
        nft_ruleset(RoutingPlan(exit_node=True), 'mn0" accept; #')


def test_delete_script_is_idempotent_text() -> None:
    assert nft_delete() == f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft")
@pytest.mark.parametrize("plan", [RoutingPlan(subnets=("10.77.0.0/24", "fd00:77::/64")),
                                  RoutingPlan(subnets=("10.77.0.0/24",)), RoutingPlan(exit_node=True)])
def test_ruleset_parses(plan: RoutingPlan) -> None:
    """nft itself accepts the script (--check: validated by the kernel, nothing installed; in a
    throwaway network namespace all the same)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    proc = subprocess.run(["unshare", "--net", "nft", "--check", "-f", "-"], input=nft_ruleset(plan, "mn0"),
                          capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr


def test_families_follow_the_subnets() -> None:
    assert RoutingPlan(subnets=("fd00:77::/64",)).families() == frozenset({6})


def test_endpoints_inside_accepted_subnets_are_avoided() -> None:
    """A subnet router reports its address on the subnet too; WireGuard's UDP to it would be routed
    into the tunnel itself, so another endpoint is preferred (and used only if it is the last)."""
    router = node(2, routes=("10.77.0.0/24",), endpoints=("10.77.0.1:41641", "10.78.0.12:41641"))
    only_inside = node(3, endpoints=("10.77.0.3:41641",))
    nm = NetMap(1, "tailnet", node(1), (router, only_inside))
    assert [p.endpoint for p in peer_configs(nm, accept_routes=True)] == [("10.78.0.12", 41641),
                                                                          ("10.77.0.3", 41641)]
    # Without the routes nothing of 10.77.0.0/24 goes into the tunnel: the first endpoint is fine.
    assert peer_configs(nm)[0].endpoint == ("10.77.0.1", 41641)


# -- forwarding: on while serving, back as found, even across a crash ---------------------------

def sysctls(tmp_path: Path, v4: str = "0", v6: str = "0") -> dict[int, Path]:
    files = {4: tmp_path / "ip_forward", 6: tmp_path / "forwarding6"}
    files[4].write_text(v4 + "\n")
    files[6].write_text(v6 + "\n")
    return files


def test_forwarding_is_restored_as_found(tmp_path: Path) -> None:
    files = sysctls(tmp_path, v4="0", v6="1")
    saved = tmp_path / "saved.json"
    router = Router("mn0", saved, proc_sys=files)
    router.set_forwarding(frozenset({4, 6}))
    assert files[4].read_text() == "1\n" and files[6].read_text() == "1\n"
    router.set_forwarding(frozenset({6}))
    assert files[4].read_text() == "0\n"
    router.set_forwarding(frozenset())
    assert files[6].read_text() == "1\n"  # it was on before us: left on
    assert not saved.exists()


def test_forwarding_found_before_a_crash_is_restored_by_the_next_run(tmp_path: Path) -> None:
    files = sysctls(tmp_path)
    saved = tmp_path / "saved.json"
    Router("mn0", saved, proc_sys=files).set_forwarding(frozenset({4}))  # then the process dies
    assert files[4].read_text() == "1\n" and saved.exists()
    again = Router("mn0", saved, proc_sys=files)
    again.set_forwarding(frozenset({4}))  # sees 1, but knows the machine had 0
    again.set_forwarding(frozenset())
    assert files[4].read_text() == "0\n" and not saved.exists()
    # A restarted node that no longer forwards puts the old value back at once.
    Router("mn0", saved, proc_sys=files).set_forwarding(frozenset({4}))
    Router("mn0", saved, proc_sys=files).set_forwarding(frozenset())
    assert files[4].read_text() == "0\n"
