"""glibc as the client: with magicdns as the only nameserver of a network namespace, a tailnet name
whose CNAME leads out of the tailnet resolves (RFC 1034 3.6.2: a recursive server returns the
whole chain), and an outside name whose CNAME leads into the tailnet resolves too.

glibc's stub does not follow a CNAME itself: given the bare CNAME, `getent ahostsv4` exits 2.
The upstream serving the outside names is the test's own (tests/integration/upstreams.py),
started inside the namespace; no traffic leaves it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e.netns import Lab, run, unique_name
from tests.integration.magicdns_proc import ROOT
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.root, needs_root, pytest.mark.timeout(90)]

UPSTREAM = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from tests.integration.upstreams import EXAMPLE_ZONE, FakeUpstream
ZONE = {**EXAMPLE_ZONE, ("back.example.test", "CNAME"): ["back.example.test. 300 IN CNAME server.tailnet."]}
async def main():
    async with FakeUpstream.start("127.0.0.2", 53, zone=ZONE):
        print("ready", flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""

VIEW = {
    "domain": "tailnet",
    "peers": [{"name": "server", "addresses": ["100.64.0.2"]}],
    "dns": {"nameservers": ["127.0.0.2:53"],
            "records": [{"name": "outside.tailnet", "type": "CNAME", "value": "www.example.test."},
                        {"name": "hop.tailnet", "type": "CNAME", "value": "outside.tailnet"},
                        {"name": "gone.tailnet", "type": "CNAME", "value": "nothing.example.test."}]},
    "version": 1,
}


@pytest.fixture
def lab(tmp_path):
    if shutil.which("getent") is None:
        pytest.skip("needs getent")
    lab = Lab()
    ns = unique_name("chs")
    try:
        lab.add_namespace(ns)
        run("ip", "-n", ns, "addr", "add", "127.0.0.2/8", "dev", "lo", check=False)
        lab.write_resolv_conf(ns, "nameserver 127.0.0.1\noptions attempts:1 timeout:3\n")
        view = tmp_path / "view.json"
        view.write_text(json.dumps(VIEW))
        up_log = tmp_path / "upstream.log"
        lab.popen(ns, sys.executable, "-c", UPSTREAM, str(ROOT), log=up_log)
        wait_until(lambda: "ready" in up_log.read_text(), timeout=20, what="the upstream to start")
        lab.popen(ns, sys.executable, "-m", "magicdns.cli", "serve", "--listen", "127.0.0.1:53",
                  "--view", str(view), "--control-socket", str(tmp_path / "c.sock"),
                  "--resolv-conf", str(tmp_path / "none"), log=tmp_path / "magicdns.log")
        wait_until(lambda: getent(ns, "server.tailnet")[0] == 0, timeout=20,
                   what="magicdns to answer in the namespace")
        yield ns
    finally:
        lab.destroy()


def getent(ns: str, name: str) -> tuple[int, set[str]]:
    proc = subprocess.run(["ip", "netns", "exec", ns, "getent", "ahostsv4", name], capture_output=True,
                          text=True, timeout=20, env={**os.environ, "LC_ALL": "C"})
    return proc.returncode, {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}


def test_glibc_resolves_cnames_across_the_tailnet_border(lab: str) -> None:
    assert getent(lab, "outside.tailnet") == (0, {"192.0.2.10"})
    assert getent(lab, "hop.tailnet") == (0, {"192.0.2.10"})  # in-zone links, then out
    assert getent(lab, "back.example.test") == (0, {"100.64.0.2"})  # out, then into the tailnet
    assert getent(lab, "gone.tailnet")[0] == 2  # the target does not exist anywhere: not found
