"""run_netcheck against real STUN servers and relays on loopback (two regions, two STUN addresses,
one UDP socket), and against a fake captive portal."""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from meshnode.derp.derpmap import RelayMap, RelayNode, Region
from meshnode.derp.server import RelayServer
from meshnode.netcheck import run_netcheck
from meshnode.stun.server import start_stun_server


async def _app(portal: bool) -> tuple[web.AppRunner, int]:
    app = web.Application()
    async def hotel_wifi(_request: web.Request) -> web.Response:
        return web.Response(text="<html>log in to the hotel wifi</html>")
    if portal:
        app.router.add_get("/generate_204", hotel_wifi)
    else:
        RelayServer(os.urandom(32)).attach(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def test_netcheck_on_loopback() -> None:
    async def body() -> None:
        t1, s1 = await start_stun_server("127.0.0.1", 0)
        t2, s2 = await start_stun_server("127.0.0.2", 0)
        relay, relay_port = await _app(portal=False)
        portal, portal_port = await _app(portal=True)
        try:
            rmap = RelayMap((
                Region(1, "one", "One", (RelayNode("1a", 1, "127.0.0.1", relay_port, s1.port, tls=False),)),
                Region(2, "two", "Two", (RelayNode("2a", 2, "", relay_port, s2.port, tls=False, ipv4="127.0.0.2"),)),
                Region(3, "dead", "No STUN", (RelayNode("3a", 3, "127.0.0.1", 9, -1, tls=False),)),
            ))
            r = await run_netcheck(rmap, control_url="http://127.0.0.1:1", timeout=2.0)
            assert r.udp and r.ipv4
            assert r.global_v4 is not None and r.global_v4.startswith("127.0.0.1:")
            assert r.mapping_varies_by_dest_ip is False          # no NAT on loopback: one mapping
            assert set(r.relay_latency_ms) == {1, 2} and r.preferred_relay in (1, 2)
            assert r.captive_portal is False
            assert s1.stats["binding_requests"] >= 1 and s2.stats["binding_requests"] >= 1
            # The same map with the home region's relay replaced by a captive portal.
            pmap = RelayMap((Region(1, "one", "One", (RelayNode("1a", 1, "127.0.0.1", portal_port, s1.port,
                                                                tls=False),)),))
            r2 = await run_netcheck(pmap, timeout=2.0)
            assert r2.preferred_relay == 1 and r2.captive_portal is True
            # Nothing answers: UDP counts as blocked, within the timeout.
            t1.close()
            t2.close()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r3 = await run_netcheck(rmap, timeout=0.5, check_captive_portal=False)
            assert not r3.udp and r3.preferred_relay is None and "blocked" in r3.nat
            assert loop.time() - t0 < 1.5
        finally:
            t1.close()
            t2.close()
            await relay.cleanup()
            await portal.cleanup()
    asyncio.run(asyncio.wait_for(body(), 30))
