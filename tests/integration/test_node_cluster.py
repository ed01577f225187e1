"""A real control server and several real node daemons on loopback.

The control server runs in-process (its own loop thread); each node is a `meshnode daemon` subprocess
with its own state directory, LocalAPI socket, DNS listener (127.0.0.1:<port>) and resolv.conf in a
temp directory. Admin changes go through a second `ControlStore` on the same database, exactly as
the admin CLI makes them. Every propagation check waits on the condition with a one-second deadline.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from magicdns.records import parse_record
from meshnode.control.server import ControlServer, ServerConfig, set_policy
from meshnode.control.store import ControlStore
from meshnode.node.localclient import LocalApiRefused, LocalClient
from meshnode.node.resolvconf import is_ours, parse_resolv_conf
from tests.integration.upstreams import EXAMPLE_ZONE, FakeUpstream
from tests.support import free_port, stop_process, wait_until

PROPAGATION = 1.0  # seconds: the bound for a change to reach every node's DNS
MESHNODE = [sys.executable, "-c", "from meshnode.cli import main; main()"]
ORIGINAL_RESOLV = "# the machine's own\nnameserver 192.0.2.53\nsearch corp.example\n"


class ControlThread:
    """The coordination server on 127.0.0.1, on a private event loop thread."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: ControlServer | None = None
        self.start()

    def _run(self, coro):  # noqa: ANN001
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        async def go() -> int:
            self.server = ControlServer(ControlStore(self.db), ServerConfig(poll_interval=0.05))
            return await self.server.start("127.0.0.1", self.port)
        self.port = self._run(go())

    def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            self._run(server.stop())
            server.store.close()

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Node:
    """One `meshnode daemon` subprocess and what it owns."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir()
        self.state = self.dir / "state"
        self.sock = self.dir / "mn.sock"
        self.resolv = self.dir / "resolv.conf"
        self.resolv.write_text(ORIGINAL_RESOLV)
        self.dns_port = free_port()
        self.log = self.dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*MESHNODE, "daemon", "--state-dir", str(self.state), "--socket", str(self.sock),
                 "--userspace", "--dns-listen", f"127.0.0.1:{self.dns_port}", "--resolv-conf", str(self.resolv),
                 "--os", "testos", "-v", *extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self.api_up, timeout=15, what=f"{self.name}'s LocalAPI")

    def api_up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name}'s daemon exited: {self.log.read_text()[-2000:]}")
        try:
            self.api().request("GET", "/status")
            return True
        except Exception:
            return False

    def api(self) -> LocalClient:
        return LocalClient(self.sock, timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=15)
        self.proc = None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)
        self.proc = None

    def up(self, control: ControlThread, authkey: str | None, **extra: object) -> dict:
        body = {"login_server": control.url, "hostname": self.name, **extra}
        if authkey:
            body["authkey"] = authkey
        return self.api().request("POST", "/up", body)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MESHNODE, "--socket", str(self.sock), *args], capture_output=True, text=True,
                              timeout=60)

    def resolve(self, name: str, qtype: str = "A") -> tuple[str, frozenset[str]]:
        """(rcode, the answer's values) from this node's resolver, over UDP."""
        q = dns.message.make_query(name, qtype)
        r = dns.query.udp(q, "127.0.0.1", port=self.dns_port, timeout=0.5)
        values = frozenset(rd.to_text() for rrset in r.answer for rd in rrset
                           if rrset.rdtype == dns.rdatatype.from_text(qtype))
        return dns.rcode.to_text(r.rcode()), values


class Cluster:
    def __init__(self, root: Path, names: tuple[str, ...]) -> None:
        self.root = root
        self.db = root / "control.db"
        self.control = ControlThread(self.db)
        self.admin = ControlStore(self.db)  # a second writer, as `meshnode control ...` is
        self.nodes = [Node(root, n) for n in names]

    def authkey(self, tags: tuple[str, ...] = ()) -> str:
        return self.admin.create_authkey("alice", reusable=True, tags=tags)[0]

    def close(self) -> None:
        for n in self.nodes:
            n.stop()
        self.admin.close()
        self.control.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, ("alpha", "bravo", "charlie"))
    try:
        yield c
    finally:
        c.close()


def addresses_of(node: Node) -> frozenset[str]:
    st = node.api().request("GET", "/status")
    return frozenset(a for a in st["self"]["addresses"] if ":" not in a)


def all_resolve(nodes: list[Node], name: str, want: frozenset[str] | None) -> bool:
    """True when every node answers `name` with `want` (None: NXDOMAIN)."""
    for n in nodes:
        rcode, values = n.resolve(name)
        if want is None:
            if rcode != "NXDOMAIN":
                return False
        elif rcode != "NOERROR" or values != want:
            return False
    return True


def within(seconds: float, cond, what: str) -> float:  # noqa: ANN001
    start = time.monotonic()
    wait_until(cond, timeout=seconds, what=what)
    return time.monotonic() - start


def test_every_change_reaches_every_node_within_a_second(cluster: Cluster) -> None:
    alpha, bravo, charlie = cluster.nodes
    key_a = cluster.authkey(("tag:a",))
    for n in (alpha, bravo):
        n.start()
        n.up(cluster.control, key_a)
    ip_alpha, ip_bravo = addresses_of(alpha), addresses_of(bravo)
    assert all_resolve([alpha, bravo], "alpha.tailnet", ip_alpha)

    # Registration: a new node is answered by every node (itself included) within a second.
    charlie.start()
    charlie.up(cluster.control, cluster.authkey(("tag:b",)))
    ip_charlie = addresses_of(charlie)
    within(PROPAGATION, lambda: all_resolve(cluster.nodes, "charlie.tailnet", ip_charlie), "registration")
    assert all_resolve([charlie], "bravo.tailnet", ip_bravo)

    # Rename by the admin.
    cluster.admin.rename_node("bravo", "web")
    within(PROPAGATION, lambda: all_resolve(cluster.nodes, "web.tailnet", ip_bravo)
           and all_resolve(cluster.nodes, "bravo.tailnet", None), "rename")

    # Record change (the records table the control server serves in every map).
    cluster.admin.records.add(parse_record("grafana", "A", "100.64.9.9", 60, "tailnet"))
    within(PROPAGATION, lambda: all_resolve(cluster.nodes, "grafana.tailnet", frozenset({"100.64.9.9"})),
           "record add")
    cluster.admin.records.remove("grafana.tailnet")
    within(PROPAGATION, lambda: all_resolve(cluster.nodes, "grafana.tailnet", None), "record removal")

    # Policy change: tag:a reaches only tag:a, so charlie (tag:b) vanishes from alpha and web,
    # and charlie sees nobody but itself.
    set_policy(cluster.admin, json.dumps({
        "tagOwners": {"tag:a": [], "tag:b": []},
        "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["tag:a:*"]}]}))
    within(PROPAGATION, lambda: all_resolve([alpha, bravo], "charlie.tailnet", None)
           and all_resolve([charlie], "alpha.tailnet", None)
           and all_resolve([charlie], "charlie.tailnet", ip_charlie)
           and all_resolve([alpha, bravo], "alpha.tailnet", ip_alpha), "policy change")

    # Delete: the node disappears everywhere; the deleted node itself is told it is out.
    cluster.admin.delete_node("web")
    within(PROPAGATION, lambda: all_resolve([alpha], "web.tailnet", None), "delete")
    wait_until(lambda: bravo.api().request("GET", "/status")["backend_state"] == "NeedsLogin",
               timeout=5, what="the deleted node to learn it is out")
    assert bravo.resolv.read_text() == ORIGINAL_RESOLV  # and it gave the system its DNS back
    assert not (bravo.state / "netmap.json").exists()


def test_restarted_daemon_answers_at_once_from_its_saved_map_while_control_is_down(cluster: Cluster) -> None:
    alpha, bravo = cluster.nodes[:2]
    key = cluster.authkey()
    for n in (alpha, bravo):
        n.start()
        n.up(cluster.control, key)
    ip_bravo = addresses_of(bravo)
    wait_until(lambda: all_resolve([alpha], "bravo.tailnet", ip_bravo), timeout=PROPAGATION, what="bravo")
    # The map is saved just after it is served; a kill -9 in between would restart from the one before.
    wait_until(lambda: (m := alpha.api().request("GET", "/status")["map"])["saved_version"] == m["version"],
               timeout=5, what="alpha's map on disk")

    cluster.control.stop()
    alpha.kill9()
    alpha.start()  # returns as soon as the LocalAPI answers; the resolver starts before it
    rcode, values = alpha.resolve("bravo.tailnet")  # one try, no waiting
    assert (rcode, values) == ("NOERROR", ip_bravo)
    st = alpha.api().request("GET", "/status")
    assert st["backend_state"] == "Starting" and st["map"]["source"] == "saved"
    assert is_ours(alpha.resolv.read_text())
    # status says the control server is unreachable, and that the saved map is being served
    wait_until(lambda: (alpha.api().request("GET", "/status")["control"] or {}).get("error"), timeout=10,
               what="the broken map stream in status")
    st = alpha.api().request("GET", "/status")
    assert st["control"]["connected"] is False
    assert any("control server unreachable since" in h for h in st["health"])

    # When the control server is back, the node picks the stream up again by itself.
    cluster.control.start()
    wait_until(lambda: alpha.api().request("GET", "/status")["backend_state"] == "Running", timeout=15,
               what="reconnection")
    st = alpha.api().request("GET", "/status")
    assert st["control"]["connected"] is True and st["control"]["error"] is None
    assert not any("unreachable" in h for h in st["health"])


def test_resolv_conf_follows_up_down_and_accept_dns(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    assert alpha.resolv.read_text() == ORIGINAL_RESOLV  # nothing changes before `up`
    r = alpha.cli("up", "--login-server", cluster.control.url, "--authkey", cluster.authkey(),
                  "--hostname", "alpha")
    assert r.returncode == 0, r.stderr
    text = alpha.resolv.read_text()
    assert is_ours(text)
    rc = parse_resolv_conf(text)
    assert rc.nameservers == ("127.0.0.1",) and rc.search == ("tailnet", "corp.example")
    # Forwarding uses the original resolvers, never ourselves.
    dns_status = json.loads(alpha.cli("dns", "status", "--json").stdout)
    assert dns_status["resolver"]["forwarding_to"] == ["192.0.2.53"]
    assert dns_status["os"]["original_nameservers"] == ["192.0.2.53"]

    assert alpha.cli("down").returncode == 0
    assert alpha.resolv.read_text() == ORIGINAL_RESOLV
    st = alpha.api().request("GET", "/status")
    assert st["backend_state"] == "Stopped"
    with pytest.raises((OSError, dns.exception.Timeout)):
        alpha.resolve("alpha.tailnet")  # not serving while down

    # `up` again needs no auth key: the node key was kept.
    assert alpha.cli("up").returncode == 0
    assert is_ours(alpha.resolv.read_text())
    # `up` resets what it is not given (as tailscale's); `set` changes one setting.
    assert alpha.cli("up", "--accept-dns=false", "--hostname", "alpha").returncode == 0
    assert alpha.resolv.read_text() == ORIGINAL_RESOLV
    assert alpha.resolve("alpha.tailnet")[0] == "NOERROR"  # still serving, only the OS is left alone
    assert alpha.cli("set", "--accept-dns").returncode == 0
    assert is_ours(alpha.resolv.read_text())

    # Stopping the daemon (SIGTERM) restores the original too.
    alpha.stop()
    assert alpha.resolv.read_text() == ORIGINAL_RESOLV


def test_overwrite_of_our_resolv_conf_is_reported(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    alpha.up(cluster.control, cluster.authkey())
    alpha.resolv.write_text("nameserver 198.51.100.1\n")  # e.g. a DHCP client taking over
    wait_until(lambda: alpha.api().request("GET", "/dns/status")["os"]["drift"] == "overwritten",
               timeout=5, what="the overwrite to be noticed")
    out = alpha.cli("status").stdout
    assert "overwritten" in out
    assert "overwritten" in alpha.cli("dns", "status").stdout
    alpha.stop()
    assert alpha.resolv.read_text() == "nameserver 198.51.100.1\n"  # theirs is newer: kept


def test_crash_then_restart_restores_and_reapplies_resolv_conf(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    alpha.up(cluster.control, cluster.authkey())
    alpha.kill9()
    assert is_ours(alpha.resolv.read_text())  # a crash leaves ours behind...
    alpha.start()
    text = alpha.resolv.read_text()
    assert is_ours(text)  # ...the restart recovers the original, then points at itself again
    backup = alpha.state / "resolv.pre-meshnode.conf"
    assert backup.read_text() == ORIGINAL_RESOLV  # the backup is the original, not our own file
    alpha.cli("down")
    assert alpha.resolv.read_text() == ORIGINAL_RESOLV


def test_status_ip_and_query_through_the_cli(cluster: Cluster) -> None:
    alpha, bravo = cluster.nodes[:2]
    key = cluster.authkey(("tag:a",))
    for n in (alpha, bravo):
        n.start()
        n.up(cluster.control, key)
    wait_until(lambda: len(alpha.api().request("GET", "/status")["peers"]) == 1, timeout=PROPAGATION,
               what="bravo in alpha's map")
    st = json.loads(alpha.cli("status", "--json").stdout)
    assert st["self"]["name"] == "alpha" and st["backend_state"] == "Running"
    peer = st["peers"][0]
    assert peer["name"] == "bravo" and peer["tags"] == ["tag:a"] and peer["os"] == "testos"
    assert peer["online"] is True
    table = alpha.cli("status").stdout
    assert "bravo" in table and "tag:a" in table and "testos" in table

    v4 = alpha.cli("ip", "-4", "bravo").stdout.split()
    v6 = alpha.cli("ip", "-6", "bravo.tailnet").stdout.split()
    assert v4 == [a for a in peer["addresses"] if ":" not in a]
    assert v6 == [a for a in peer["addresses"] if ":" in a]
    assert alpha.cli("ip", v4[0]).stdout.split() == peer["addresses"]
    r = alpha.cli("ip", "nosuchpeer")
    assert r.returncode == 1 and "no peer" in r.stderr

    out = alpha.cli("dns", "query", "bravo.tailnet").stdout
    assert v4[0] in out and "NOERROR" in out
    out = json.loads(alpha.cli("dns", "query", "bravo.tailnet", "AAAA", "--json").stdout)
    assert [a["value"] for a in out["answer"]] == v6
    out = json.loads(alpha.cli("dns", "query", "nope.tailnet", "--json").stdout)
    assert out["rcode"] == "NXDOMAIN"
    for args in (("-x", v4[0]), (v4[0],), ("-x", v6[0])):  # an address asks for its PTR name, as dig -x
        out = json.loads(alpha.cli("dns", "query", *args, "--json").stdout)
        assert [(a["type"], a["value"]) for a in out["answer"]] == [("PTR", "bravo.tailnet.")], args
    assert alpha.cli("dns", "query", "-x", "bravo.tailnet").returncode == 2

    r = alpha.cli("ping", "bravo")
    assert r.returncode == 1 and "--tun" in r.stderr  # DNS-only nodes have no tunnel to ping through

    # Like tailscale, an exit node must be a visible peer approved as one.
    r = alpha.cli("set", "--exit-node", "nosuchpeer")
    assert r.returncode == 2 and "not a peer" in r.stderr
    r = alpha.cli("set", "--exit-node", "bravo")
    assert r.returncode == 2 and "not an approved exit node" in r.stderr
    assert json.loads(alpha.cli("status", "--json").stdout)["prefs"]["exit_node"] == ""


def test_logout_forgets_the_node_key_and_leaves_the_tailnet(cluster: Cluster) -> None:
    alpha, bravo = cluster.nodes[:2]
    key = cluster.authkey()
    for n in (alpha, bravo):
        n.start()
        n.up(cluster.control, key)
    ip_alpha = addresses_of(alpha)
    wait_until(lambda: all_resolve([bravo], "alpha.tailnet", ip_alpha), timeout=PROPAGATION, what="alpha")
    assert alpha.cli("logout").returncode == 0
    assert not (alpha.state / "node.key").exists()
    assert (alpha.state / "machine.key").exists()
    assert alpha.resolv.read_text() == ORIGINAL_RESOLV
    assert alpha.api().request("GET", "/status")["backend_state"] == "NeedsLogin"
    wait_until(lambda: all_resolve([bravo], "alpha.tailnet", None), timeout=PROPAGATION,
               what="alpha gone from bravo's map")
    with pytest.raises(LocalApiRefused, match="authkey|auth key"):
        alpha.up(cluster.control, None)
    # Logging in again with a key brings back the same name and addresses (same machine key).
    alpha.up(cluster.control, key)
    assert addresses_of(alpha) == ip_alpha


def test_bad_auth_key_is_refused_with_the_reason(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    r = alpha.cli("up", "--login-server", cluster.control.url, "--authkey", "mskey-bogus", "--hostname", "a")
    assert r.returncode == 1
    assert "authkey" in r.stderr.lower()
    assert alpha.resolv.read_text() == ORIGINAL_RESOLV
    assert not (alpha.state / "node.key").exists()


def test_corrupted_state_files(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    alpha.up(cluster.control, cluster.authkey())
    node_key = (alpha.state / "node.key").read_bytes()
    alpha.stop()

    # A torn map: moved aside, logged, and the node carries on (and gets a fresh map).
    (alpha.state / "netmap.json").write_text('{"format": 1, "netmap": {"version"')
    alpha.start()
    assert list(alpha.state.glob("netmap.json.corrupt-*"))
    assert "damaged" in alpha.log.read_text()
    wait_until(lambda: alpha.api().request("GET", "/status")["backend_state"] == "Running", timeout=10,
               what="a fresh map")
    assert (alpha.state / "node.key").read_bytes() == node_key
    alpha.stop()

    # An unreadable key: the daemon refuses to start, says why, and leaves the file alone.
    (alpha.state / "node.key").write_text("privkey:not-hex\n")
    r = subprocess.run([*MESHNODE, "daemon", "--state-dir", str(alpha.state), "--socket", str(alpha.sock),
                        "--userspace", "--dns-listen", f"127.0.0.1:{alpha.dns_port}",
                        "--resolv-conf", str(alpha.resolv)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "node.key: the key is not valid hex" in r.stderr and "refusing to create a new key" in r.stderr
    assert (alpha.state / "node.key").read_text() == "privkey:not-hex\n"
    assert alpha.resolv.read_text() == ORIGINAL_RESOLV


def test_names_outside_the_tailnet_are_forwarded_to_the_original_resolvers(cluster: Cluster) -> None:
    """The original resolv.conf's nameserver (a fake upstream on its own loopback address, port 53)
    answers everything outside the tailnet; our own address never becomes an upstream."""
    alpha = cluster.nodes[0]
    upstream_host = "127.77.0.53"
    running = FakeUpstream.start(upstream_host, 53, zone=EXAMPLE_ZONE)
    up = cluster.control._run(running.__aenter__())
    try:
        alpha.resolv.write_text(f"nameserver {upstream_host}\nnameserver 127.0.0.1\n")
        alpha.start()
        alpha.up(cluster.control, cluster.authkey())
        assert alpha.resolve("www.example.test") == ("NOERROR", frozenset({"192.0.2.10"}))
        assert any(b"www" in q for q in up.queries)
        forwarding = alpha.api().request("GET", "/dns/status")["resolver"]["forwarding_to"]
        assert forwarding == [upstream_host]  # 127.0.0.1 is where we listen: never forward to it
        assert alpha.resolve("alpha.tailnet")[0] == "NOERROR"
    finally:
        cluster.control._run(running.__aexit__(None, None, None))


def test_a_second_daemon_is_refused_and_changes_nothing(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    alpha.up(cluster.control, cluster.authkey())
    ours = alpha.resolv.read_text()
    other = cluster.root / "other"
    other.mkdir()
    base = [*MESHNODE, "daemon", "--userspace", "--dns-listen", f"127.0.0.1:{free_port()}",
            "--resolv-conf", str(alpha.resolv)]
    same_socket = subprocess.run([*base, "--state-dir", str(other / "state"), "--socket", str(alpha.sock)],
                                 capture_output=True, text=True, timeout=30)
    assert same_socket.returncode == 1 and "another meshnode daemon" in same_socket.stderr
    same_state = subprocess.run([*base, "--state-dir", str(alpha.state), "--socket", str(other / "s.sock")],
                                capture_output=True, text=True, timeout=30)
    assert same_state.returncode == 1 and "in use by another meshnode daemon" in same_state.stderr
    assert alpha.resolv.read_text() == ours
    assert alpha.resolve("alpha.tailnet")[0] == "NOERROR"
    assert alpha.api().request("GET", "/status")["backend_state"] == "Running"


def test_metrics_and_query_log(cluster: Cluster) -> None:
    import urllib.request
    alpha = cluster.nodes[0]
    port = free_port(socket.SOCK_STREAM)
    qlog = cluster.root / "queries.log"
    alpha.start("--metrics", f"127.0.0.1:{port}", "--query-log", str(qlog))
    alpha.up(cluster.control, cluster.authkey())
    for _ in range(3):
        assert alpha.resolve("alpha.tailnet")[0] == "NOERROR"
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    line = next(x for x in text.splitlines() if x.startswith('magicdns_queries_total{transport="udp"}'))
    assert float(line.split()[-1]) >= 3
    # The node's path and relay families are on the same listener; a DNS-only node has none.
    for series in ('meshnode_paths{type="direct"} 0', 'meshnode_paths{type="relay"} 0',
                   'meshnode_paths{type="none"} 0', "meshnode_disco_pings_sent_total 0",
                   'meshnode_relay_bytes_total{direction="sent"} 0', "meshnode_stun_queries_total 0",
                   'meshnode_relay_drops_total{reason="backlog"} 0', "meshnode_path_switches_total 0"):
        assert series in text.splitlines(), series
    with pytest.raises(urllib.error.HTTPError):  # only metrics: the resolver is not exposed over HTTP
        urllib.request.urlopen(f"http://127.0.0.1:{port}/query?name=alpha.tailnet", timeout=5)
    alpha.stop()
    assert "alpha.tailnet." in qlog.read_text()


def test_force_reauth_recovers_from_a_changed_server_key(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    key = cluster.authkey()
    alpha.up(cluster.control, key)
    ip_alpha = addresses_of(alpha)
    alpha.stop()
    # As if the control server had been reinstalled with a new key: our pin no longer matches.
    pin = json.loads((alpha.state / "control.json").read_text())
    from meshnode.control.protocol import generate_private_key, public_key_of
    other_key = public_key_of(generate_private_key())
    pin["server_public_key"] = other_key
    (alpha.state / "control.json").write_text(json.dumps(pin))
    alpha.start()
    r = alpha.cli("up")
    assert r.returncode == 1 and "--force-reauth" in r.stderr
    assert alpha.cli("up", "--force-reauth").returncode == 2  # needs an auth key
    r = alpha.cli("up", "--force-reauth", "--authkey", key)
    assert r.returncode == 0, r.stderr
    assert addresses_of(alpha) == ip_alpha  # same machine key: same node for the server
    assert json.loads((alpha.state / "control.json").read_text())["server_public_key"] != other_key
