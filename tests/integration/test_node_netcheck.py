"""`meshnode netcheck` against a real control server and real DNS-only daemons on loopback: the
report says what the node knows without a tunnel (no UDP port, peers from the map with their
handshakes unknown), whether the control server answers, and stays bounded when it hangs.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest

from meshnode.node.localclient import LocalApiRefused
from tests.integration.test_node_cluster import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, ("alpha", "bravo"))
    try:
        yield c
    finally:
        c.close()


def test_netcheck_in_dns_only_mode(cluster: Cluster) -> None:
    alpha, bravo = cluster.nodes
    alpha.start()

    # Before `up`: no login server to ask, no map, no tunnel; still a report, exit 0.
    report = alpha.api().netcheck()
    assert report["mode"] == "dns-only" and report["udp_port"] is None and report["peers"] == []
    assert report["control"]["reachable"] is False and "no login server" in report["control"]["error"]
    out = alpha.cli("netcheck")
    assert out.returncode == 0, out.stderr
    assert "UDP: none (DNS-only mode" in out.stdout and "NOT reachable" in out.stdout

    key = cluster.authkey(("tag:a",))
    alpha.up(cluster.control, key)
    bravo.start()
    bravo.up(cluster.control, key)

    out = alpha.cli("netcheck", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    control = report["control"]
    assert control["url"] == cluster.control.url and control["reachable"] is True
    assert control["latency_ms"] >= 0 and control["key_matches_pin"] is True and control["error"] is None
    assert report["endpoints"]["local"] is None and report["endpoints"]["at_control"] == []
    (peer,) = report["peers"]
    assert peer["fqdn"] == "bravo.tailnet" and peer["handshake"] is None and peer["path"] is None
    human = alpha.cli("netcheck").stdout
    assert f"Control server: {cluster.control.url} reachable in" in human
    assert "bravo.tailnet  handshake unknown (no tunnel)" in human

    # Bad parameters are refused before anything is probed.
    for params, says in (({"timeout": "nan"}, "timeout"), ({"timeout": "abc"}, "timeout"),
                         ({"timeout": "11"}, "timeout"), ({"verbose": "1"}, "unknown field 'verbose'")):
        with pytest.raises(LocalApiRefused) as refused:
            alpha.api().request("GET", "/netcheck", params=params)
        assert refused.value.status == 400 and says in refused.value.message
    assert alpha.cli("netcheck", "--timeout", "60").returncode == 2

    # The control server gone: reported at once, with the reason.
    port = cluster.control.port
    cluster.control.stop()
    report = alpha.api().netcheck(0.5)
    assert report["control"]["reachable"] is False and report["control"]["error"]
    assert [p["fqdn"] for p in report["peers"]] == ["bravo.tailnet"]  # the map it holds

    # A server that accepts connections and never answers: the probe gives up after its timeout.
    with socket.socket() as hung:
        hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hung.bind(("127.0.0.1", port))
        hung.listen(16)
        start = time.monotonic()
        report = alpha.api().netcheck(0.5)
        elapsed = time.monotonic() - start
    assert report["control"] == {"url": cluster.control.url, "reachable": False, "latency_ms": None,
                                 "key_matches_pin": None, "error": "no answer within 0.5s"}
    assert elapsed < 3
