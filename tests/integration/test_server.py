"""`magicdns serve` as a real process, asked by real clients: dig, kdig, dnspython; UDP and TCP."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.integration.magicdns_proc import MAGICDNS, ROOT, MagicDnsProcess, run_cli, start_magicdns
from tests.support import free_port, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> MagicDnsProcess:
    work = tmp_path_factory.mktemp("srv")
    view = json.loads((ROOT / "conf" / "view.json").read_text())
    view["peers"].append({"name": "many", "addresses": [f"100.64.1.{i}" for i in range(1, 81)]})
    view_path = work / "view.json"
    view_path.write_text(json.dumps(view))
    metrics_port = free_port(kind=socket.SOCK_STREAM)
    srv = start_magicdns("--metrics", f"127.0.0.1:{metrics_port}", view=str(view_path), workdir=str(work))
    srv.extra["metrics_port"] = metrics_port
    srv.extra["view_path"] = view_path
    yield srv
    srv.stop()


def dig(server: MagicDnsProcess, *args: str) -> str:
    out = subprocess.run(["dig", f"@{server.host}", "-p", str(server.port), "+time=2", "+tries=1", *args],
                         capture_output=True, text=True, timeout=20)
    return out.stdout


needs_dig = pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed")
needs_kdig = pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig not installed")


@needs_dig
def test_dig_answers_node_names(server: MagicDnsProcess) -> None:
    out = dig(server, "my-server.tailnet", "A")
    assert "status: NOERROR" in out and "flags: qr aa rd ra" in out
    assert "my-server.tailnet.\t300\tIN\tA\t100.64.0.2" in out
    short = dig(server, "+short", "db.tailnet", "A").split()
    assert sorted(short) == ["100.64.0.3", "100.64.0.4"]
    assert dig(server, "+short", "my-server.tailnet", "AAAA").strip() == "fd7a:115c:a1e0::2"


@needs_dig
def test_dig_nxdomain_has_soa(server: MagicDnsProcess) -> None:
    out = dig(server, "nobody.tailnet")
    assert "status: NXDOMAIN" in out and "flags: qr aa rd ra" in out
    assert "IN\tSOA\tmagicdns.tailnet. hostmaster.tailnet." in out


@needs_dig
def test_dig_reverse_lookup(server: MagicDnsProcess) -> None:
    assert dig(server, "+short", "-x", "100.64.0.2").strip() == "my-server.tailnet."
    assert dig(server, "+short", "-x", "fd7a:115c:a1e0::3").strip() == "db.tailnet."


@needs_dig
def test_dig_truncation_then_tcp_retry(server: MagicDnsProcess) -> None:
    truncated = dig(server, "+ignore", "+noedns", "many.tailnet")
    assert "flags: qr aa tc rd ra" in truncated
    answers = [line for line in truncated.splitlines() if "\tA\t100.64.1." in line]
    assert 0 < len(answers) < 80
    full = dig(server, "+noedns", "many.tailnet")  # dig retries over TCP by itself
    assert len([line for line in full.splitlines() if "\tA\t100.64.1." in line]) == 80
    assert "flags: qr aa rd ra" in full


@needs_kdig
def test_kdig_udp_and_tcp(server: MagicDnsProcess) -> None:
    for transport in ("+notcp", "+tcp"):
        out = subprocess.run(["kdig", f"@{server.host}", "-p", str(server.port), transport,
                              "grafana.tailnet", "A"], capture_output=True, text=True, timeout=20).stdout
        assert "status: NOERROR" in out, out
        lines = {" ".join(line.split()) for line in out.splitlines()}
        assert "grafana.tailnet. 60 IN CNAME my-server.tailnet." in lines
        assert "my-server.tailnet. 300 IN A 100.64.0.2" in lines


@needs_kdig
def test_kdig_edns_badvers_and_do_bit(server: MagicDnsProcess) -> None:
    out = subprocess.run(["kdig", f"@{server.host}", "-p", str(server.port), "+edns=1", "my-server.tailnet"],
                         capture_output=True, text=True, timeout=20).stdout
    assert "BADVERS" in out
    out = subprocess.run(["kdig", f"@{server.host}", "-p", str(server.port), "+dnssec", "my-server.tailnet"],
                         capture_output=True, text=True, timeout=20).stdout
    assert "flags: do" in out.lower() or "; Version: 0; flags: do" in out


def kdig(server: MagicDnsProcess, *args: str) -> str:
    return subprocess.run(["kdig", f"@{server.host}", "-p", str(server.port), "+time=2", "+retry=0", *args],
                          capture_output=True, text=True, timeout=20).stdout


@needs_kdig
def test_kdig_tsig_badkey_transfers_refused_and_no_z(server: MagicDnsProcess) -> None:
    """Issue 8's header details as a real client sees them: NOTAUTH with an unsigned BADKEY TSIG,
    AXFR/IXFR REFUSED over UDP and TCP, the Z bit clear, NOTIMP without RA."""
    out = kdig(server, "-y", "hmac-sha256:client-key:c2VjcmV0c2VjcmV0c2VjcmV0", "my-server.tailnet")
    assert "status: BADKEY" in out and "client-key." in out and "TSIG" in out, out
    for args in (("+notcp", "tailnet", "IXFR=3"), ("+tcp", "tailnet", "IXFR=3"), ("tailnet", "AXFR")):
        out = subprocess.run(["kdig", f"@{server.host}", "-p", str(server.port), "+time=2", "+retry=0", *args],
                             capture_output=True, text=True, timeout=20)
        assert "REFUSED" in out.stdout + out.stderr, (args, out)
    out = kdig(server, "+zflag", "my-server.tailnet")
    assert "status: NOERROR" in out and " z" not in out.split("Flags:")[1].splitlines()[0], out


@needs_dig
def test_dig_cookies_ignored_and_notimp_flags(server: MagicDnsProcess) -> None:
    for args in (("+cookie",), ("+cookie=0011223344556677",), ("+cookie=00112233445566778899aabbccddeeff",),
                 ("+tcp", "+cookie")):
        out = dig(server, *args, "my-server.tailnet")
        assert "status: NOERROR" in out and "100.64.0.2" in out, (args, out)
    out = dig(server, "+opcode=notify", "+cdflag", "my-server.tailnet")
    assert "status: NOTIMP" in out and "flags: qr rd;" in out, out
    out = dig(server, "+cookie=00112233", "my-server.tailnet")  # 4 octets: no valid client cookie
    assert "status: FORMERR" in out, out


def test_dnspython_sections_and_case(server: MagicDnsProcess) -> None:
    r = server.query("_HTTP._tcp.TailNet", "SRV")
    assert str(r.question[0].name) == "_HTTP._tcp.TailNet."
    assert r.flags & dns.flags.AA
    assert [str(rd) for rd in r.answer[0]] == ["10 5 80 my-server.tailnet."]
    r = server.query("x.y.dev.tailnet", "A", tcp=True)
    assert [str(rd) for rd in r.answer[0]] == ["100.64.0.2"]
    r = server.query("printer.tailnet", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority[0].rdtype == dns.rdatatype.SOA


def _tcp_exchange(server: MagicDnsProcess, messages: list[bytes], expect: int) -> list[bytes]:
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(b"".join(struct.pack("!H", len(m)) + m for m in messages))
        buf = b""
        replies = []
        while len(replies) < expect:
            chunk = s.recv(65535)
            assert chunk, "server closed the connection early"
            buf += chunk
            while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                size = struct.unpack("!H", buf[:2])[0]
                replies.append(buf[2:2 + size])
                buf = buf[2 + size:]
        return replies


def test_tcp_pipelining(server: MagicDnsProcess) -> None:
    queries = [dns.message.make_query(n, "A") for n in ("my-server.tailnet", "db.tailnet", "nope.tailnet",
                                                         "grafana.tailnet")]
    replies = [dns.message.from_wire(r) for r in _tcp_exchange(server, [q.to_wire() for q in queries], 4)]
    assert {r.id for r in replies} == {q.id for q in queries}
    by_id = {r.id: r for r in replies}
    assert by_id[queries[2].id].rcode() == dns.rcode.NXDOMAIN


def test_malformed_tcp_frame_closes_only_that_connection(server: MagicDnsProcess) -> None:
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(b"\x00\x03abc")
        assert s.recv(10) == b""  # closed
    assert server.query("my-server.tailnet").answer


def test_server_survives_garbage_and_keeps_answering(server: MagicDnsProcess) -> None:
    rng = random.Random(1234)
    base = dns.message.make_query("my-server.tailnet", "A", use_edns=0).to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(1500):
            if i % 2:
                pkt = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
            else:
                pkt = bytearray(base)
                for _ in range(rng.randint(1, 4)):
                    pkt[rng.randrange(len(pkt))] = rng.getrandbits(8)
                pkt = bytes(pkt)
            s.sendto(pkt, (server.host, server.port))
    for _ in range(30):
        with socket.create_connection((server.host, server.port), timeout=5) as t:
            t.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))))
    assert server.proc.poll() is None
    wait_until(lambda: server.query("my-server.tailnet").answer, timeout=5, what="an answer after garbage")


def test_formerr_and_notimp_over_the_wire(server: MagicDnsProcess) -> None:
    raw = dns.message.make_query("my-server.tailnet", "A").to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for opcode in (1, 2, 4, 5):  # IQUERY, STATUS, NOTIFY, UPDATE
            s.sendto(raw[:2] + bytes([opcode << 3 | 1]) + raw[3:], (server.host, server.port))
            reply = s.recv(512)
            assert reply[:2] == raw[:2] and reply[3] & 0xF == dns.rcode.NOTIMP
            assert (reply[2] >> 3) & 0xF == opcode
        s.sendto(raw[:2] + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05abc", (server.host, server.port))
        reply = s.recv(512)
    assert reply[:2] == raw[:2] and reply[3] & 0xF == dns.rcode.FORMERR


def test_records_at_a_node_of_the_served_view_need_override(server: MagicDnsProcess) -> None:
    """The running server's view names its nodes: `records add` knows them without --view."""
    assert server.db
    res = run_cli("records", "--db", server.db, "add", "my-server", "A", "100.64.0.99")
    assert res.returncode == 2 and "--override" in res.stderr and "my-server.tailnet" in res.stderr
    assert server.query("my-server.tailnet").answer[0][0].address == "100.64.0.2"


def test_records_cli_change_is_served_within_a_second(server: MagicDnsProcess) -> None:
    assert server.db
    res = run_cli("records", "--db", server.db, "add", "live", "A", "100.64.9.9", "--ttl", "30")
    assert res.returncode == 0, res.stderr
    t0 = time.monotonic()
    wait_until(lambda: [str(rd) for rrset in server.query("live.tailnet").answer for rd in rrset] == ["100.64.9.9"],
               timeout=1.0, what="the new record to be served")
    assert time.monotonic() - t0 <= 1.0
    res = run_cli("records", "--db", server.db, "rm", "live")
    assert res.returncode == 0, res.stderr
    wait_until(lambda: server.query("live.tailnet").rcode() == dns.rcode.NXDOMAIN, timeout=1.0,
               what="the removed record to go")


def test_import_is_never_half_applied(server: MagicDnsProcess, tmp_path: Path) -> None:
    assert server.db
    records = [{"name": "bulk", "type": "TXT", "value": f"item-{i}", "ttl": 5} for i in range(300)]
    path = tmp_path / "bulk.json"
    path.write_text(json.dumps(records))
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                r = server.query("bulk.tailnet", "TXT", tcp=True)
            except (dns.exception.DNSException, OSError):
                continue
            seen.add(sum(len(rrset) for rrset in r.answer))

    t = threading.Thread(target=watch)
    t.start()
    try:
        res = run_cli("records", "--db", server.db, "import", str(path))
        assert res.returncode == 0, res.stderr
        wait_until(lambda: 300 in seen, timeout=2, what="the import to be served")
    finally:
        stop.set()
        t.join()
    assert seen <= {0, 300}, f"a query saw part of an import: {sorted(seen)}"
    run_cli("records", "--db", server.db, "rm", "bulk")


def test_view_file_reload_and_bad_view_keeps_last_good(server: MagicDnsProcess) -> None:
    view_path: Path = server.extra["view_path"]
    original = view_path.read_text()
    view = json.loads(original)
    view["peers"].append({"name": "newcomer", "addresses": ["100.64.5.5"]})
    view["version"] = 50
    tmp = view_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(view))
    os.replace(tmp, view_path)
    try:
        wait_until(lambda: server.query("newcomer.tailnet").answer, timeout=2, what="the new view")
        r = server.query("nobody.tailnet")
        assert r.authority[0][0].serial >= 50
        tmp.write_text("{ not json")
        os.replace(tmp, view_path)
        wait_until(lambda: "view not reloaded" in server.log(), timeout=3, what="the bad view to be reported")
        assert server.query("newcomer.tailnet").answer  # the last good view stays in service
    finally:
        tmp.write_text(original)
        os.replace(tmp, view_path)
    wait_until(lambda: not server.query("newcomer.tailnet").answer, timeout=2, what="the original view")


def test_status_and_metrics(server: MagicDnsProcess) -> None:
    res = run_cli("status", "--control-socket", server.control_socket, "--json")
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["listeners"] == [f"{server.host}:{server.port}"]
    assert status["view"]["domain"] == "tailnet" and status["queries"]["udp"] > 0
    human = run_cli("status", "--control-socket", server.control_socket)
    assert "listening" in human.stdout and "tailnet" in human.stdout
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.extra['metrics_port']}/metrics", timeout=5).read().decode()
    assert 'magicdns_queries_total{transport="udp"}' in text
    assert "magicdns_view_version" in text


def test_metrics_listener_serves_metrics_only(server: MagicDnsProcess) -> None:
    """The TCP metrics address is reachable by clients the DNS allow-list blocks: no resolver, no
    tailnet map there. /query and /status stay on the control socket."""
    base = f"http://127.0.0.1:{server.extra['metrics_port']}"
    for path in ("/query?name=my-server.tailnet&type=A", "/status", "/"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + path, timeout=5)
        assert err.value.code == 404, path
    assert urllib.request.urlopen(base + "/metrics", timeout=5).status == 200
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(server.control_socket)
        s.sendall(b"GET /query?name=my-server.tailnet&type=A HTTP/1.0\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200" and json.loads(body)["answer"][0]["value"] == "100.64.0.2"
    status = run_cli("status", "--control-socket", server.control_socket, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["view"]["domain"] == "tailnet"


def test_query_command(server: MagicDnsProcess) -> None:
    res = run_cli("query", "grafana.tailnet", "A", "--server", f"{server.host}:{server.port}", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["rcode"] == "NOERROR" and out["flags"]["aa"]
    assert [a["type"] for a in out["answer"]] == ["CNAME", "A"]
    res = run_cli("query", "many.tailnet", "--server", f"{server.host}:{server.port}")
    assert res.stdout.count(" A ") == 80  # retried over TCP after truncation
    bad = run_cli("query", "x.tailnet", "BOGUS", "--server", f"{server.host}:{server.port}")
    assert bad.returncode == 2
    for args in (("-x", "100.64.0.2"), ("100.64.0.2",), ("-x", "fd7a:115c:a1e0::2")):  # as dig -x
        out = json.loads(run_cli("query", *args, "--server", f"{server.host}:{server.port}", "--json").stdout)
        assert [(a["type"], a["value"]) for a in out["answer"]] == [("PTR", "my-server.tailnet.")], args
    assert run_cli("query", "-x", "my-server.tailnet", "--server", f"{server.host}:{server.port}").returncode == 2


def test_status_without_server_fails_clearly(tmp_path: Path) -> None:
    res = run_cli("status", "--control-socket", str(tmp_path / "none.sock"))
    assert res.returncode == 1 and "is `magicdns serve` running?" in res.stderr


def test_not_an_open_resolver(tmp_path: Path) -> None:
    srv = start_magicdns("--allow", "192.0.2.0/24", workdir=str(tmp_path), probe=None)
    try:
        with pytest.raises(dns.exception.Timeout):
            srv.query("my-server.tailnet", timeout=0.5)
        with socket.create_connection((srv.host, srv.port), timeout=5) as s:
            s.settimeout(5)
            try:
                assert s.recv(10) == b""  # closed at once, nothing answered
            except ConnectionResetError:
                pass
        status = json.loads(run_cli("status", "--control-socket", srv.control_socket, "--json").stdout)
        assert status["queries"]["refused_clients"] >= 2
    finally:
        srv.stop()


def test_forwarding_loop_refused_at_start(tmp_path: Path) -> None:
    port = free_port()
    res = subprocess.run([*MAGICDNS, "serve", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{port}",
                          "--control-socket", str(tmp_path / "s.sock")],
                         capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    assert res.returncode == 2 and "loop" in res.stderr


def test_query_log(tmp_path: Path) -> None:
    log = tmp_path / "queries.log"
    srv = start_magicdns("--query-log", str(log), workdir=str(tmp_path))
    try:
        srv.query("db.tailnet", "AAAA")
        srv.query("nobody.tailnet", "A")
    finally:
        srv.stop()
    lines = log.read_text().splitlines()
    assert any(" 127.0.0.1 db.tailnet. AAAA NOERROR local" in line for line in lines)
    assert any(" 127.0.0.1 nobody.tailnet. A NXDOMAIN local" in line for line in lines)
