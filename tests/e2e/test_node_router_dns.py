"""End to end: an approved subnet router resolves its own names at once. Our nftables rule
masqueraded every tailnet source leaving by any interface but the TUN, which included the node's
own queries to 100.100.100.100 over `lo`: the resolver then saw a foreign client and dropped them,
and every lookup on the router took glibc's 5 s timeout."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.test_node_routing import CONTROL, Tailnet
from tests.e2e.test_node_tunnel import Lan
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]


@pytest.fixture
def lan1(tmp_path: Path) -> Iterator[Lan]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    lan = Lan(tmp_path, 1)
    try:
        lan.build()
        yield lan
    finally:
        lan.destroy()


@pytest.mark.parametrize("approve", ["10.77.0.0/24", "0.0.0.0/0,::/0"])
def test_an_approved_router_resolves_its_own_names_at_once(lan1: Lan, approve: str) -> None:
    net = Tailnet(lan1)
    net.start()
    key = net.control("authkey", "create", "--reusable")
    net.cli(1, "up", "--login-server", f"http://{CONTROL}", "--authkey", key, "--hostname", "node1",
            "--advertise-routes", "10.77.0.0/24", "--advertise-exit-node")
    net.control("routes", "approve", "node1", approve)
    wait_until(lambda: "meshnode" in net.sh(1, "nft", "list", "tables").stdout, timeout=10,
               what="node1 forwarding (its masquerading table installed)")
    addr = net.status(1)["self"]["addresses"][0]
    for family, name in (("ahostsv4", "node1.tailnet"), ("ahostsv6", "node1.tailnet"), ("hosts", "node1")):
        t = time.monotonic()
        r = net.sh(1, "getent", family, name)
        took = time.monotonic() - t
        assert r.returncode == 0, f"getent {family} {name}: {r.stderr}"
        assert took < 1.0, f"getent {family} {name} took {took:.1f}s"
    assert addr in net.sh(1, "getent", "ahostsv4", "node1.tailnet").stdout
