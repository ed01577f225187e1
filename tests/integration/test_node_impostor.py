"""A node daemon whose control URL is answered by someone else for a while: a captive portal's plain
404, then an impostor's 401 with a well-formed refusal. Neither is sealed by the pinned server key,
so neither may log the node out: it keeps its saved map, its resolver, resolv.conf and node key, and
picks the real server up again when it returns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
from aiohttp import web

from meshnode.node.resolvconf import is_ours
from tests.integration.test_node_cluster import PROPAGATION, Cluster, addresses_of, all_resolve
from tests.support import wait_until


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, ("alpha", "bravo"))
    try:
        yield c
    finally:
        c.close()


class Impostor:
    """Answers every request on the control URL with `status` and `body` (no key, no seal)."""

    def __init__(self) -> None:
        self.status, self.body, self.ctype = 404, b"<html>Sign in to the hotel wifi</html>", "text/html"
        self.hits = 0
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        await request.read()
        return web.Response(status=self.status, body=self.body, content_type=self.ctype)

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def still_in_the_tailnet(node, ip_peer: frozenset[str]) -> None:  # noqa: ANN001
    st = node.api().request("GET", "/status")
    assert st["backend_state"] != "NeedsLogin", st
    assert (node.state / "node.key").exists() and (node.state / "netmap.json").exists()
    assert is_ours(node.resolv.read_text())
    assert all_resolve([node], "bravo.tailnet", ip_peer)


def test_404_and_401_impostors_never_log_the_node_out(cluster: Cluster) -> None:
    alpha, bravo = cluster.nodes
    key = cluster.authkey()
    for n in (alpha, bravo):
        n.start()
        n.up(cluster.control, key)
    ip_bravo = addresses_of(bravo)
    wait_until(lambda: all_resolve([alpha], "bravo.tailnet", ip_bravo), timeout=PROPAGATION, what="bravo")
    wait_until(lambda: (alpha.state / "netmap.json").exists(), timeout=5, what="the saved map")

    port = cluster.control.port
    cluster.control.stop()
    impostor = Impostor()
    cluster.control._run(impostor.start(port))
    try:
        # The captive portal: a plain 404 to the map stream, several times over.
        wait_until(lambda: impostor.hits >= 3, timeout=20, what="the node to try the portal")
        still_in_the_tailnet(alpha, ip_bravo)
        # An impostor answering with the server's own refusal format, unsealed.
        impostor.status, impostor.ctype = 401, "application/json"
        impostor.body = json.dumps({"error": "not_registered", "message": "you are out"}).encode()
        seen = impostor.hits
        wait_until(lambda: impostor.hits >= seen + 3, timeout=20, what="the node to try the impostor")
        still_in_the_tailnet(alpha, ip_bravo)
        st = alpha.api().request("GET", "/status")
        assert st["control"]["connected"] is False
    finally:
        cluster.control._run(impostor.stop())

    # The real server is back on the same URL: the node follows it again by itself.
    cluster.control.start()
    wait_until(lambda: (alpha.api().request("GET", "/status")["control"] or {}).get("connected"), timeout=20,
               what="reconnection to the real server")
    assert alpha.api().request("GET", "/status")["backend_state"] == "Running"
    cluster.admin.rename_node("bravo", "web")
    wait_until(lambda: all_resolve([alpha], "web.tailnet", ip_bravo), timeout=PROPAGATION,
               what="a change after the return")


def test_a_sealed_refusal_still_logs_the_node_out(cluster: Cluster) -> None:
    """The other half: what the pinned server itself says (node deleted) is acted on."""
    alpha, _ = cluster.nodes
    alpha.start()
    alpha.up(cluster.control, cluster.authkey())
    cluster.admin.delete_node("alpha")
    wait_until(lambda: alpha.api().request("GET", "/status")["backend_state"] == "NeedsLogin", timeout=10,
               what="the deleted node to learn it is out")
    assert not (alpha.state / "netmap.json").exists()
