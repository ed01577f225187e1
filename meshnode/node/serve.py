"""`meshnode serve`: share a service running on this machine with the tailnet (Tailscale Serve).

    serve --tcp 2222 tcp://127.0.0.1:22          a TCP port on the node's tailnet addresses, piped
    serve --http 80 http://127.0.0.1:8080        a reverse proxy that tells the service who calls

The HTTP proxy removes every `Tailscale-*` header the caller sent and adds the caller's identity
as Tailscale's serve does (`Tailscale-User-Login`, `Tailscale-User-Name`; tagged nodes carry no user
identity, so they get none), taken from the network map: the node owning the connection's source
tailnet address. Listeners bind the tailnet addresses only, so the tunnel's ACL packet filter
decides who reaches them: the proxy only ever sees connections the policy let through.

The configuration (`ServeConfig`) is a frozen value saved as `serve.json` in the state directory and
put back after a restart; `ServeRunner` does the I/O and is told the node's tailnet addresses by the
daemon whenever they change.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import json
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import aiohttp
from aiohttp import web

from .atomicfile import atomic_write

log = logging.getLogger("meshnode.node.serve")

IDENTITY_PREFIX = "tailscale-"       # every caller-sent header with this prefix is dropped
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"})
MAX_ENTRIES = 64
COPY_CHUNK = 64 * 1024
IP_FREEBIND = 15                     # linux/in.h: bind an address not (yet) on an interface


class ServeError(ValueError):
    """A serve request that cannot be done; the message says why and what to do."""


class PortInUse(ServeError):
    """Another program (or another serve entry) already listens on the port."""


class Kind(enum.Enum):
    TCP = "tcp"
    HTTP = "http"


@dataclass(frozen=True, slots=True)
class ServeEntry:
    """One port shared with the tailnet and where it goes."""

    port: int
    kind: Kind
    target: str      # tcp: "127.0.0.1:22"; http: "http://127.0.0.1:8080" (no trailing slash)

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "kind": self.kind.value, "target": self.target}


@dataclass(frozen=True, slots=True)
class ServeConfig:
    entries: tuple[ServeEntry, ...] = ()

    def with_entry(self, entry: ServeEntry) -> "ServeConfig":
        others = tuple(e for e in self.entries if e.port != entry.port)
        if len(others) >= MAX_ENTRIES:
            raise ServeError(f"at most {MAX_ENTRIES} ports can be served")
        return ServeConfig(tuple(sorted(others + (entry,), key=lambda e: e.port)))

    def without(self, port: int) -> "ServeConfig":
        if all(e.port != port for e in self.entries):
            raise ServeError(f"port {port} is not served (`meshnode serve status` lists what is)")
        return ServeConfig(tuple(e for e in self.entries if e.port != port))

    def to_json(self) -> dict[str, Any]:
        return {"entries": [e.to_json() for e in self.entries]}


def _check_port(value: Any, what: str = "port") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ServeError(f"{what}: expected a port number from 1 to 65535")
    return value


def _loopback_host_port(host: str | None, port: int | None, text: str) -> tuple[str, int]:
    if not host or port is None:
        raise ServeError(f"{text!r}: expected a host and a port, e.g. 127.0.0.1:8080")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        # Serving is for services on this machine; forwarding the tailnet elsewhere would make the
        # node an open relay past the ACLs of the network it forwards into.
        raise ServeError(f"{text!r}: serve forwards to this machine only (127.0.0.1, ::1 or localhost)")
    return host, _check_port(port, "target port")


def parse_target(kind: Kind, text: str) -> str:
    """The normalised target of a `--tcp` or `--http` entry; `ServeError` says what is wrong."""
    raw = text.strip()
    if raw.isdigit():  # `serve --http 80 8080`, as tailscale accepts
        raw = f"{kind.value}://127.0.0.1:{raw}"
    elif "://" not in raw:
        raw = f"{kind.value}://{raw}"
    try:
        url = urlparse(raw)
        port = url.port
    except ValueError as exc:
        raise ServeError(f"{text!r}: {exc}") from None
    if kind is Kind.TCP:
        if url.scheme != "tcp" or url.path not in ("", "/"):
            raise ServeError(f"{text!r}: a --tcp target looks like tcp://127.0.0.1:PORT")
        host, port = _loopback_host_port(url.hostname, port, text)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if url.scheme == "https":
        raise ServeError(f"{text!r}: proxying to https:// is not supported; use http:// to the local service")
    if url.scheme != "http":
        raise ServeError(f"{text!r}: an --http target looks like http://127.0.0.1:PORT")
    host, port = _loopback_host_port(url.hostname, port, text)
    hostpart = f"[{host}]" if ":" in host else host
    return f"http://{hostpart}:{port}{url.path.rstrip('/')}"


def parse_config(obj: Any) -> ServeConfig:
    """The stored or requested form; raises `ServeError`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("entries", []), list):
        raise ServeError("serve config must be an object with a list of entries")
    config = ServeConfig()
    for item in obj.get("entries", []):
        if not isinstance(item, dict):
            raise ServeError("serve entry must be an object")
        try:
            kind = Kind(item.get("kind"))
        except ValueError:
            raise ServeError(f"kind: expected tcp or http, not {item.get('kind')!r}") from None
        target = item.get("target")
        if not isinstance(target, str):
            raise ServeError("target: expected a string")
        config = config.with_entry(ServeEntry(_check_port(item.get("port")), kind, parse_target(kind, target)))
    return config


def load_config(path: Path) -> ServeConfig:
    """What `serve.json` holds; a damaged file is set aside (logged) rather than stopping the daemon."""
    try:
        return parse_config(json.loads(path.read_text()))
    except FileNotFoundError:
        return ServeConfig()
    except (OSError, ValueError) as exc:
        log.error("serve: %s is unusable (%s); serving nothing until `meshnode serve` sets it again", path, exc)
        return ServeConfig()


def save_config(path: Path, config: ServeConfig) -> None:
    atomic_write(path, json.dumps(config.to_json(), indent=2) + "\n")


# -- identity headers (pure) ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Caller:
    """Who owns the source address of a connection, from the network map."""

    address: str
    node: str                 # FQDN
    user: str                 # login name of the owner ("" for tagged nodes)
    tags: tuple[str, ...] = ()


def proxied_headers(incoming: Any, caller: Caller | None, host: str) -> dict[str, str]:
    """The request headers sent to the local service: the caller's `Tailscale-*` headers and the
    hop-by-hop ones dropped, the identity of `caller` added (users only, as Tailscale: a tagged node
    speaks for no user)."""
    out: dict[str, str] = {}
    for name, value in incoming.items():
        low = name.lower()
        if low.startswith(IDENTITY_PREFIX) or low in HOP_BY_HOP or low.startswith("x-forwarded-"):
            continue
        out[name] = value
    out["Host"] = host
    if caller is not None:
        out["X-Forwarded-For"] = caller.address
        if caller.user and not caller.tags:
            out["Tailscale-User-Login"] = caller.user
            out["Tailscale-User-Name"] = caller.user.split("@")[0]
    out["X-Forwarded-Proto"] = "http"
    return out


# -- the I/O ----------------------------------------------------------------------------------------

def _listen_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # The tailnet addresses may be placed on the TUN just after us (startup, a new map).
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


@dataclass
class _Listener:
    entry: ServeEntry
    addresses: tuple[str, ...]
    servers: list[Any] = field(default_factory=list)   # asyncio servers / aiohttp runners
    connections: int = 0

    async def close(self) -> None:
        for srv in self.servers:
            if isinstance(srv, web.AppRunner):
                await srv.cleanup()
            else:
                srv.close()
                await srv.wait_closed()
        self.servers.clear()


class ServeRunner:
    """The listeners of a `ServeConfig` on the node's tailnet addresses."""

    def __init__(self, identify: Callable[[str], Caller | None]) -> None:
        self.identify = identify
        self.addresses: tuple[str, ...] = ()
        self._listeners: dict[int, _Listener] = {}
        self._errors: dict[int, str] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def apply(self, config: ServeConfig, addresses: tuple[str, ...], strict_port: int | None = None) -> None:
        """Listen for exactly `config` on `addresses`. A port that cannot be bound is recorded (status
        shows it); when it is `strict_port` (the entry being added) `PortInUse`/`ServeError` is raised
        and nothing of it is left listening."""
        wanted = {e.port: e for e in config.entries}
        for port in list(self._listeners):
            old = self._listeners[port]
            if wanted.get(port) != old.entry or old.addresses != addresses:
                del self._listeners[port]
                await old.close()
        self.addresses = addresses
        self._errors = {p: m for p, m in self._errors.items() if p in wanted}
        for port, entry in wanted.items():
            if port in self._listeners or not addresses:
                continue
            try:
                self._listeners[port] = await self._open(entry, addresses)
                self._errors.pop(port, None)
            except ServeError as exc:
                self._errors[port] = str(exc)
                log.error("serve: port %d: %s", port, exc)
                if port == strict_port:
                    raise

    async def close(self) -> None:
        for listener in list(self._listeners.values()):
            await listener.close()
        self._listeners.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def status(self, config: ServeConfig) -> list[dict[str, Any]]:
        out = []
        for e in config.entries:
            lst = self._listeners.get(e.port)
            out.append({**e.to_json(), "listening": [f"[{a}]:{e.port}" if ":" in a else f"{a}:{e.port}"
                                                     for a in (lst.addresses if lst else ())],
                        "connections": lst.connections if lst else 0,
                        "error": self._errors.get(e.port) or (None if lst or self.addresses else
                                                              "waiting for the tunnel and the node's addresses")})
        return out

    async def _open(self, entry: ServeEntry, addresses: tuple[str, ...]) -> _Listener:
        listener = _Listener(entry, addresses)
        socks: list[socket.socket] = []
        try:
            for addr in addresses:
                try:
                    socks.append(_listen_socket(addr, entry.port))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise PortInUse(f"port {entry.port} on {addr} is already in use by another program;"
                                        " choose another port or stop that program") from None
                    if exc.errno == errno.EACCES:
                        raise ServeError(f"port {entry.port}: permission denied (ports below 1024 need root)") from None
                    raise ServeError(f"cannot listen on {addr} port {entry.port}: {exc.strerror}") from None
            if entry.kind is Kind.TCP:
                for sock in socks:
                    listener.servers.append(await asyncio.start_server(
                        lambda r, w, lst=listener: self._pipe(lst, r, w), sock=sock))
            else:
                runner = web.AppRunner(self._proxy_app(listener), access_log=None, shutdown_timeout=1.0)
                await runner.setup()
                listener.servers.append(runner)
                for sock in socks:
                    await web.SockSite(runner, sock).start()
        except BaseException:
            for sock in socks:
                sock.close()
            await listener.close()
            raise
        log.info("serve: %s port %d -> %s on %s", entry.kind.value, entry.port, entry.target, ", ".join(addresses))
        return listener

    # -- TCP --------------------------------------------------------------------------------------

    async def _pipe(self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = listener.entry.target.rpartition(":")
        listener.connections += 1
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(host.strip("[]"), int(port)), 10)
            except (OSError, asyncio.TimeoutError) as exc:
                log.warning("serve: tcp port %d: cannot reach %s: %s", listener.entry.port,
                            listener.entry.target, exc)
                return
            try:
                await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            listener.connections -= 1
            writer.close()

    # -- HTTP -------------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=300),
                cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    def _proxy_app(self, listener: _Listener) -> web.Application:
        target = listener.entry.target

        async def proxy(request: web.Request) -> web.StreamResponse:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            source = peer[0] if peer else ""
            caller = self.identify(source) if source else None
            headers = proxied_headers(request.headers, caller, request.host)
            listener.connections += 1
            try:
                if request.headers.get("Upgrade", "").lower() == "websocket":
                    return await self._websocket(request, target, headers)
                body = request.content.iter_chunked(COPY_CHUNK) if request.body_exists else None
                async with self._http().request(request.method, target + request.rel_url.raw_path_qs,
                                                headers=headers, data=body, allow_redirects=False) as up:
                    resp = web.StreamResponse(status=up.status, reason=up.reason)
                    for name, value in up.headers.items():
                        if name.lower() not in HOP_BY_HOP:
                            resp.headers.add(name, value)
                    if up.headers.get("Content-Length") is not None and "Content-Encoding" not in up.headers:
                        resp.content_length = int(up.headers["Content-Length"])
                    await resp.prepare(request)
                    async for chunk in up.content.iter_chunked(COPY_CHUNK):
                        await resp.write(chunk)
                    await resp.write_eof()
                    return resp
            except (aiohttp.ClientConnectorError, asyncio.TimeoutError):
                return web.Response(status=502, text=f"meshnode serve: the local service at {target}"
                                    " does not answer\n")
            finally:
                listener.connections -= 1

        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", proxy)
        return app

    async def _websocket(self, request: web.Request, target: str, headers: dict[str, str]) -> web.StreamResponse:
        """A WebSocket through the proxy: connect to the service first (with the identity headers),
        then accept the caller's upgrade and relay messages both ways."""
        ws_headers = {k: v for k, v in headers.items() if not k.lower().startswith("sec-websocket-")}
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        try:
            upstream = await self._http().ws_connect("ws" + target[4:] + request.rel_url.raw_path_qs,
                                                     headers=ws_headers, protocols=protocols, autoping=True)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return web.Response(status=502, text=f"meshnode serve: the local service at {target}"
                                " refused the WebSocket\n")
        caller_ws = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else ())
        await caller_ws.prepare(request)
        try:
            await asyncio.gather(_relay_ws(caller_ws, upstream), _relay_ws(upstream, caller_ws))
        finally:
            await upstream.close()
        return caller_ws


async def _relay_ws(source: Any, sink: Any) -> None:
    """Messages from one WebSocket to the other until either closes."""
    async for msg in source:
        if msg.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        else:
            break
    await sink.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(COPY_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the other side still sends its answer
    except (ConnectionError, OSError):
        writer.close()
