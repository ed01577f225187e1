"""tls:// and https:// upstreams against a real DoT/DoH server from Debian: unbound (built with
nghttp2, so it serves DoT on tls-port and DoH on https-port), with a test CA, on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.integration.magicdns_proc import MagicDnsProcess, start_magicdns
from tests.integration.tls_helpers import make_ca, make_leaf, write_pair
from tests.support import free_port, stop_process, wait_until

pytestmark = pytest.mark.skipif(shutil.which("unbound") is None, reason="unbound is not installed")

NAME = "ub.test"


class Unbound:
    def __init__(self, root: Path, ca, answer: str = "192.0.2.10", idle_ms: int = 30000) -> None:  # noqa: ANN001
        self.dir = root
        root.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = write_pair(root, make_leaf(ca, (NAME,)))
        self.dot, self.doh = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
        self.conf = root / "unbound.conf"
        self.conf.write_text(f"""server:
  interface: 127.0.0.1@{self.dot}
  interface: 127.0.0.1@{self.doh}
  tls-port: {self.dot}
  https-port: {self.doh}
  tls-service-key: "{self.key}"
  tls-service-pem: "{self.cert}"
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{root}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  tcp-idle-timeout: {idle_ms}
  local-zone: "upstream.test." static
  local-data: "www.upstream.test. 120 IN A {answer}"
""")
        self.log = root / "unbound.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Unbound":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["unbound", "-d", "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.dot)) == 0
        wait_until(up, timeout=10, what="unbound to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@pytest.fixture
def pki(tmp_path: Path) -> dict:
    ca = make_ca("upstream CA")
    return {"ca": ca, "ca_file": ca.write(tmp_path / "ca.pem")}


@pytest.fixture
def unbound(tmp_path: Path, pki: dict):
    u = Unbound(tmp_path / "ub", pki["ca"]).start()
    yield u
    u.stop()


def ask(server: MagicDnsProcess, name: str = "www.upstream.test", timeout: float = 6.0) -> dns.message.Message:
    q = dns.message.make_query(name, "A", use_edns=0)
    return dns.query.udp(q, "127.0.0.1", port=server.port, timeout=timeout)


def serve(*args: str, env: dict | None = None) -> MagicDnsProcess:
    old = dict(os.environ)
    if env:
        os.environ.update(env)
    try:
        return start_magicdns(*args)
    finally:
        os.environ.clear()
        os.environ.update(old)


@pytest.mark.parametrize("kind", ["tls", "https"])
def test_answers_are_forwarded_over_one_reused_connection(unbound: Unbound, pki: dict, kind: str) -> None:
    up = f"tls://{NAME}@127.0.0.1:{unbound.dot}" if kind == "tls" else f"https://{NAME}@127.0.0.1:{unbound.doh}/dns-query"
    server = serve("--upstream", up, "--upstream-ca", str(pki["ca_file"]))
    try:
        r = ask(server)
        assert r.rcode() == dns.rcode.NOERROR and "192.0.2.10" in r.to_text()
        # Many distinct names at once (cache misses): all on one TLS connection.
        qs = [dns.message.make_query(f"n{i}.upstream.test", "A") for i in range(40)]
        socks = []
        for q in qs:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(6)
            s.sendto(q.to_wire(), ("127.0.0.1", server.port))
            socks.append(s)
        for s in socks:
            reply = dns.message.from_wire(s.recv(4096))
            assert reply.rcode() == dns.rcode.NXDOMAIN  # unbound's static zone answers
            s.close()
        port = unbound.dot if kind == "tls" else unbound.doh
        ss = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True)
        assert len([ln for ln in ss.stdout.splitlines() if ln.strip()]) == 1, ss.stdout
    finally:
        server.stop()


def ede_codes(r: dns.message.Message) -> list[int]:
    return [o.code for o in r.options if isinstance(o, dns.edns.EDEOption)]


@pytest.mark.parametrize("kind", ["tls", "https"])
def test_wrong_name_or_untrusted_ca_is_servfail_with_ede_and_one_log_line(unbound: Unbound, pki: dict,
                                                                          kind: str) -> None:
    where = f"127.0.0.1:{unbound.dot}" if kind == "tls" else f"127.0.0.1:{unbound.doh}/dns-query"
    wrong = serve("--upstream", f"{kind}://wrong.test@{where}", "--upstream-ca", str(pki["ca_file"]))
    try:
        r = ask(wrong)
        assert r.rcode() == dns.rcode.SERVFAIL and not r.answer and ede_codes(r), r.to_text()
        ask(wrong, "www2.upstream.test")
        lines = [ln for ln in wrong.log().splitlines() if "Hostname mismatch" in ln]
        assert len(lines) == 1, wrong.log()
    finally:
        wrong.stop()
    untrusted = serve("--upstream", f"{kind}://{NAME}@{where}")  # the system store only
    try:
        r = ask(untrusted)
        assert r.rcode() == dns.rcode.SERVFAIL and not r.answer
        assert "certificate not accepted" in untrusted.log()
    finally:
        untrusted.stop()


def test_ssl_cert_file_is_honoured(unbound: Unbound, pki: dict) -> None:
    server = serve("--upstream", f"tls://{NAME}@127.0.0.1:{unbound.dot}", env={"SSL_CERT_FILE": str(pki["ca_file"])})
    try:
        assert "192.0.2.10" in ask(server).to_text()
    finally:
        server.stop()


def test_expired_upstream_certificate_is_refused(tmp_path: Path, pki: dict) -> None:
    now = time.time()
    ub = Unbound(tmp_path / "old", pki["ca"])
    write_pair(ub.dir, make_leaf(pki["ca"], (NAME,), not_before=now - 7200, not_after=now - 60))
    ub.start()
    server = serve("--upstream", f"tls://{NAME}@127.0.0.1:{ub.dot}", "--upstream-ca", str(pki["ca_file"]))
    try:
        r = ask(server)
        assert r.rcode() == dns.rcode.SERVFAIL and not r.answer
        assert "expired" in server.log()
    finally:
        server.stop()
        ub.stop()


def test_failover_to_the_next_upstream_within_the_bound(tmp_path: Path, pki: dict) -> None:
    first = Unbound(tmp_path / "a", pki["ca"], answer="192.0.2.10").start()
    second = Unbound(tmp_path / "b", pki["ca"], answer="192.0.2.10").start()
    server = serve("--upstream", f"tls://{NAME}@127.0.0.1:{first.dot}",
                   "--upstream", f"https://{NAME}@127.0.0.1:{second.doh}/dns-query",
                   "--upstream-ca", str(pki["ca_file"]))
    try:
        assert "192.0.2.10" in ask(server).to_text()
        first.stop()  # its connection breaks; new connections are refused
        for i in range(5):
            start = time.monotonic()
            r = ask(server, f"x{i}.upstream.test")
            assert r.rcode() == dns.rcode.NXDOMAIN, r.to_text()
            assert time.monotonic() - start < 3.0  # within the forward timeout (2.5 s)
    finally:
        server.stop()
        first.stop()
        second.stop()


def test_upstream_given_by_name_is_resolved_through_the_stub(unbound: Unbound, pki: dict, tmp_path: Path) -> None:
    """`tls://NAME:PORT` and `https://NAME:PORT/dns-query` (no @IP): NAME's addresses come from the
    bootstrap resolver (here a resolver of the test's own that knows ub.test) when the upstream is
    connected to, never from ourselves (tests/integration/test_upstream_names.py has the details)."""
    import json

    view = tmp_path / "sys.json"
    view.write_text(json.dumps({"domain": "test", "self": {"name": "sys", "addresses": ["100.64.9.1"]},
                                "peers": [], "version": 1,
                                "dns": {"records": [{"name": "ub.test", "type": "A", "value": "127.0.0.1"}]}}))
    system = start_magicdns(view=str(view), db=False, probe="ub.test")
    try:
        for spec in (f"tls://{NAME}:{unbound.dot}", f"https://{NAME}:{unbound.doh}/dns-query"):
            server = serve("--upstream", spec, "--bootstrap-dns", f"127.0.0.1:{system.port}",
                           "--upstream-ca", str(pki["ca_file"]))
            try:
                assert "192.0.2.10" in ask(server).to_text()
            finally:
                server.stop()
    finally:
        system.stop()


@pytest.mark.parametrize("kind", ["tls", "https"])
def test_a_connection_the_upstream_closed_while_idle_is_replaced(tmp_path: Path, pki: dict, kind: str) -> None:
    ub = Unbound(tmp_path / "idle", pki["ca"], idle_ms=300).start()
    up = f"tls://{NAME}@127.0.0.1:{ub.dot}" if kind == "tls" else f"https://{NAME}@127.0.0.1:{ub.doh}/dns-query"
    server = serve("--upstream", up, "--upstream-ca", str(pki["ca_file"]))
    port = ub.dot if kind == "tls" else ub.doh
    try:
        assert "192.0.2.10" in ask(server).to_text()

        def established() -> int:
            ss = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                                capture_output=True, text=True)
            return len([ln for ln in ss.stdout.splitlines() if ln.strip()])
        wait_until(lambda: established() == 0, timeout=10, what="unbound to close the idle connection")
        for i in range(3):
            r = ask(server, f"y{i}.upstream.test")
            assert r.rcode() == dns.rcode.NXDOMAIN, r.to_text()
    finally:
        server.stop()
        ub.stop()


def test_our_own_doh_listener_as_the_upstream_and_an_http_error(tmp_path: Path, pki: dict) -> None:
    """ngh2 at both ends: a resolver forwarding to `https://NAME@IP/dns-query` of another magicdns's
    DoH listener gets its answers; the same upstream with a path the listener does not serve answers
    404 on the stream, which is SERVFAIL for the client (twice: the connection outlives the error)
    and a log line naming the status."""
    from tests.integration.test_encrypted_dns import encrypted_ports
    cert, key = write_pair(tmp_path, make_leaf(pki["ca"], (NAME,)))
    up = start_magicdns("--doh", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key))
    good = bad = None
    try:
        port = encrypted_ports(up)["doh"]
        # TXT records: the forwarding resolver drops forwarded A records inside the tailnet ranges,
        # and --domain keeps it from answering for "tailnet" itself.
        good = start_magicdns("--upstream", f"https://{NAME}@127.0.0.1:{port}/dns-query", "--domain", "b.test",
                              "--upstream-ca", str(pki["ca_file"]), view=None, probe=None)
        for name, text in (("tailnet", "v=spf1 -all"), ("dev.tailnet", "preview environments")):
            r = dns.query.udp(dns.message.make_query(name, "TXT"), "127.0.0.1", port=good.port, timeout=6)
            assert r.rcode() == dns.rcode.NOERROR and text in r.to_text(), r.to_text()
        bad = start_magicdns("--upstream", f"https://{NAME}@127.0.0.1:{port}/not-dns", "--domain", "b.test",
                             "--upstream-ca", str(pki["ca_file"]), "--log-level", "debug", view=None, probe=None)
        for _ in range(2):
            r = dns.query.udp(dns.message.make_query("tailnet", "TXT"), "127.0.0.1", port=bad.port, timeout=6)
            assert r.rcode() == dns.rcode.SERVFAIL and not r.answer, r.to_text()
        assert "HTTP status 404" in bad.log(), bad.log()[-3000:]
        assert "Traceback" not in bad.log() + up.log()
    finally:
        for s in (good, bad, up):
            if s is not None:
                s.stop()
