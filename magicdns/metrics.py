"""Prometheus text exposition of the server's status, and the small HTTP API that serves it.

The control socket (unix, mode 0600, for `magicdns status` and `magicdns query`) serves the whole
API. The TCP `--metrics HOST:PORT` listener serves `/metrics` and nothing else: it is reachable by
whoever can reach that address, and `/query` there would be a resolver open to clients the DNS
allow-list blocks, `/status` a map of the tailnet.
"""

from __future__ import annotations

import json
import os
from typing import Any

from aiohttp import web

from .server import DnsServer


def _line(out: list[str], name: str, value: Any, labels: dict[str, Any] | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if labels:
        inner = ",".join(f'{k}="{str(v).replace(chr(34), "")}"' for k, v in labels.items())
        out.append(f"{name}{{{inner}}} {value}")
    else:
        out.append(f"{name} {value}")


def prometheus_text(status: dict[str, Any]) -> str:
    """The status as Prometheus text format 0.0.4."""
    out: list[str] = []
    out.append("# HELP magicdns_queries_total Queries received, by transport.")
    out.append("# TYPE magicdns_queries_total counter")
    q = status["queries"]
    _line(out, "magicdns_queries_total", q["udp"], {"transport": "udp"})
    _line(out, "magicdns_queries_total", q["tcp"], {"transport": "tcp"})
    out.append("# HELP magicdns_answers_total Queries by how they were answered.")
    out.append("# TYPE magicdns_answers_total counter")
    for path in ("answered_fast", "answered_slow", "forwarded", "cache_answers", "refused_clients",
                 "dropped", "no_upstream", "looped"):
        _line(out, "magicdns_answers_total", q[path], {"path": path})
    out.append("# TYPE magicdns_view_version gauge")
    _line(out, "magicdns_view_version", status["view"]["version"] or 0)
    out.append("# TYPE magicdns_view_hosts gauge")
    _line(out, "magicdns_view_hosts", status["view"]["hosts"])
    out.append("# TYPE magicdns_tcp_connections gauge")
    _line(out, "magicdns_tcp_connections", status["tcp"]["connections"])
    out.append("# TYPE magicdns_tcp_rejected_total counter")
    _line(out, "magicdns_tcp_rejected_total", status["tcp"]["rejected"])
    fwd = status["forwarder"]
    out.append("# TYPE magicdns_forwarder_total counter")
    for key in ("queries", "sent", "answered", "servfail", "timeouts", "tcp_fallbacks", "stale_answers",
                "overload", "rebind_blocked", "dropped_mismatch", "looped"):
        _line(out, "magicdns_forwarder_total", fwd.get(key), {"event": key})
    out.append("# TYPE magicdns_forwarder_inflight gauge")
    _line(out, "magicdns_forwarder_inflight", fwd.get("inflight"))
    out.append("# TYPE magicdns_upstream_total counter")
    for up, h in fwd.get("upstreams", {}).items():
        for key in ("sent", "answered", "servfail", "timeouts", "tcp_fallbacks"):
            _line(out, "magicdns_upstream_total", h.get(key), {"upstream": up, "event": key})
    out.append("# TYPE magicdns_upstream_srtt_ms gauge")
    for up, h in fwd.get("upstreams", {}).items():
        _line(out, "magicdns_upstream_srtt_ms", h.get("srtt_ms"), {"upstream": up})
    cache = fwd.get("cache") or {}
    out.append("# TYPE magicdns_cache gauge")
    for key, value in cache.items():
        _line(out, "magicdns_cache", value, {"figure": key})
    return "\n".join(out) + "\n"


def make_app(server: DnsServer, extra_status: Any = None) -> web.Application:
    """GET /status (JSON), GET /metrics (Prometheus), GET /query?name=&type= (JSON)."""

    def status() -> dict[str, Any]:
        s = server.status()
        if extra_status is not None:
            s.update(extra_status())
        return s

    async def get_status(_: web.Request) -> web.Response:
        return web.json_response(status(), dumps=lambda o: json.dumps(o, indent=2))

    async def get_metrics(_: web.Request) -> web.Response:
        return web.Response(text=prometheus_text(server.status()), content_type="text/plain",
                            charset="utf-8", headers={"X-Format": "prometheus-0.0.4"})

    async def get_query(request: web.Request) -> web.Response:
        name = request.query.get("name")
        qtype = request.query.get("type", "A")
        if not name:
            return web.json_response({"error": "name is required"}, status=400)
        try:
            return web.json_response(await server.query(name, qtype))
        except Exception as exc:  # a bad type or name: the client gets the reason
            return web.json_response({"error": str(exc)}, status=400)

    app = web.Application()
    app.router.add_get("/status", get_status)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/query", get_query)
    app[_SERVER] = server
    return app


_SERVER = web.AppKey("server", DnsServer)


def make_metrics_app(server: DnsServer) -> web.Application:
    """GET /metrics only: what the TCP metrics listener serves (anything else is 404)."""

    async def get_metrics(_: web.Request) -> web.Response:
        return web.Response(text=prometheus_text(server.status()), content_type="text/plain",
                            charset="utf-8", headers={"X-Format": "prometheus-0.0.4"})

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    return app


class ApiRunners:
    """The control-socket runner and the metrics-only runner, cleaned up together."""

    def __init__(self, runners: list[web.AppRunner]) -> None:
        self.runners = runners

    async def cleanup(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


async def start_api(app: web.Application, socket_path: str | None,
                    metrics: tuple[str, int] | None) -> ApiRunners:
    """Serve `app` on a unix socket (mode 0600), and `/metrics` alone on a TCP address."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    runners = ApiRunners([runner])
    if socket_path:
        if os.path.exists(socket_path):
            os.unlink(socket_path)  # a stale socket of a previous run
        os.makedirs(os.path.dirname(os.path.abspath(socket_path)), exist_ok=True)
        site = web.UnixSite(runner, socket_path)
        await site.start()
        os.chmod(socket_path, 0o600)
    if metrics:
        metrics_runner = web.AppRunner(make_metrics_app(app[_SERVER]), access_log=None)
        await metrics_runner.setup()
        runners.runners.append(metrics_runner)
        await web.TCPSite(metrics_runner, metrics[0], metrics[1]).start()
    return runners
