"""The `meshnode` CLI as a Tailscale user meets it (issue 10): real daemons, a real control server,
every command run as a subprocess exactly as a user types it."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

from tests.integration.test_node_cluster import MESHNODE, Cluster, cluster  # noqa: F401 (fixture)
from tests.support import wait_until

REPR = re.compile(r"[A-Z][A-Za-z]+(Error|Key|Exception)\(")


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def test_up_against_a_down_server_says_what_failed_in_words(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    url = closed_port_url()
    r = alpha.cli("up", "--login-server", url, "--authkey", cluster.authkey(), "--timeout", "5")
    assert r.returncode == 1
    assert not REPR.search(r.stderr), r.stderr
    assert f"cannot reach the control server at {url}: connection refused" in r.stderr
    assert "is the control server running" in r.stderr
    assert r.stderr.count("connection refused") == 1
    # -v (before or after the command) adds the technical detail
    for args in (("-v", "up"), ("up", "-v")):
        r = alpha.cli(*args, "--login-server", url, "--authkey", cluster.authkey(), "--timeout", "5")
        assert r.returncode == 1 and "detail: " in r.stderr and "ClientConnectorError" in r.stderr


def test_up_against_something_else_than_a_control_server(cluster: Cluster, tmp_path: Path) -> None:
    """A mismatched server (an HTTP server that is not meshnode's) is named as such."""
    import http.server
    import threading

    class NotControl(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotControl)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        alpha = cluster.nodes[0]
        alpha.start()
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        r = alpha.cli("up", "--login-server", url, "--authkey", cluster.authkey(), "--timeout", "5")
        assert r.returncode == 1
        assert not REPR.search(r.stderr), r.stderr
        assert "does not answer like a meshnode control server" in r.stderr and "--login-server" in r.stderr
    finally:
        srv.shutdown()
        srv.server_close()


def test_control_down_is_said_once_in_status_and_log(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    alpha.up(cluster.control, cluster.authkey())
    cluster.control.stop()
    # Several backoff rounds pass (the daemon runs with -v: each round leaves a debug line).
    wait_until(lambda: alpha.log.read_text().count("reconnecting in") >= 4, timeout=20,
               what="several reconnection attempts")
    st = alpha.cli("status")
    assert "control server unreachable since" in st.stdout
    assert "connection refused" in st.stdout
    assert not REPR.search(st.stdout), st.stdout
    st_json = json.loads(alpha.cli("status", "--json").stdout)
    assert not REPR.search(json.dumps(st_json["health"]))
    log_lines = [ln for ln in alpha.log.read_text().splitlines() if "map stream" in ln]
    warnings = [ln for ln in log_lines if " WARNING " in ln]
    # Each reason once (the server closing the stream, then refusing connections), not per round.
    reasons = [ln.split("map stream: ", 1)[1] for ln in warnings]
    assert len(reasons) == len(set(reasons)) and len(reasons) <= 2, warnings
    assert any("cannot reach the control server" in r and "connection refused" in r for r in reasons)
    assert not REPR.search("\n".join(warnings))
    # The repr is kept for the debug lines only.
    assert any("DEBUG" in ln and "ClientConnectorError" in ln for ln in log_lines)
    cluster.control.start()
    wait_until(lambda: "connected again" in alpha.log.read_text(), timeout=15, what="reconnection logged")


def test_socket_after_the_command_and_in_help(cluster: Cluster) -> None:
    import subprocess
    alpha = cluster.nodes[0]
    alpha.start()
    r = subprocess.run([*MESHNODE, "status", "--json", "--socket", str(alpha.sock)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 or r.stdout  # answered by the daemon, not "not running"
    assert "not running" not in r.stderr
    assert json.loads(r.stdout)["backend_state"] == "NeedsLogin"
    r = subprocess.run([*MESHNODE, "--help"], capture_output=True, text=True, timeout=60)
    assert "MESHNODE_SOCKET" in r.stdout
    r = subprocess.run([*MESHNODE, "status", "--socket", str(alpha.dir / "nothing.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not running" in r.stderr and "nothing.sock" in r.stderr


def control_cli(cluster: Cluster, *args: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    return subprocess.run([*MESHNODE, "control", *args, "--db", str(cluster.db)], capture_output=True,
                          text=True, timeout=60)


def status_json(node) -> dict:  # noqa: ANN001
    r = node.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_advertised_routes_say_they_wait_for_approval_with_the_exact_command(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    r = alpha.cli("up", "--login-server", cluster.control.url, "--auth-key", cluster.authkey(),
                  "--hostname", "alpha", "--advertise-routes", "10.9.0.0/24", "--advertise-exit-node")
    assert r.returncode == 0, r.stderr
    assert "wait for approval" in r.stdout
    cmd = next(ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("meshnode control routes approve"))
    assert cmd == "meshnode control routes approve alpha 10.9.0.0/24,0.0.0.0/0,::/0"
    # The printed command, run as printed, approves exactly that.
    done = control_cli(cluster, *cmd.split()[2:])
    assert done.returncode == 0, done.stderr
    wait_until(lambda: status_json(alpha)["self"]["exit_node"], timeout=5, what="approval in the map")
    assert status_json(alpha)["self"]["approved_routes"] == ["10.9.0.0/24"]
    r = alpha.cli("up", "--advertise-routes", "10.9.0.0/24", "--advertise-exit-node", "--hostname", "alpha")
    assert r.returncode == 0 and "wait for approval" not in r.stdout, r.stdout + r.stderr


def email_key(cluster: Cluster) -> str:
    """A key for alice@example.com: policies name users by their e-mail form."""
    return cluster.admin.create_authkey("alice@example.com", reusable=True)[0]


def test_auto_approved_routes_say_nothing_about_approval(cluster: Cluster) -> None:
    from meshnode.control.access import set_policy
    set_policy(cluster.admin, json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
                                          "autoApprovers": {"routes": {"10.1.0.0/16": ["alice@example.com"]}}}))
    alpha = cluster.nodes[0]
    alpha.start()
    r = alpha.cli("up", "--login-server", cluster.control.url, "--authkey", email_key(cluster),
                  "--hostname", "alpha", "--advertise-routes", "10.1.2.0/24")
    assert r.returncode == 0, r.stderr
    assert "approval" not in r.stdout, r.stdout


def test_status_marks_exit_nodes_and_exits_nonzero_when_logged_out_or_stopped(cluster: Cluster) -> None:
    alpha, bravo, charlie = cluster.nodes
    key = cluster.authkey()
    alpha.start()
    r = alpha.cli("status")
    assert r.returncode == 1 and "Logged out" in r.stdout
    for n in (alpha, bravo, charlie):
        if n is not alpha:
            n.start()
    bravo.up(cluster.control, key, advertise_exit_node=True)
    charlie.up(cluster.control, key, advertise_exit_node=True)
    for name in ("bravo", "charlie"):
        assert control_cli(cluster, "routes", "approve", name, "0.0.0.0/0,::/0").returncode == 0
    alpha.up(cluster.control, key)
    wait_until(lambda: sum(p["offers_exit_node"] for p in status_json(alpha)["peers"]) == 2, timeout=5,
               what="both exit nodes in alpha's map")
    r = alpha.cli("set", "--exit-node", "bravo")
    assert r.returncode == 0, r.stderr
    assert "--exit-node: none -> bravo" in r.stdout
    r = alpha.cli("status")
    assert r.returncode == 0
    line = {ln.split()[1]: ln for ln in r.stdout.splitlines() if ln[:1].isdigit()}
    assert "exit node" in line["bravo"] and "offers" not in line["bravo"]
    assert "offers exit node" in line["charlie"]
    peers = {p["name"]: p for p in status_json(alpha)["peers"]}
    assert peers["bravo"]["exit_node_in_use"] and not peers["charlie"]["exit_node_in_use"]
    # --self=false / --peers=false
    r = alpha.cli("status", "--self=false")
    assert "alpha" not in r.stdout and "bravo" in r.stdout
    r = alpha.cli("status", "--peers=false")
    assert "alpha" in r.stdout and "bravo" not in r.stdout
    r = alpha.cli("status", "--active")  # userspace nodes: no tunnel, so no peer is active
    assert "bravo" not in r.stdout and "alpha" in r.stdout
    assert status_json(alpha)["schema"] == 1
    assert alpha.cli("down").returncode == 0
    r = alpha.cli("status")
    assert r.returncode == 1 and "stopped" in r.stdout
    assert alpha.cli("status", "--json").returncode == 0


def test_up_resets_what_is_not_given_only_when_asked(cluster: Cluster) -> None:
    alpha, bravo = cluster.nodes[:2]
    key = cluster.authkey()
    alpha.start()
    r = alpha.cli("up", "--login-server", cluster.control.url, "--authkey", key, "--hostname", "alpha",
                  "--accept-routes", "--advertise-routes=10.9.0.0/24")
    assert r.returncode == 0, r.stderr
    # Leaving --accept-routes and --advertise-routes out would reset them: refused, with the list.
    r = alpha.cli("up", "--hostname", "alpha", "--accept-dns=false")
    assert r.returncode == 1
    assert "--accept-routes: true -> false" in r.stderr and "--advertise-routes: 10.9.0.0/24 -> none" in r.stderr
    assert "--reset" in r.stderr
    assert "meshnode up --hostname=alpha --accept-dns=false --accept-routes --advertise-routes=10.9.0.0/24" in r.stderr
    prefs = status_json(alpha)["prefs"]
    assert prefs["accept_routes"] and prefs["accept_dns"]  # nothing was half-applied
    # A bare `up` keeps everything.
    assert alpha.cli("up").returncode == 0
    assert status_json(alpha)["prefs"]["advertise_routes"] == ["10.9.0.0/24"]
    # `set` changes one thing.
    r = alpha.cli("set", "--accept-dns=false")
    assert r.returncode == 0 and "--accept-dns: true -> false" in r.stdout
    prefs = status_json(alpha)["prefs"]
    assert not prefs["accept_dns"] and prefs["accept_routes"] and prefs["advertise_routes"] == ["10.9.0.0/24"]
    # --reset resets.
    r = alpha.cli("up", "--hostname", "alpha", "--reset")
    assert r.returncode == 0, r.stderr
    prefs = status_json(alpha)["prefs"]
    assert prefs["accept_dns"] and not prefs["accept_routes"] and prefs["advertise_routes"] == []
    # `set` while stopped keeps the change for the next `up`.
    assert alpha.cli("down").returncode == 0
    assert alpha.cli("set", "--shields-up").returncode == 0
    assert status_json(alpha)["backend_state"] == "Stopped"
    assert alpha.cli("up").returncode == 0
    assert status_json(alpha)["prefs"]["shields_up"] is True
    r = alpha.cli("set")
    assert r.returncode == 2 and "nothing to set" in r.stderr


def test_advertise_tags_empty_clears_and_refused_tags_say_how_to_drop_them(cluster: Cluster) -> None:
    from meshnode.control.access import set_policy
    allow = {"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}], "tagOwners": {"tag:web": ["alice@example.com"]}}
    set_policy(cluster.admin, json.dumps(allow))
    alpha = cluster.nodes[0]
    alpha.start()
    r = alpha.cli("up", "--login-server", cluster.control.url, "--authkey", email_key(cluster),
                  "--hostname", "alpha", "--advertise-tags", "tag:web")
    assert r.returncode == 0, r.stderr
    assert status_json(alpha)["self"]["tags"] == ["tag:web"]
    assert alpha.cli("down").returncode == 0
    set_policy(cluster.admin, json.dumps({"acls": allow["acls"]}))  # nobody may own tag:web now
    r = alpha.cli("up")
    assert r.returncode == 1
    assert "tag:web" in r.stderr and "--advertise-tags=" in r.stderr, r.stderr
    r = alpha.cli("up", "--hostname", "alpha", "--advertise-tags=")
    assert r.returncode == 0, r.stderr
    assert status_json(alpha)["prefs"]["advertise_tags"] == []


def test_whois_and_version(cluster: Cluster) -> None:
    alpha, bravo = cluster.nodes[:2]
    alpha.start()
    bravo.start()
    alpha.up(cluster.control, cluster.authkey())
    bravo.up(cluster.control, cluster.authkey(("tag:srv",)))
    ip_b = next(a for a in status_json(bravo)["self"]["addresses"] if ":" not in a)
    wait_until(lambda: status_json(alpha)["peers"], timeout=5, what="bravo in alpha's map")
    for arg in (ip_b, f"{ip_b}:443"):
        r = alpha.cli("whois", arg)
        assert r.returncode == 0, r.stderr
        assert "bravo.tailnet" in r.stdout and "tag:srv" in r.stdout and "alice" in r.stdout
    r = alpha.cli("whois", "--json", "100.127.255.254")
    assert r.returncode == 1 and "not the address of any node" in r.stderr
    r = alpha.cli("whois", "not-an-ip")
    assert r.returncode == 2
    r = alpha.cli("version")
    assert r.returncode == 0, r.stderr
    assert "All versions match" in r.stdout and cluster.control.url in r.stdout
    import subprocess
    r = subprocess.run([*MESHNODE, "--socket", str(alpha.sock), "--version"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "CLI:" in r.stdout and "daemon:" in r.stdout
    report = json.loads(alpha.cli("version", "--json").stdout)
    assert report["match"] is True and report["control"]["version"] == report["cli"]
    cluster.control.stop()
    report = json.loads(alpha.cli("version", "--json").stdout)
    assert report["control"]["version"] is None and "cannot reach" in report["control"]["error"]


def test_serve_needs_the_tunnel_and_says_so(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    alpha.up(cluster.control, cluster.authkey())
    r = alpha.cli("serve", "--http", "8080", "http://127.0.0.1:3000", "--bg")
    assert r.returncode == 1 and "--tun" in r.stderr
    r = alpha.cli("serve", "status")
    assert r.returncode == 0 and "Nothing is served" in r.stdout
    assert json.loads(alpha.cli("serve", "status", "--json").stdout)["entries"] == []
    assert alpha.cli("serve", "--http", "8080").returncode == 2            # no target
    assert alpha.cli("serve", "--http", "80", "--tcp", "81", "x").returncode == 2
    r = alpha.cli("serve", "--https", "443", "http://127.0.0.1:3000")
    assert r.returncode == 1 and "certificate authority" in r.stderr
    r = alpha.cli("serve", "--http", "80", "--off")
    assert r.returncode == 1 and "not served" in r.stderr
