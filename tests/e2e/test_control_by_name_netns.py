"""A login server given by host name, with several addresses, resolved through the original resolvers.

In a namespace whose /etc/resolv.conf points at 100.100.100.100 ("us": a dnsmasq that would answer
login.example.test with an address where nothing listens), the original resolver (named in the
backup, 10.53.0.1) gives login.example.test two addresses, 127.0.0.1 and 127.0.0.2, where two control
replicas of one PostgreSQL database listen (with their embedded relays). A node started with
`--login-server http://login.example.test:8080` registers, streams its map and logs in to the relay
by that name; "us" is never asked for it. The replica the node streams from is killed with SIGKILL:
the node moves to the other address and a rename made meanwhile reaches it.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from meshnode.control.store import ControlStore, Grant, Registration
from tests.e2e.netns import Lab, run, unique_name
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.root, needs_root, pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[2]

NODE = textwrap.dedent("""
    import asyncio, base64, json, sys
    from meshnode.control.client import ControlClient, generate_private_key
    from meshnode.derp.client import DerpClient

    async def main():
        c = ControlClient("http://login.example.test:8080", generate_private_key(), generate_private_key())
        await c.register(sys.argv[1], hostname="walker")
        d = DerpClient(base64.b64decode(c.node_key_private), ["http://login.example.test:8080/derp"])
        await d.start()
        await d.wait_connected(20)
        async for nm in c.stream_map(max_backoff=0.5):
            via = c.resolver.preferred("login.example.test")
            print(json.dumps({"peers": sorted(p.name for p in nm.peers), "via": str(via),
                              "derp": d.connected_url is not None}), flush=True)
    asyncio.run(main())
""")


def _allow(user, key_tags, reg, existing):  # noqa: ANN001
    return Grant(tuple(key_tags), (), False)


def _dnsmasq(lab: Lab, ns: str, address: str, args: list[str], log: Path) -> None:
    lab.popen(ns, "dnsmasq", "--no-daemon", "--port=53", f"--listen-address={address}", "--bind-interfaces",
              "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--user=root", "--log-queries",
              f"--log-facility={log}", *args, log=log.with_suffix(".out"))


def test_login_server_by_name_with_two_addresses(tmp_path: Path, postgres, pg_url: str) -> None:  # noqa: ANN001
    db = postgres.url(pg_url.rsplit("/", 1)[1], unix=True)   # the namespace reaches it by its socket
    store = ControlStore(pg_url)
    key, _ = store.create_authkey("alice", reusable=True)
    store.register(Registration("mk-peer", "nk-peer", "peer1", "linux", key), _allow)
    lab = Lab()
    ns = unique_name("byname")
    try:
        lab.add_namespace(ns)
        for addr in ("100.100.100.100/32", "10.53.0.1/32"):
            run("ip", "-n", ns, "addr", "add", addr, "dev", "lo")
        _dnsmasq(lab, ns, "100.100.100.100", ["--address=/login.example.test/198.51.100.66"], tmp_path / "us.log")
        _dnsmasq(lab, ns, "10.53.0.1", ["--host-record=login.example.test,127.0.0.1",
                                        "--host-record=login.example.test,127.0.0.2"], tmp_path / "orig.log")
        backup = tmp_path / "resolv.conf.pre-meshnode"
        backup.write_text("nameserver 10.53.0.1\n")
        lab.write_resolv_conf(ns, f"# original saved in: {backup}\nnameserver 100.100.100.100\n")
        replicas = {}
        for rid, ip in (("r1", "127.0.0.1"), ("r2", "127.0.0.2")):
            log = tmp_path / f"{rid}.log"
            replicas[ip] = (lab.popen(ns, sys.executable, "-m", "meshnode.cli", "control", "serve", "--db", db,
                                      "--replica-id", rid, "--listen", f"{ip}:8080", "--derp",
                                      "--stun-port", "-1", "--admin-token-file", str(tmp_path / f"{rid}.tok"),
                                      log=log), log)
        for _, log in replicas.values():
            wait_until(lambda: "control server listening" in log.read_text(errors="replace"), timeout=30,
                       what=f"{log.name}: replica listening")

        out = tmp_path / "node.out"
        lab.popen(ns, sys.executable, "-c", NODE, key, log=out)

        def last() -> dict:
            lines = [ln for ln in out.read_text(errors="replace").splitlines() if ln.startswith("{")]
            return json.loads(lines[-1]) if lines else {}

        first = wait_until(lambda: (lambda m: m if m.get("peers") == ["peer1"] and m.get("derp") else None)(last()),
                           timeout=30, what=f"the node's first map over the name ({out.read_text()[-800:]})")
        assert first["via"] in replicas
        # The original resolver was asked for the name, "us" never was.
        assert "login.example.test" in (tmp_path / "orig.log").read_text()
        assert "login.example.test" not in (tmp_path / "us.log").read_text(errors="replace")

        # The replica it streams from dies: it moves to the other address of the name.
        proc, _ = replicas[first["via"]]
        run("kill", "-9", str(proc.pid), check=False)   # the `ip netns exec` wrapper execs the server
        proc.wait(10)
        other = next(ip for ip in replicas if ip != first["via"])
        store.rename_node("peer1", "peer2")
        wait_until(lambda: last().get("peers") == ["peer2"] and last().get("via") == other, timeout=20,
                   what=f"the node on {other} with the rename ({out.read_text()[-800:]})")
        assert "login.example.test" not in (tmp_path / "us.log").read_text(errors="replace")
    finally:
        lab.destroy()
        store.close()
