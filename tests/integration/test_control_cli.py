"""`meshnode control ...` admin commands as an admin meets them (issue 10): what the help says they
do, and `nodes ls` showing who is online, against real daemons and a real control server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from meshnode.control.server import ControlServer, ServerConfig
from meshnode.control.store import ControlStore
from tests.integration.test_node_cluster import MESHNODE, Cluster, ControlThread
from tests.support import wait_until


class FastPresenceControl(ControlThread):
    """The control server with a short presence heartbeat, so LAST SEEN visibly moves."""

    def start(self) -> None:
        async def go() -> int:
            self.server = ControlServer(ControlStore(self.db),
                                        ServerConfig(poll_interval=0.05, presence_interval=0.2))
            return await self.server.start("127.0.0.1", self.port)
        self.port = self._run(go())


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, ("alpha", "bravo"))
    c.control.close()
    c.control = FastPresenceControl(c.db)
    try:
        yield c
    finally:
        c.close()


def ctl(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHNODE, "control", *args, "--db", str(cluster.db)], capture_output=True,
                          text=True, timeout=60)


def nodes(cluster: Cluster) -> dict[str, dict]:
    r = ctl(cluster, "nodes", "ls", "--json")
    assert r.returncode == 0, r.stderr
    return {n["name"]: n for n in json.loads(r.stdout)}


def test_nodes_ls_online_ephemeral_and_last_seen_after_a_control_restart(cluster: Cluster) -> None:
    alpha, bravo = cluster.nodes
    eph = cluster.admin.create_authkey("alice", reusable=True, ephemeral=True)[0]
    alpha.start()
    bravo.start()
    alpha.up(cluster.control, eph)
    bravo.up(cluster.control, cluster.authkey())
    bravo.stop()  # bravo goes offline
    wait_until(lambda: nodes(cluster)["bravo"]["online"] is False, timeout=5, what="bravo offline")
    r = ctl(cluster, "nodes", "ls")
    header, *rows = r.stdout.splitlines()
    assert "ONLINE" in header and "LAST SEEN" in header
    line = {row.split()[1]: row for row in rows}
    assert " yes " in line["alpha"] and " now " in line["alpha"] and "ephemeral" in line["alpha"]
    assert " no " in line["bravo"] and "ephemeral" not in line["bravo"]

    cluster.control.stop()
    assert nodes(cluster)["alpha"]["online"] is False  # a stopped server says nobody is online
    cluster.control.start()
    wait_until(lambda: nodes(cluster)["alpha"]["online"] is True, timeout=15, what="alpha reconnected")
    first = nodes(cluster)["alpha"]["last_seen"]
    # LAST SEEN keeps moving while alpha stays connected to the restarted server.
    wait_until(lambda: nodes(cluster)["alpha"]["last_seen"] > first + 0.1, timeout=5,
               what="alpha's last seen moving after the restart")
    assert nodes(cluster)["bravo"]["online"] is False


def test_none_clears_as_the_help_says_and_dns_show_prints_records(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    alpha.up(cluster.control, cluster.authkey())
    assert ctl(cluster, "dns", "nameservers", "set", "192.0.2.1", "192.0.2.2:5353").returncode == 0
    assert "192.0.2.1" in ctl(cluster, "dns", "show").stdout
    r = ctl(cluster, "dns", "nameservers", "set", "none")
    assert r.returncode == 0, r.stderr
    assert json.loads(ctl(cluster, "dns", "show", "--json").stdout)["nameservers"] == []
    assert "(system resolvers)" in ctl(cluster, "dns", "show").stdout
    r = ctl(cluster, "dns", "nameservers", "set", "192.0.2.1", "none")
    assert r.returncode == 2 and "give it alone" in r.stderr

    assert ctl(cluster, "nodes", "tag", "alpha", "tag:x,tag:y").returncode == 0
    assert nodes(cluster)["alpha"]["tags"] == ["tag:x", "tag:y"]
    r = ctl(cluster, "nodes", "tag", "alpha", "none")
    assert r.returncode == 0 and "(none)" in r.stdout
    assert nodes(cluster)["alpha"]["tags"] == []
    # ...and the node sees it.
    wait_until(lambda: alpha.api().request("GET", "/status")["self"]["tags"] == [], timeout=5,
               what="tags cleared in alpha's map")

    assert ctl(cluster, "dns", "search-domains", "set", "corp.example").returncode == 0
    assert ctl(cluster, "dns", "search-domains", "set", "none").returncode == 0
    assert json.loads(ctl(cluster, "dns", "show", "--json").stdout)["search_domains"] == []

    rec = subprocess.run([sys.executable, "-c", "from magicdns.cli import main; main()", "records", "--db",
                          str(cluster.db), "add", "wiki", "A", "100.64.9.9"], capture_output=True, text=True,
                         timeout=60)
    assert rec.returncode == 0, rec.stderr
    out = ctl(cluster, "dns", "show").stdout
    assert "records:         1" in out
    assert any("wiki." in ln and "A" in ln.split() and "100.64.9.9" in ln for ln in out.splitlines()), out


def test_authkey_for_a_missing_user_needs_create_user(cluster: Cluster) -> None:
    r = ctl(cluster, "authkey", "create", "--user", "bob@example.com")
    assert r.returncode == 1 and "no user 'bob@example.com'" in r.stderr and "--create-user" in r.stderr
    assert "bob@example.com" not in ctl(cluster, "users", "ls").stdout  # nothing half-made
    r = ctl(cluster, "authkey", "create", "--user", "bob@example.com", "--create-user")
    assert r.returncode == 0 and r.stdout.startswith("mskey-")
    r = ctl(cluster, "authkey", "create", "--user", "bob@example.com")  # exists now
    assert r.returncode == 0, r.stderr
    assert ctl(cluster, "authkey", "create").returncode == 0  # the default user is made when needed
