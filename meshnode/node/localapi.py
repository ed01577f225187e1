"""The LocalAPI: HTTP over a root-only unix socket, for the `meshnode` CLI.

    GET  /localapi/v0/status              self, peers, state, health
    POST /localapi/v0/up                  {login_server, authkey, hostname, accept_dns, ...}
    POST /localapi/v0/set                 {accept_dns, shields_up, ...}: change only these prefs
    GET  /localapi/v0/whois?addr=IP[:PORT] the node and user owning a tailnet address
    GET  /localapi/v0/version             daemon and control server versions
    GET  /localapi/v0/serve               served ports, where they listen, errors
    POST /localapi/v0/serve               {kind: tcp|http, port, target}
    POST /localapi/v0/serve/off           {port}
    POST /localapi/v0/serve/reset
    POST /localapi/v0/down
    POST /localapi/v0/logout
    GET  /localapi/v0/ip?family=4|6&peer=NAME
    POST /localapi/v0/ping                {peer, count, timeout}
    GET  /localapi/v0/netcheck?timeout=S  UDP port, endpoints, control server reachable, handshakes
    GET  /localapi/v0/dns/status
    POST /localapi/v0/dns/query           {name, type}
    GET  /localapi/v0/cert/ca             the tailnet CA certificate {ca, domain}
    POST /localapi/v0/cert                {csr, name}: the tailnet CA signs it for this node's names
    POST /localapi/v0/lock                {command, params}: `meshnode lock COMMAND` run by the daemon

Every answer is JSON; an error is `{"error": "..."}` with a 4xx/5xx status. Who may call is decided
by the socket's permissions (0600, owned by the daemon's user), as with Tailscale's socket.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from .apitypes import (API_PREFIX, ApiError, parse_cert, parse_ip, parse_netcheck, parse_ping, parse_query,
                       parse_serve, parse_serve_off, parse_set, parse_up, parse_whois)
from .errors import (ControlFailed, ControlRefused, InvalidRequest, NodeError, NotFound, NotReady, SystemFailure,
                     TimedOut)

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("meshnode.node.localapi")

MAX_BODY = 64 * 1024


class LocalApiError(RuntimeError):
    """The socket cannot be created (path in use by a live daemon, bad directory)."""


async def _json_body(request: web.Request) -> Any:
    if request.content_length is None and not request.can_read_body:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def _ok(obj: Any) -> web.Response:
    return web.json_response(obj)


# The one place where the backend's reasons become HTTP statuses (the CLI maps those to exit codes).
STATUS: dict[type[NodeError], int] = {
    InvalidRequest: 400,
    ControlRefused: 403,
    NotFound: 404,
    NotReady: 409,
    SystemFailure: 500,
    ControlFailed: 502,
    TimedOut: 504,
}


def _error(status: int, message: str, detail: str = "") -> web.Response:
    body = {"error": message}
    if detail:
        body["detail"] = detail
    return web.json_response(body, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:  # the request itself was malformed (apitypes' parsers)
        return _error(exc.status, exc.message, exc.detail)
    except NodeError as exc:  # the backend refused or failed: its reason, as an HTTP status
        return _error(STATUS.get(type(exc), 500), exc.message, exc.detail)
    except web.HTTPRequestEntityTooLarge:
        return web.json_response({"error": f"request body larger than {MAX_BODY} bytes"}, status=413)
    except web.HTTPException as exc:
        # aiohttp's own 404/405: keep the status, make the body JSON like every other error.
        return web.json_response({"error": exc.reason}, status=exc.status)
    except Exception:
        log.exception("localapi: %s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error (see the daemon's log)"}, status=500)


def make_app(daemon: "Daemon") -> web.Application:
    """The aiohttp application; separate from the socket so tests can drive it directly."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)

    async def status(request: web.Request) -> web.Response:
        return _ok(daemon.status())

    async def up(request: web.Request) -> web.Response:
        return _ok(await daemon.up(parse_up(await _json_body(request))))

    async def set_prefs(request: web.Request) -> web.Response:
        return _ok(await daemon.set_prefs(parse_set(await _json_body(request))))

    async def whois(request: web.Request) -> web.Response:
        return _ok(daemon.whois(parse_whois(dict(request.query))))

    async def version(request: web.Request) -> web.Response:
        return _ok(await daemon.version())

    async def serve_status(request: web.Request) -> web.Response:
        return _ok(daemon.serve_status())

    async def serve_set(request: web.Request) -> web.Response:
        return _ok(await daemon.serve_set(parse_serve(await _json_body(request))))

    async def serve_off(request: web.Request) -> web.Response:
        return _ok(await daemon.serve_off(parse_serve_off(await _json_body(request))))

    async def serve_reset(request: web.Request) -> web.Response:
        await _json_body(request)
        return _ok(await daemon.serve_reset())

    async def down(request: web.Request) -> web.Response:
        await _json_body(request)
        return _ok(await daemon.down())

    async def logout(request: web.Request) -> web.Response:
        await _json_body(request)
        return _ok(await daemon.logout())

    async def ip(request: web.Request) -> web.Response:
        return _ok(daemon.ip(parse_ip(dict(request.query))))

    async def ping(request: web.Request) -> web.Response:
        return _ok(await daemon.ping(parse_ping(await _json_body(request))))

    async def netcheck(request: web.Request) -> web.Response:
        return _ok(await daemon.netcheck(parse_netcheck(dict(request.query))))

    async def dns_status(request: web.Request) -> web.Response:
        return _ok(await daemon.dns_status())

    async def dns_query(request: web.Request) -> web.Response:
        return _ok(await daemon.dns_query(parse_query(await _json_body(request))))

    app.router.add_get(API_PREFIX + "/status", status)
    app.router.add_post(API_PREFIX + "/up", up)
    app.router.add_post(API_PREFIX + "/set", set_prefs)
    app.router.add_get(API_PREFIX + "/whois", whois)
    app.router.add_get(API_PREFIX + "/version", version)
    app.router.add_get(API_PREFIX + "/serve", serve_status)
    app.router.add_post(API_PREFIX + "/serve", serve_set)
    app.router.add_post(API_PREFIX + "/serve/off", serve_off)
    app.router.add_post(API_PREFIX + "/serve/reset", serve_reset)
    app.router.add_post(API_PREFIX + "/down", down)
    app.router.add_post(API_PREFIX + "/logout", logout)
    app.router.add_get(API_PREFIX + "/ip", ip)
    app.router.add_post(API_PREFIX + "/ping", ping)
    app.router.add_get(API_PREFIX + "/netcheck", netcheck)
    app.router.add_get(API_PREFIX + "/dns/status", dns_status)
    app.router.add_post(API_PREFIX + "/dns/query", dns_query)

    async def cert_ca(request: web.Request) -> web.Response:
        return _ok(daemon.ca_cert())

    async def cert(request: web.Request) -> web.Response:
        req = parse_cert(await _json_body(request))
        return _ok(await daemon.sign_cert(req.csr, req.name))

    app.router.add_get(API_PREFIX + "/cert/ca", cert_ca)
    app.router.add_post(API_PREFIX + "/cert", cert)

    async def lock_command(request: web.Request) -> web.Response:
        return _ok(await daemon.lock_command(await _json_body(request)))

    app.router.add_post(API_PREFIX + "/lock", lock_command)
    return app


def claim_socket_path(path: Path) -> None:
    """Make `path` usable for our socket: refuse a live daemon's socket or a non-socket, drop a stale one."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LocalApiError(f"LocalAPI socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise LocalApiError(f"{path} exists and is not a socket; refusing to replace it")
    import socket
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink()  # left by a daemon that died: nobody listens on it
        return
    finally:
        probe.close()
    raise LocalApiError(f"{path}: another meshnode daemon is listening there")


class LocalApiServer:
    """The LocalAPI bound to its unix socket."""

    def __init__(self, daemon: "Daemon", path: Path) -> None:
        self.daemon = daemon
        self.path = Path(path)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        claim_socket_path(self.path)
        runner = web.AppRunner(make_app(self.daemon), access_log=None)
        await runner.setup()
        try:
            await self._bind(runner)
        except OSError as exc:
            await runner.cleanup()
            raise LocalApiError(f"LocalAPI socket {self.path}: {exc.strerror or exc}") from None
        self._runner = runner

    async def _bind(self, runner: web.AppRunner) -> None:
        # The umask closes the window between bind() and chmod() in which others could connect.
        old = os.umask(0o177)
        try:
            await web.UnixSite(runner, str(self.path)).start()
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
