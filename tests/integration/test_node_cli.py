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
