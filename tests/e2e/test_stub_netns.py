"""The stub resolver bypasses us: in a namespace whose /etc/resolv.conf points at 100.100.100.100
(where a server answers differently), names resolve through the original resolver named in the
backup, and `magicdns serve --upstream NAME` resolves NAME the same way.

    namespace: lo 127.0.0.1, 100.100.100.100 ("us": dnsmasq answering login.example.test 198.51.100.66)
               10.53.0.1 (the original resolver: dnsmasq answering login.example.test 192.0.2.77)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.e2e.netns import Lab, run, unique_name
from tests.integration.magicdns_proc import MAGICDNS, ROOT
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.root, needs_root, pytest.mark.timeout(90)]


def dnsmasq(lab: Lab, ns: str, address: str, answers: dict[str, str], log: Path) -> None:
    args = ["dnsmasq", "--no-daemon", "--port=53", f"--listen-address={address}", "--bind-interfaces",
            "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--user=root"]
    args += [f"--address=/{name}/{ip}" for name, ip in answers.items()]
    lab.popen(ns, *args, log=log)


def test_stub_asks_the_original_resolver_never_us(tmp_path: Path) -> None:
    lab = Lab()
    ns = unique_name("stub")
    try:
        lab.add_namespace(ns)
        for addr in ("100.100.100.100/32", "10.53.0.1/32"):
            run("ip", "-n", ns, "addr", "add", addr, "dev", "lo")
        dnsmasq(lab, ns, "100.100.100.100", {"login.example.test": "198.51.100.66"}, tmp_path / "us.log")
        dnsmasq(lab, ns, "10.53.0.1", {"login.example.test": "192.0.2.77", "dns.example.test": "10.53.0.1"},
                tmp_path / "orig.log")
        backup = tmp_path / "resolv.conf.pre-meshnode"
        backup.write_text("nameserver 10.53.0.1\n")
        lab.write_resolv_conf(ns, f"# original saved in: {backup}\nnameserver 100.100.100.100\n")

        def getent() -> str:
            out = run("ip", "netns", "exec", ns, "getent", "ahostsv4", "login.example.test", check=False)
            return out.stdout

        # glibc asks "us" (the resolv.conf in place): the stub must not.
        assert "198.51.100.66" in wait_until(getent, timeout=10, what="dnsmasq on 100.100.100.100")
        code = ("import asyncio; from magicdns.stub import resolve_host; "
                "print(' '.join(map(str, asyncio.run(resolve_host('login.example.test')))))")

        last: list[str] = []

        def stub() -> str:
            out = run("ip", "netns", "exec", ns, sys.executable, "-c", code, check=False)
            last[:] = [out.stderr[-500:]]
            return out.stdout.strip() if out.returncode == 0 else ""

        try:
            assert wait_until(stub, timeout=10, what="the stub to resolve") == "192.0.2.77"
        except AssertionError:
            raise AssertionError(f"stub: {last}") from None

        # An upstream given by name is resolved through the same stub.
        sock = tmp_path / "m.sock"
        lab.popen(ns, *MAGICDNS, "serve", "--listen", "127.0.0.1:53", "--upstream", "dns.example.test",
                  "--view", str(ROOT / "conf" / "view.json"), "--control-socket", str(sock),
                  log=tmp_path / "magicdns.log")

        def status() -> dict:
            out = run("ip", "netns", "exec", ns, *MAGICDNS, "status", "--control-socket", str(sock), "--json",
                      check=False)
            return json.loads(out.stdout) if out.returncode == 0 else {}

        st = wait_until(status, timeout=20, what="magicdns serve with an upstream by name")
        assert st["routes"]["."] == ["10.53.0.1"]
    finally:
        lab.destroy()
