"""LocalAPI request validation: the pure parsers, and a real daemon's socket refusing bad requests
with clear errors while staying up and losing nothing."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from meshnode.cli import main
from meshnode.node.apitypes import ApiError, parse_ip, parse_query, parse_up
from meshnode.node.daemon import Daemon, DaemonConfig
from meshnode.node.localapi import LocalApiServer
from meshnode.node.localclient import DaemonNotRunning, LocalApiRefused, LocalClient
from tests.support import free_port


@pytest.mark.parametrize("body,msg", [
    ([], "JSON object"),
    ({"bogus": 1}, "unknown field 'bogus'"),
    ({"login_server": 5}, "login_server: expected a string"),
    ({"login_server": "gopher://x"}, "login_server"),
    ({"accept_dns": "false"}, "accept_dns: expected true or false"),
    ({"advertise_routes": "10.0.0.0/8"}, "advertise_routes: expected a list"),
    ({"advertise_routes": ["10.0.0.1/8"]}, "host bits"),
    ({"advertise_tags": ["server"]}, "tag:name"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": True}, "timeout"),
    ({"hostname": "  "}, "hostname"),
    ({"hostname": "x" * 300}, "hostname"),
    ({"force_reauth": 1}, "force_reauth: expected true or false"),
])
def test_parse_up_refuses_with_the_field_named(body, msg: str) -> None:
    with pytest.raises(ApiError, match=msg) as info:
        parse_up(body)
    assert info.value.status == 400


def test_parse_up_accepts_a_full_request() -> None:
    req = parse_up({"login_server": "http://127.0.0.1:8080/", "authkey": "k", "hostname": "a",
                    "accept_dns": False, "advertise_routes": ["10.0.0.0/24"], "advertise_tags": ["tag:x"]})
    assert req.login_server == "http://127.0.0.1:8080" and req.accept_dns is False
    assert req.advertise_routes == ("10.0.0.0/24",) and req.accept_routes is None


@pytest.mark.parametrize("body,msg", [
    ({}, "name"), ({"name": ""}, "name"), ({"name": "a..b"}, "empty label"),
    ({"name": "x.tailnet", "type": "BOGUS"}, "type"), ({"name": "x", "extra": 1}, "unknown field"),
])
def test_parse_query_refuses(body, msg: str) -> None:
    with pytest.raises(ApiError, match=msg):
        parse_query(body)


def test_parse_query_defaults_to_a() -> None:
    assert parse_query({"name": "web.tailnet"}).qtype == "A"
    assert parse_query({"name": "web.tailnet", "type": "aaaa"}).qtype == "AAAA"


def test_parse_ip() -> None:
    assert parse_ip({"family": "6", "peer": "srv"}).family == 6
    with pytest.raises(ApiError, match="family"):
        parse_ip({"family": "5"})
    with pytest.raises(ApiError, match="unknown field"):
        parse_ip({"fam": "4"})


class DaemonThread:
    """A real daemon (no control server, never registered) on its own loop thread."""

    def __init__(self, tmp: Path) -> None:
        self.socket = tmp / "mn.sock"
        self.resolv = tmp / "resolv.conf"
        self.resolv.write_text("nameserver 192.0.2.1\n")
        self.config = DaemonConfig(state_dir=tmp / "state", socket_path=self.socket,
                                   dns_listen=(("127.0.0.1", free_port()),), resolv_conf=self.resolv)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.daemon: Daemon | None = None
        self.api: LocalApiServer | None = None
        self._run(self._start())

    def _run(self, coro):  # noqa: ANN001 - a coroutine
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    async def _start(self) -> None:
        self.daemon = Daemon(self.config)
        await self.daemon.start()
        self.api = LocalApiServer(self.daemon, self.socket)
        await self.api.start()

    async def _stop(self) -> None:
        assert self.api is not None and self.daemon is not None
        await self.api.stop()
        await self.daemon.close()

    def close(self) -> None:
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonThread]:
    d = DaemonThread(tmp_path)
    yield d
    d.close()


def raw_http(path: Path, request: bytes) -> tuple[int, dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(body: bytes, path: str = "/localapi/v0/up") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_socket_is_root_only(daemon: DaemonThread) -> None:
    st = daemon.socket.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.parametrize("request_bytes,status,msg", [
    (post(b"{not json"), 400, "not valid JSON"),
    (post(b"[1, 2]"), 400, "JSON object"),
    (post(b'{"accept_dns": "yes"}'), 400, "accept_dns"),
    (post(b'{"unknown": true}'), 400, "unknown field"),
    (post(b"\xff\xfe"), 400, "not valid JSON"),
    (post(b'{"name": "a..b"}', "/localapi/v0/dns/query"), 400, "empty label"),
    (post(b"x" * (128 * 1024)), 413, "larger than"),
    (b"GET /localapi/v0/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404, ""),
    (b"GET /localapi/v0/up HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405, ""),
    (b"GET /localapi/v0/ip?family=9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400, "family"),
])
def test_malformed_requests_get_clear_errors(daemon: DaemonThread, request_bytes: bytes, status: int,
                                             msg: str) -> None:
    got, body = raw_http(daemon.socket, request_bytes)
    assert got == status
    assert "error" in body and msg in body["error"]
    # The daemon is still there and its state untouched.
    assert LocalClient(daemon.socket).request("GET", "/status")["backend_state"] == "NeedsLogin"


def test_operations_that_need_a_map_say_so(daemon: DaemonThread) -> None:
    client = LocalClient(daemon.socket)
    with pytest.raises(LocalApiRefused, match="no network map") as info:
        client.request("GET", "/ip")
    assert info.value.status == 409
    with pytest.raises(LocalApiRefused, match="not running"):
        client.request("POST", "/dns/query", {"name": "x.tailnet"})
    with pytest.raises(LocalApiRefused, match="login server"):
        client.request("POST", "/up", {})
    # The machine key survived all of that.
    assert (daemon.config.state_dir / "machine.key").exists()


def test_up_with_unreachable_control_fails_cleanly(daemon: DaemonThread) -> None:
    port = free_port(socket.SOCK_STREAM)  # nothing listens there
    client = LocalClient(daemon.socket)
    with pytest.raises(LocalApiRefused, match="cannot reach") as info:
        client.request("POST", "/up", {"login_server": f"http://127.0.0.1:{port}", "authkey": "k"})
    assert info.value.status == 502
    st = client.request("GET", "/status")
    assert st["backend_state"] == "NeedsLogin" and st["prefs"]["want_running"] is False
    assert not (daemon.config.state_dir / "node.key").exists()
    # System DNS was never touched.
    assert daemon.resolv.read_text() == "nameserver 192.0.2.1\n"


def test_cli_without_daemon_exits_1(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["--socket", str(tmp_path / "none.sock"), "status"])
    assert r.exit_code == 1 and "not running" in r.output


def test_cli_bad_flags_exit_2(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    for args in (["up", "--advertise-routes", "10.0.0.1/8"], ["up", "--accept-dns=maybe"],
                 ["up", "--advertise-tags", "server"], ["ip", "-4", "-6"], ["dns", "query", "x", "BOGUS"],
                 ["up", "--login-server", "nope"]):
        r = CliRunner().invoke(main, ["--socket", sock, *args])
        assert r.exit_code == 2, (args, r.output)


def test_cli_against_the_daemon(daemon: DaemonThread) -> None:
    sock = str(daemon.socket)
    r = CliRunner().invoke(main, ["--socket", sock, "status"])
    assert r.exit_code == 1 and "Logged out" in r.output  # logged out exits non-zero, as tailscale's
    r = CliRunner().invoke(main, ["--socket", sock, "status", "--json"])
    assert json.loads(r.output)["backend_state"] == "NeedsLogin"
    r = CliRunner().invoke(main, ["--socket", sock, "dns", "status"])
    assert r.exit_code == 0 and "stopped" in r.output
    r = CliRunner().invoke(main, ["--socket", sock, "ip"])
    assert r.exit_code == 1 and "no network map" in r.output


def test_second_daemon_on_the_same_socket_is_refused(daemon: DaemonThread, tmp_path: Path) -> None:
    from meshnode.node.localapi import LocalApiError, claim_socket_path
    with pytest.raises(LocalApiError, match="another meshnode daemon"):
        claim_socket_path(daemon.socket)
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on, as a killed daemon leaves it
    claim_socket_path(stale)
    assert not stale.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(LocalApiError, match="not a socket"):
        claim_socket_path(tmp_path / "file")


def test_client_reports_missing_daemon(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning):
        LocalClient(tmp_path / "x.sock").request("GET", "/status")
    assert not os.path.exists(tmp_path / "x.sock")


# -- properties: any JSON is either a valid request or a 400, never a crash -------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
up_keys = st.sampled_from(["login_server", "authkey", "hostname", "accept_dns", "accept_routes",
                           "advertise_routes", "advertise_exit_node", "exit_node", "advertise_tags",
                           "timeout", "force_reauth"])


@settings(max_examples=300)
@given(st.one_of(json_values, st.dictionaries(up_keys, json_values, max_size=6)))
def test_parse_up_only_ever_refuses_with_400(body) -> None:  # noqa: ANN001
    try:
        parse_up(body)
    except ApiError as exc:
        assert exc.status == 400 and exc.message


@settings(max_examples=300)
@given(st.one_of(json_values, st.dictionaries(st.sampled_from(["name", "type"]), json_values, max_size=2)))
def test_parse_query_only_ever_refuses_with_400(body) -> None:  # noqa: ANN001
    try:
        parse_query(body)
    except ApiError as exc:
        assert exc.status == 400


def test_garbage_on_the_socket_never_takes_the_daemon_down(daemon: DaemonThread) -> None:
    import random
    rng = random.Random(7)
    payloads = [b"", b"\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"POST /localapi/v0/up HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{",
                b"\x16\x03\x01\x02\x00"] + [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
                                             for _ in range(30)]
    for payload in payloads:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(daemon.socket))
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            except OSError:
                pass  # the server may reset a connection it cannot parse: fine, as long as it lives
    assert LocalClient(daemon.socket).request("GET", "/status")["backend_state"] == "NeedsLogin"


@pytest.mark.parametrize("body,msg", [
    ({}, "peer"), ({"peer": " "}, "peer"), ({"peer": "a", "count": 0}, "count"),
    ({"peer": "a", "count": True}, "count"), ({"peer": "a", "timeout": 99}, "timeout"),
    ({"peer": "a", "x": 1}, "unknown field"),
])
def test_parse_ping_refuses(body, msg: str) -> None:  # noqa: ANN001
    from meshnode.node.apitypes import parse_ping
    with pytest.raises(ApiError, match=msg):
        parse_ping(body)


def test_ping_without_a_map_or_tunnel_says_why(daemon: DaemonThread) -> None:
    r = CliRunner().invoke(main, ["--socket", str(daemon.socket), "ping", "somepeer"])
    assert r.exit_code == 1 and "no network map" in r.output


@pytest.mark.parametrize("text,want", [("100.64.0.1", "100.64.0.1"), ("100.64.0.1:22", "100.64.0.1"),
                                       ("[fd7a:115c:a1e0::1]:443", "fd7a:115c:a1e0::1"),
                                       ("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::1")])
def test_parse_whois_takes_ip_and_ip_port(text: str, want: str) -> None:
    from meshnode.node.apitypes import parse_whois
    assert parse_whois({"addr": text}).address == want


@pytest.mark.parametrize("text", ["", "host", "100.64.0.1:x", "[::1", "[::1]x", "1.2.3.4:5:6x", "300.1.1.1"])
def test_parse_whois_refuses_the_rest(text: str) -> None:
    from meshnode.node.apitypes import parse_whois
    with pytest.raises(ApiError) as info:
        parse_whois({"addr": text})
    assert info.value.status == 400


@settings(max_examples=300)
@given(st.one_of(json_values, st.dictionaries(up_keys, json_values, max_size=6)))
def test_parse_set_only_ever_refuses_with_400(body) -> None:  # noqa: ANN001
    from meshnode.node.apitypes import parse_set
    try:
        req = parse_set(body)
    except ApiError as exc:
        assert exc.status == 400 and exc.message
    else:
        assert req.authkey is None and req.login_server is None


def test_the_backend_knows_nothing_of_the_localapi() -> None:
    """Dependencies point one way (wiring -> localapi -> daemon): the backend imports neither the
    LocalAPI nor the wiring, and every reason it can refuse has exactly one HTTP status."""
    import subprocess
    import sys
    code = ("import sys, meshnode.node.daemon\n"
            "bad = [m for m in ('meshnode.node.localapi', 'meshnode.node.wiring') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    from meshnode.node.errors import NodeError
    from meshnode.node.localapi import STATUS

    def subclasses(cls: type) -> set[type]:
        out = set(cls.__subclasses__())
        for sub in list(out):
            out |= subclasses(sub)
        return out
    assert subclasses(NodeError) == set(STATUS)
