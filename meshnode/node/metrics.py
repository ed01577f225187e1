"""Prometheus metrics of the node's resolver, on an operator-chosen TCP address (`--metrics`).

Only /metrics is served: unlike `magicdns serve`'s operator API, no /query here, so exposing the
metrics port never exposes the resolver itself.
"""

from __future__ import annotations

from typing import Any, Callable

from aiohttp import web

from magicdns.metrics import prometheus_text


async def start_metrics(server: Any, host: str, port: int,
                        extra: Callable[[], str] | None = None) -> web.AppRunner:
    """Serve `server`'s counters at http://host:port/metrics, then `extra()`'s families (the
    node's paths and relay); runs on the resolver's own loop."""

    async def metrics(_: web.Request) -> web.Response:
        text = prometheus_text(server.status()) + (extra() if extra is not None else "")
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
