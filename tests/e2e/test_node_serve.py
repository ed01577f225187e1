"""End to end, `meshnode serve` (issue 10) on the bridged LAN of test_node_tunnel.py: three node
daemons with `--tun` in their own namespaces and a control server, under a policy that lets bob's
node reach alice's server on ports 80 and 2222 only.

    bob   -> curl http://my-server.tailnet/     the local web server answers; it sees
                                                Tailscale-User-Login: bob@example.com, even when
                                                bob's client forged that header
    bob   -> https://my-server.tailnet:8443/    (--https) the same over TLS, verified against the
                                                tailnet CA from `meshnode cert --ca`; curl with the
                                                system store alone fails verification
    bob   -> my-server.tailnet:2222 (--tcp)     a 2 MB stream reaches a local TCP service; the
                                                SHA-256 it answers matches what was sent
    other -> my-server.tailnet:80               dropped by the packet filter (the policy decides)
    a port already in use                       refused with a clear message, nothing saved
    daemon restart                              serve comes back from serve.json
    foreground serve, Ctrl+C                    the port stops being served
    --shields-up                                new inbound connections dropped, ping replies pass
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.test_node_tunnel import MESHNODE, Lan, run, sh
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]

# The local web service on my-server: answers with the request's headers as JSON.
HEADERS_SERVER = """
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8080), H).serve_forever()
"""
# The local TCP service: reads until EOF, answers the SHA-256 of what it read.
SHA_SERVER = """
import hashlib, socket
s = socket.create_server(("127.0.0.1", 2200))
while True:
    c, _ = s.accept()
    h = hashlib.sha256()
    while data := c.recv(65536):
        h.update(data)
    c.sendall(h.hexdigest().encode())
    c.close()
"""
# Sends N pseudo-random bytes (seeded) to host:port, half-closes, prints the answer.
SHA_CLIENT = """
import random, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(7).randbytes(n)
addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
s = socket.socket(); s.settimeout(10)
s.connect(addr)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
out = b""
while chunk := s.recv(4096):
    out += chunk
print(out.decode())
"""
# Something else listening on a port of my-server, to be refused.
SQUATTER = """
import socket, time
s = socket.create_server(("0.0.0.0", 8090))
time.sleep(600)
"""
STREAM_BYTES = 2 * 1024 * 1024
POLICY = {"tagOwners": {"tag:other": []},
          "acls": [{"action": "accept", "src": ["bob@example.com"], "dst": ["alice@example.com:80,2222,8081,8443"]},
                   # tag:other sees my-server (port 9999 only), so it is the filter that stops it on 80
                   {"action": "accept", "src": ["tag:other"], "dst": ["alice@example.com:9999"]},
                   # my-server may reach bob (its pings, with shields up, must still get replies)
                   {"action": "accept", "src": ["alice@example.com"], "dst": ["bob@example.com:*"]}]}


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Lan]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    t = Lan(tmp_path, 3)
    try:
        t.build()
        yield t
    finally:
        t.destroy()


class Net:
    def __init__(self, lan: Lan) -> None:
        self.lan = lan
        self.db = lan.root / "control.db"
        self.daemons: dict[int, subprocess.Popen[bytes]] = {}

    def sock(self, i: int) -> Path:
        return self.lan.root / f"node{i}" / "mn.sock"

    def start_daemon(self, i: int) -> None:
        d = self.lan.root / f"node{i}"
        d.mkdir(exist_ok=True)
        ns = self.lan.nodes[i - 1]
        self.daemons[i] = self.lan.popen(ns, *MESHNODE, "daemon", "--state-dir", str(d / "state"),
                                         "--socket", str(d / "mn.sock"), "--tun", "mn0", "--resolv-conf",
                                         f"/etc/netns/{ns}/resolv.conf", "-v", log=d / "daemon.log")
        wait_until(lambda: self.cli(i, "status", "--json", check=False).returncode == 0, timeout=20,
                   what=f"node{i}'s daemon")

    def stop_daemon(self, i: int) -> None:
        proc = self.daemons.pop(i)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)

    def cli(self, i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.lan.nodes[i - 1], *MESHNODE, "--socket", str(self.sock(i)),
                   *args, check=check, timeout=60)

    def status(self, i: int) -> dict[str, Any]:
        return json.loads(self.cli(i, "status", "--json").stdout)

    def control(self, *args: str) -> str:
        return run(*MESHNODE, "control", *args, "--db", str(self.db)).stdout.strip()


def curl(ns: str, url: str, *extra: str, timeout: float = 3) -> tuple[int, str]:
    r = sh(ns, "curl", "-s", "--max-time", str(timeout), *extra, url, timeout=timeout + 20)
    return r.returncode, r.stdout


def headers_seen(ns: str, url: str, *extra: str) -> dict[str, str] | None:
    code, out = curl(ns, url, *extra)
    if code != 0:
        return None
    return {k.lower(): v for k, v in json.loads(out)["headers"].items()}


def test_serve_http_and_tcp_with_identity_acl_restart_and_shields(lan: Lan) -> None:
    net = Net(lan)
    lan.popen(lan.ctl, *MESHNODE, "control", "serve", "--listen", "10.78.0.1:8080", "--db", str(net.db),
              log=lan.root / "control.log")
    wait_until(lambda: net.db.exists(), timeout=20, what="the control database")
    (lan.root / "policy.json").write_text(json.dumps(POLICY))
    wait_until(lambda: run(*MESHNODE, "control", "policy", "set", str(lan.root / "policy.json"), "--db",
                           str(net.db), check=False).returncode == 0, timeout=20, what="policy set")
    keys = [net.control("authkey", "create", "--user", "alice@example.com", "--create-user"),
            net.control("authkey", "create", "--user", "bob@example.com", "--create-user"),
            net.control("authkey", "create", "--user", "carol@example.com", "--create-user", "--tags", "tag:other")]
    for i in (1, 2, 3):
        net.start_daemon(i)
    wait_until(lambda: sh(lan.nodes[0], sys.executable, "-c", "import socket; socket.create_connection("
                          "('10.78.0.1', 8080), 1).close()").returncode == 0, timeout=20, what="control server")
    for i, name in ((1, "my-server"), (2, "bob-laptop"), (3, "other")):
        net.cli(i, "up", "--login-server", "http://10.78.0.1:8080", "--authkey", keys[i - 1], "--hostname", name)
    server_ns, bob_ns, other_ns = lan.nodes
    lan.popen(server_ns, sys.executable, "-c", HEADERS_SERVER, log=lan.root / "http.log")
    lan.popen(server_ns, sys.executable, "-c", SHA_SERVER, log=lan.root / "sha.log")

    # Serving needs nothing but the CLI.
    r = net.cli(1, "serve", "--http", "80", "http://127.0.0.1:8080", "--bg")
    assert "Serving http://127.0.0.1:8080 on http port 80" in r.stdout
    net.cli(1, "serve", "--tcp", "2222", "tcp://127.0.0.1:2200", "--bg")
    st = json.loads(net.cli(1, "serve", "status", "--json").stdout)
    assert [(e["kind"], e["port"], e["error"]) for e in st["entries"]] == [("http", 80, None), ("tcp", 2222, None)]
    table = net.cli(1, "serve", "status").stdout
    assert "-> http://127.0.0.1:8080" in table and "listening on 100.64." in table

    # bob reaches the local web server by name, and it sees who bob is.
    seen = wait_until(lambda: headers_seen(bob_ns, "http://my-server.tailnet/hello?x=1"), timeout=20,
                      what="bob reaching my-server's web server through serve")
    assert seen["tailscale-user-login"] == "bob@example.com"
    assert seen["tailscale-user-name"] == "bob"
    bob_ip = net.cli(2, "ip", "-4").stdout.strip()
    assert seen["x-forwarded-for"] in net.cli(2, "ip").stdout.split()  # curl may come over IPv6
    # A forged identity header is replaced, never passed on.
    seen = headers_seen(bob_ns, "http://my-server.tailnet/", "-H", "Tailscale-User-Login: alice@example.com",
                        "-H", "Tailscale-User-Name: alice")
    assert seen is not None
    assert seen["tailscale-user-login"] == "bob@example.com" and seen["tailscale-user-name"] == "bob"
    # whois agrees with what the service was told.
    who = json.loads(net.cli(1, "whois", "--json", f"{bob_ip}:40000").stdout)
    assert who["user"] == "bob@example.com" and who["node"]["name"] == "bob-laptop"

    # --tcp carries a stream: the checksum the local service computed matches what bob sent.
    want = hashlib.sha256(__import__("random").Random(7).randbytes(STREAM_BYTES)).hexdigest()
    r = sh(bob_ns, sys.executable, "-c", SHA_CLIENT, "my-server.tailnet", "2222", str(STREAM_BYTES), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want

    # The policy decides: the tagged node sees my-server but has no rule for port 80: its SYN is
    # dropped by my-server's packet filter before serve ever sees it.
    dropped = net.status(1)["tunnel"]["filter"]["dropped"]["not_allowed"]
    code, _ = curl(other_ns, "http://my-server.tailnet/", timeout=2)
    assert code == 28  # curl: operation timed out (the SYN was dropped)
    assert net.status(1)["tunnel"]["filter"]["dropped"]["not_allowed"] > dropped

    # A port someone else listens on is refused, and not saved.
    lan.popen(server_ns, sys.executable, "-c", SQUATTER, log=lan.root / "squatter.log")
    wait_until(lambda: "8090" in sh(server_ns, "ss", "-ltn").stdout, timeout=10, what="the squatter")
    r = net.cli(1, "serve", "--http", "8090", "http://127.0.0.1:8080", "--bg", check=False)
    assert r.returncode == 1 and "already in use" in r.stderr, r.stderr
    assert [e["port"] for e in json.loads(net.cli(1, "serve", "status", "--json").stdout)["entries"]] == [80, 2222]

    # HTTPS with my-server's own certificate from the tailnet CA (requested by its daemon after `up`;
    # until it is issued, serve --https is refused with that reason).
    r = wait_until(lambda: (lambda r: r if r.returncode == 0 else None)(
        net.cli(1, "serve", "--https", "8443", "http://127.0.0.1:8080", "--bg", check=False)),
        timeout=30, what="serve --https once my-server's certificate is issued")
    assert "on https port 8443" in r.stdout
    ca_file = lan.root / "tailnet-ca.pem"
    ca_file.write_text(net.cli(2, "cert", "--ca").stdout)   # bob trusts the tailnet CA, by hand
    seen = wait_until(lambda: headers_seen(bob_ns, "https://my-server.tailnet:8443/tls", "--cacert", str(ca_file),
                                           "-H", "Tailscale-User-Login: alice@example.com"),
                      timeout=20, what="bob reaching my-server over HTTPS")
    assert seen["tailscale-user-login"] == "bob@example.com" and seen["x-forwarded-proto"] == "https"
    code, _ = curl(bob_ns, "https://my-server.tailnet:8443/")     # the system trust store alone
    assert code == 60  # curl: peer certificate cannot be authenticated with known CA certificates
    # A target off this machine is refused.
    r = net.cli(1, "serve", "--tcp", "2223", "tcp://10.78.0.1:22", check=False)
    assert r.returncode == 2 and "this machine only" in r.stderr

    # serve survives a daemon restart (serve.json in the state directory).
    net.stop_daemon(1)
    assert curl(bob_ns, "http://my-server.tailnet/", timeout=1)[0] != 0
    # Without its certificate the saved --https entry waits (status says why) and starts serving
    # once the daemon has a new one from the CA.
    (lan.root / "node1" / "state" / "tls" / "node.crt").unlink()
    net.start_daemon(1)
    seen = wait_until(lambda: headers_seen(bob_ns, "http://my-server.tailnet/"), timeout=30,
                      what="serve back after the restart")
    assert seen["tailscale-user-login"] == "bob@example.com"
    seen = wait_until(lambda: headers_seen(bob_ns, "https://my-server.tailnet:8443/", "--cacert", str(ca_file)),
                      timeout=30, what="serve --https back after the restart, with a new certificate")
    assert seen["tailscale-user-login"] == "bob@example.com"
    net.cli(1, "serve", "--https", "8443", "--off")

    # Foreground serve lasts until interrupted.
    fg = subprocess.Popen(["ip", "netns", "exec", server_ns, *MESHNODE, "--socket", str(net.sock(1)), "serve",
                           "--http", "8081", "http://127.0.0.1:8080"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: headers_seen(bob_ns, "http://my-server.tailnet:8081/"), timeout=20,
                   what="foreground serve on 8081")
        fg.send_signal(signal.SIGINT)
        out, err = fg.communicate(timeout=30)
        assert fg.returncode == 0, err
        assert "no longer served" in out
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait(5)
    assert [e["port"] for e in json.loads(net.cli(1, "serve", "status", "--json").stdout)["entries"]] == [80, 2222]

    # --off and reset.
    net.cli(1, "serve", "--tcp", "2222", "--off")
    assert [e["port"] for e in json.loads(net.cli(1, "serve", "status", "--json").stdout)["entries"]] == [80]

    # Shields up: new connections from the tailnet are dropped, the node's own pings get replies.
    net.cli(1, "set", "--shields-up")
    wait_until(lambda: curl(bob_ns, "http://my-server.tailnet/", timeout=1)[0] == 28, timeout=10,
               what="shields dropping bob's connection")
    assert "pong from" in net.cli(1, "ping", "-c", "2", "bob-laptop").stdout
    assert net.status(1)["tunnel"]["filter"]["shields_up"] is True
    net.cli(1, "set", "--shields-up=false")
    wait_until(lambda: headers_seen(bob_ns, "http://my-server.tailnet/"), timeout=10, what="shields down")

    net.cli(1, "serve", "reset")
    assert json.loads(net.cli(1, "serve", "status", "--json").stdout)["entries"] == []
    assert curl(bob_ns, "http://my-server.tailnet/", timeout=1)[0] != 0
