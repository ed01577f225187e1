"""A real control server in-process on 127.0.0.1 with several clients of the real client library.

Every "reaches every node" check waits on the condition with a one-second deadline measured from the
change; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import pytest

from magicdns.records import parse_record
from magicdns.store import RecordStore
from meshnode.control.client import ControlClient, ControlError, generate_private_key
from meshnode.control.protocol import MACHINE_KEY_HEADER, Channel, ErrorCode
from meshnode.control.server import ControlServer, ServerConfig
from meshnode.control.store import ControlStore
from meshnode.netmap import NetMap, netmap_to_view
from tests.support import async_wait_until

REPO = Path(__file__).resolve().parents[2]
MESHNODE = str(Path(sys.executable).parent / "meshnode")
FAST = ServerConfig(poll_interval=0.05, coalesce=0.005, keepalive=5.0, ephemeral_grace=0.3, reap_interval=0.05)


class Node:
    """A simulated node: a client and the latest map its stream delivered."""

    def __init__(self, url: str) -> None:
        self.client = ControlClient(url, generate_private_key(), generate_private_key())
        self.map: NetMap | None = None
        self.error: BaseException | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        async def run() -> None:
            try:
                async for nm in self.client.stream_map():
                    self.map = nm
            except Exception as exc:  # recorded for the test to assert on
                self.error = exc
        self.task = asyncio.create_task(run())

    def peer_names(self) -> set[str]:
        return {p.name for p in self.map.peers} if self.map else set()

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        await self.client.close()


class Tailnet:
    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "control.db"
        self.store = ControlStore(self.path)
        self.admin_store = ControlStore(self.path)  # a second connection, as the admin CLI would open
        self.server = ControlServer(self.store, FAST)
        self.nodes: list[Node] = []

    async def __aenter__(self) -> "Tailnet":
        port = await self.server.start("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{port}"
        self.key, _ = self.admin_store.create_authkey("alice@example.com", reusable=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for n in self.nodes:
            await n.stop()
        await self.server.stop()
        self.admin_store.close()
        self.store.close()

    async def join(self, hostname: str, key: str | None = None, start: bool = True, **kw) -> Node:
        node = Node(self.url)
        await node.client.register(key or self.key, hostname=hostname, **kw)
        self.nodes.append(node)
        if start:
            node.start()
        return node


def run(coro_fn: Callable[[Path], Awaitable[None]]) -> Callable[[Path], None]:
    def wrapper(tmp_path: Path) -> None:
        asyncio.run(asyncio.wait_for(coro_fn(tmp_path), 30))
    wrapper.__name__ = coro_fn.__name__
    return wrapper


async def within_1s(cond: Callable[[], bool], what: str) -> None:
    await async_wait_until(cond, timeout=1.0, interval=0.005, what=what)


@run
async def test_registration_and_every_change_reaches_every_node(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        a, b, c = [await net.join(h) for h in ("alpha.local", "beta", "gamma.lan")]
        await within_1s(lambda: all(n.peer_names() == {"alpha", "beta", "gamma"} - {n.map.self_node.name}
                                    for n in (a, b, c) if n.map) and all(n.map for n in (a, b, c)), "first maps")
        await within_1s(lambda: all(all(p.online for p in n.map.peers) for n in (a, b, c)), "online flags")
        v0 = a.map.version

        net.admin_store.rename_node("beta", "web")  # another connection: the CLI's path
        await within_1s(lambda: "web" in a.peer_names() and "web" in c.peer_names()
                        and b.map.self_node.name == "web", "rename")
        assert a.map.version > v0

        net.admin_store.set_nameservers(["127.0.0.1:5301"])
        net.admin_store.add_route("corp.example", ["10.0.0.53"])
        await within_1s(lambda: all(n.map.dns.nameservers == ("127.0.0.1:5301",)
                                    and dict(n.map.dns.routes) == {"corp.example": ("10.0.0.53",)}
                                    for n in (a, b, c)), "DNS settings")

        RecordStore(net.path).add(parse_record("grafana", "CNAME", "web", override=True))
        await within_1s(lambda: all([r.name for r in n.map.dns.records] == ["grafana.tailnet"]
                                    and n.map.dns.records[0].override for n in (a, b, c)), "record")
        view = netmap_to_view(a.map)
        assert {h.name for h in view.peers} == {"web", "gamma"} and view.dns.records[0].override

        net.admin_store.delete_node("gamma")
        await within_1s(lambda: a.peer_names() == {"web"} and b.peer_names() == {"alpha"}, "delete")
        await async_wait_until(lambda: c.error is not None, timeout=2, what="deleted node's stream ends")
        assert isinstance(c.error, ControlError) and c.error.code is ErrorCode.NOT_REGISTERED


@run
async def test_policy_change_hides_peers_and_tags_need_owners(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        bob_key, _ = net.admin_store.create_authkey("bob@example.com", reusable=True)
        a = await net.join("a")
        b = await net.join("b")
        x = await net.join("x", key=bob_key)
        await within_1s(lambda: all(n.map and len(n.map.peers) == 2 for n in (a, b, x)), "allow-all maps")
        policy = json.dumps({
            "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["alice@example.com:*"]}],
            "tagOwners": {"tag:server": ["alice@example.com"]},
            "tests": [{"src": "alice@example.com", "accept": ["100.64.0.2:22"], "deny": ["100.64.0.3:22"]}],
        })
        from meshnode.control.access import set_policy
        set_policy(net.admin_store, policy)
        await within_1s(lambda: a.peer_names() == {"b"} and b.peer_names() == {"a"} and x.peer_names() == set(),
                        "policy isolates bob")
        assert a.map.packet_filter, "alice's nodes get filter rules"
        # bob may not apply tag:server; alice may.
        with pytest.raises(ControlError) as err:
            await net.join("y", key=bob_key, start=False, advertise_tags=["tag:server"])
        assert err.value.code is ErrorCode.TAG_NOT_ALLOWED and err.value.status == 403
        await net.join("srv", start=False, advertise_tags=["tag:server"])
        assert net.admin_store.find_node("srv").tags == ("tag:server",)


@run
async def test_bad_policies_are_refused_and_the_old_one_stays(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        token = net.store.ensure_admin_token()
        headers = {"Authorization": f"Bearer {token}"}
        bad_tests = json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}],
                                "tests": [{"src": "alice@example.com", "accept": ["100.64.0.1:80"]}]})
        async with aiohttp.ClientSession() as http:
            before = await (await http.get(net.url + "/admin/policy", headers=headers)).text()
            for body in ("{not json", '{"acls": [{"action": "drop"}]}', bad_tests):
                resp = await http.put(net.url + "/admin/policy", data=body, headers=headers)
                assert resp.status == 400
                assert (await resp.json())["error"] == "bad_request"
            after = await (await http.get(net.url + "/admin/policy", headers=headers)).text()
            assert after == before
            assert (await http.get(net.url + "/admin/policy")).status == 401
            assert (await http.get(net.url + "/admin/policy", headers={"Authorization": "Bearer nope"})).status == 401
        proc = subprocess.run([MESHNODE, "control", "policy", "set", "-",
                               "--db", str(net.path)], input=bad_tests, capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 1 and "tests failed" in proc.stderr
        assert net.admin_store.policy_text() is None


@run
async def test_nodes_cannot_read_or_act_as_another(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        victim = await net.join("victim")
        await within_1s(lambda: victim.map is not None, "victim's map")
        server_pub = victim.client.server_public_key
        attacker_key = generate_private_key()
        # Claiming the victim's machine key without its private key: the box does not open.
        forged = Channel(attacker_key, server_pub).seal({"ts": time.time(), "node_key": victim.client.node_key_public})
        async with aiohttp.ClientSession() as http:
            resp = await http.post(net.url + "/machine/map", data=forged,
                                   headers={MACHINE_KEY_HEADER: victim.client.machine_key_public})
            assert resp.status == 401 and (await resp.json())["error"] == "bad_seal"
            # Replaying a request the victim really sent is refused too.
            real = Channel(victim.client.machine_key_private, server_pub).seal(
                {"ts": time.time(), "node_key": victim.client.node_key_public, "endpoints": ["192.0.2.1:41641"]})
            hdr = {MACHINE_KEY_HEADER: victim.client.machine_key_public}
            assert (await http.post(net.url + "/machine/endpoints", data=real, headers=hdr)).status == 200
            again = await http.post(net.url + "/machine/endpoints", data=real, headers=hdr)
            # The refusal is sealed to the victim's machine key (only it can read it).
            assert again.status == 401 and again.headers["X-Meshnode-Sealed"] == "1"
            refusal = Channel(victim.client.machine_key_private, server_pub).open(await again.read())[1]
            assert refusal["error"] == "replay"
            stale = Channel(victim.client.machine_key_private, server_pub).seal(
                {"ts": time.time() - 3600, "node_key": victim.client.node_key_public})
            assert (await http.post(net.url + "/machine/map", data=stale, headers=hdr)).status == 401
        # The right machine key with a node key it does not hold.
        imposter = ControlClient(net.url, victim.client.machine_key_private, generate_private_key())
        with pytest.raises(ControlError) as err:
            await imposter.fetch_map()
        assert err.value.code is ErrorCode.NODE_KEY_MISMATCH
        await imposter.close()
        # An unregistered machine gets no map.
        stranger = ControlClient(net.url, generate_private_key(), generate_private_key())
        with pytest.raises(ControlError) as err:
            await stranger.fetch_map()
        assert err.value.code is ErrorCode.NOT_REGISTERED
        await stranger.close()
        # A frame sealed for the victim does not open for anyone else.
        nm_bytes = Channel(net.server.private_key, victim.client.machine_key_public).seal({"type": "keepalive"})
        with pytest.raises(Exception):
            Channel(attacker_key, server_pub).open(nm_bytes)


@run
async def test_auth_key_rules_over_the_wire(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        once, _ = net.admin_store.create_authkey("alice@example.com")
        expired, _ = net.admin_store.create_authkey("alice@example.com", expires=time.time() - 5)
        revoked, rk = net.admin_store.create_authkey("alice@example.com")
        net.admin_store.revoke_authkey(rk.id)
        await net.join("first", key=once, start=False)
        cases = [(once, ErrorCode.AUTHKEY_USED, 403), (expired, ErrorCode.AUTHKEY_EXPIRED, 403),
                 (revoked, ErrorCode.AUTHKEY_REVOKED, 403), (once[:-1] + ("1" if once.endswith("0") else "0"), ErrorCode.AUTHKEY_UNKNOWN, 401),
                 ("nonsense", ErrorCode.AUTHKEY_UNKNOWN, 401), (None, ErrorCode.AUTHKEY_UNKNOWN, 401)]
        for key, code, status in cases:
            client = ControlClient(net.url, generate_private_key(), generate_private_key())
            with pytest.raises(ControlError) as err:
                await client.register(key, hostname="x")
            assert (err.value.code, err.value.status) == (code, status), key
            await client.close()
        assert [n.name for n in net.admin_store.list_nodes()] == ["first"]


@run
async def test_malformed_requests_get_4xx_and_the_server_keeps_running(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        node = await net.join("ok")
        server_pub = node.client.server_public_key
        mk = generate_private_key()
        from meshnode.control.protocol import public_key_of
        hdr = {MACHINE_KEY_HEADER: public_key_of(mk)}
        chan = Channel(mk, server_pub)
        async with aiohttp.ClientSession() as http:
            checks = [
                ("post", "/machine/register", b"garbage", hdr, 401),
                ("post", "/machine/register", b"", hdr, 400),
                ("post", "/machine/register", b"x", {}, 400),
                ("post", "/machine/register", b"x", {MACHINE_KEY_HEADER: "not-base64!"}, 400),
                ("post", "/machine/register", b"x", {MACHINE_KEY_HEADER: "AAAA"}, 400),
                ("post", "/machine/register", chan.seal({"ts": time.time()}), hdr, 400),
                ("post", "/machine/register", chan.seal({"ts": "now"}), hdr, 400),
                ("post", "/machine/register", chan.seal({"ts": time.time(), "node_key": node.client.node_key_public,
                                                          "hostname": "h", "node_key_proof": "AAAA",
                                                          "proof_ts": time.time()}), hdr, 403),
                ("post", "/machine/register", b"x" * (2 << 20), hdr, 413),
                ("get", "/machine/register", b"", {}, 405),
                ("get", "/no/such/path", b"", {}, 404),
                ("post", "/admin/nodes/ok/rename", b"{}", {}, 401),
            ]
            for method, path, body, headers, status in checks:
                resp = await http.request(method, net.url + path, data=body, headers=headers)
                assert resp.status == status, (path, body[:40], await resp.read())
                if resp.headers.get("X-Meshnode-Sealed"):   # the request opened: the refusal is sealed
                    assert "error" in chan.open(await resp.read())[1], path
                elif status != 413:
                    assert "error" in await resp.json(content_type=None), path
            token = net.store.ensure_admin_token()
            auth = {"Authorization": f"Bearer {token}"}
            resp = await http.post(net.url + "/admin/nodes/ok/rename", data=b"[1]", headers=auth)
            assert resp.status == 400
            resp = await http.post(net.url + "/admin/nodes/ok/rename", json={"name": "bad name"}, headers=auth)
            assert resp.status == 400 and "host name" in (await resp.json())["message"]
            resp = await http.post(net.url + "/admin/nodes/nope/rename", json={"name": "x"}, headers=auth)
            assert resp.status == 404
            resp = await http.post(net.url + "/admin/nodes/ok/rename", json={"name": "fine"}, headers=auth)
            assert resp.status == 200
            assert (await http.get(net.url + "/healthz")).status == 200
        await within_1s(lambda: node.map is not None and node.map.self_node.name == "fine", "rename via admin API")


@run
async def test_ephemeral_nodes_leave_after_going_offline(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        eph_key, _ = net.admin_store.create_authkey("ci@example.com", ephemeral=True)
        watcher = await net.join("watcher")
        eph = await net.join("runner", key=eph_key)
        await within_1s(lambda: watcher.peer_names() == {"runner"}, "ephemeral node visible")
        await eph.stop()
        # grace 0.3 s + reaper 0.05 s + propagation: within a second of the grace period
        await async_wait_until(lambda: watcher.peer_names() == set(), timeout=1.5, what="ephemeral node reaped")
        assert [n.name for n in net.admin_store.list_nodes()] == ["watcher"]


@run
async def test_relogin_and_logout_keep_identity(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        watcher = await net.join("watcher")
        n = await net.join("laptop")
        await within_1s(lambda: watcher.peer_names() == {"laptop"} and n.map is not None, "laptop visible")
        first = n.map.self_node
        await n.client.logout()
        await within_1s(lambda: watcher.peer_names() == set(), "logged-out node leaves maps")
        with pytest.raises(ControlError):
            await n.client.register(None, hostname="laptop")  # a logged-out machine needs a key
        result = await n.client.register(net.key, hostname="laptop")
        assert (result.node_id, result.name, result.addresses) == (first.id, first.name, first.addresses)
        await within_1s(lambda: watcher.peer_names() == {"laptop"}, "re-login visible")
        await n.client.update_endpoints(["198.51.100.7:41641"])
        await within_1s(lambda: watcher.map.peer_by_name("laptop").endpoints == ("198.51.100.7:41641",),
                        "endpoints reach peers")
        # Node-key rotation: same machine, new WireGuard key, no auth key needed while logged in.
        rotated = ControlClient(net.url, n.client.machine_key_private, generate_private_key())
        again = await rotated.register(None, hostname="laptop")
        assert (again.node_id, again.addresses) == (first.id, first.addresses)
        await within_1s(lambda: watcher.map.peer_by_name("laptop").node_key == rotated.node_key_public,
                        "rotated node key reaches peers")
        with pytest.raises(ControlError) as err:
            await n.client.update_endpoints(["1.2.3.4:1"])  # the old node key is no longer this node's
        assert err.value.code is ErrorCode.NODE_KEY_MISMATCH
        await rotated.close()


@run
async def test_routes_need_approval_or_auto_approvers(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        from meshnode.control.access import set_policy
        set_policy(net.admin_store, json.dumps({
            "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
            "autoApprovers": {"routes": {"10.1.0.0/16": ["alice@example.com"]}},
        }))
        watcher = await net.join("watcher")
        await net.join("gw", advertise_routes=["10.1.2.0/24", "192.168.0.0/24"], advertise_exit_node=True)
        await within_1s(lambda: watcher.map.peer_by_name("gw") is not None, "gw visible")
        gw = watcher.map.peer_by_name("gw")
        assert gw.approved_routes == ("10.1.2.0/24",) and not gw.exit_node
        net.admin_store.approve_routes("gw", ["10.1.2.0/24", "192.168.0.0/24", "0.0.0.0/0"])
        await within_1s(lambda: "192.168.0.0/24" in watcher.map.peer_by_name("gw").allowed_ips
                        and watcher.map.peer_by_name("gw").exit_node, "approved routes")


@run
async def test_login_again_keeps_endpoints_and_disco_key_reaches_peers(tmp_path: Path) -> None:
    """`meshnode up` on a registered node registers again without endpoints: the ones it reported
    must stay at the control server (they used to be erased). The disco key of a run reaches peers
    from the registration and from each endpoint report."""
    import base64
    disco = base64.b64encode(bytes(range(32))).decode()
    async with Tailnet(tmp_path) as net:
        watcher = await net.join("watcher")
        n = await net.join("laptop", disco_key=disco)
        await within_1s(lambda: watcher.map is not None and watcher.peer_names() == {"laptop"}, "laptop seen")
        assert watcher.map.peer_by_name("laptop").disco_key == disco
        await n.client.update_endpoints(["198.51.100.7:41641", "10.0.0.7:41641"])
        await within_1s(lambda: watcher.map.peer_by_name("laptop").endpoints
                        == ("198.51.100.7:41641", "10.0.0.7:41641"), "endpoints reach peers")
        await n.client.register(None, hostname="laptop")  # `up` again, no endpoints known yet
        [stored] = [x for x in net.admin_store.list_nodes() if x.name == "laptop"]
        assert stored.endpoints == ("198.51.100.7:41641", "10.0.0.7:41641")
        assert stored.disco_key == disco  # a login without a disco key keeps the old one
        rerun = base64.b64encode(bytes(range(1, 33))).decode()
        await n.client.update_endpoints(["198.51.100.7:41641"], disco_key=rerun)
        await within_1s(lambda: watcher.map.peer_by_name("laptop").disco_key == rerun, "new disco key")
        with pytest.raises(ControlError):
            await n.client.update_endpoints([], disco_key="not base64 of 32 bytes")
        # The home relay region (additive): it reaches peers, and a report without it keeps it.
        assert watcher.map.peer_by_name("laptop").home_region is None
        await n.client.update_endpoints(["198.51.100.7:41641"], home_region=901)
        await within_1s(lambda: watcher.map.peer_by_name("laptop").home_region == 901, "home region")
        await n.client.update_endpoints(["198.51.100.8:41641"])
        await within_1s(lambda: watcher.map.peer_by_name("laptop").endpoints == ("198.51.100.8:41641",), "ep")
        assert watcher.map.peer_by_name("laptop").home_region == 901
        for bad in (0, -5, True, "901"):
            with pytest.raises(ControlError):
                await n.client.update_endpoints([], home_region=bad)  # type: ignore[arg-type]
