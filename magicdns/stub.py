"""A stub resolver for the names we need before our own DNS works, asking the system's *original*
resolvers and never 100.100.100.100.

Who needs it: the resolver itself (an upstream given by name, `--upstream dns.example:53`) and the
node (its login server, relay servers). Once a node runs, /etc/resolv.conf points at us, so
asking the system resolver (glibc) for those names would ask ourselves: at start, before we
answer, that is a deadlock; later it is a loop through our own forwarder. This module asks the
nameservers `sysresolv.read_original_resolvers` finds (the backup of resolv.conf a configurator
made, ourselves always skipped) through c-ares (aiodns), asynchronously, with /etc/hosts first as
glibc does.

API (async, call from a running event loop):

    resolver = StubResolver.from_system()            # or StubResolver([Upstream("192.0.2.53")])
    addrs = await resolver.resolve("login.example")  # tuple of IPv4Address/IPv6Address
    await resolver.close()

    addrs = await resolve_host("login.example")      # one-shot: from_system, resolve, close

`resolve` raises `StubError` (a subclass of OSError, so callers that handle connection errors
handle it too) when the name does not resolve, the resolvers do not answer, or there are none.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

import aiodns
import pycares

from .sysresolv import read_original_resolvers
from .upstream import Upstream

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_TIMEOUT = 2.0  # seconds per try, as glibc's default of 5 is long for a start-up path
DEFAULT_TRIES = 2


class StubError(OSError):
    """A name the stub resolver could not resolve; the message says why."""


HOSTS_FILE = "/etc/hosts"


def hosts_file_addresses(name: str, path: str | Path = HOSTS_FILE) -> tuple[Address, ...]:
    """The addresses a hosts file gives `name` (case-insensitive), IPv4 first; () when none or unreadable."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ()
    want = name.lower().rstrip(".")
    found: list[Address] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2 or want not in (w.lower().rstrip(".") for w in words[1:]):
            continue
        try:
            addr = ipaddress.ip_address(words[0].split("%", 1)[0])
        except ValueError:
            continue
        if addr not in found:
            found.append(addr)
    return tuple(sorted(found, key=lambda a: a.version))


def _server_spec(up: Upstream) -> str:
    return f"[{up.host}]:{up.port}" if up.family_v6 else f"{up.host}:{up.port}"


class _UnmonitoredResolver(aiodns.DNSResolver):
    """aiodns without c-ares's event thread. That thread watches /etc/resolv.conf and reloads the
    system configuration when it changes - and ours points at 100.100.100.100, the one server this
    resolver must never ask; rather than rely on c-ares keeping our servers over a reload, nothing
    is reloaded. Sockets are driven by the event loop instead (aiodns's own fallback path,
    `sock_state_cb`; `_make_channel` is aiodns's hook for it, pinned by tests/unit/test_stub.py)."""

    def _make_channel(self, **kwargs: Any) -> tuple[bool, pycares.Channel]:
        weak_self = weakref.ref(self)

        def sock_state(fd: int, readable: bool, writable: bool) -> None:
            this = weak_self()
            if this is not None:
                this._sock_state_cb(fd, readable, writable)

        return False, pycares.Channel(sock_state_cb=sock_state, timeout=self._timeout, **kwargs)


class StubResolver:
    """Resolves host names against fixed nameservers (see the module docstring)."""

    def __init__(self, nameservers: Sequence[Upstream], *, timeout: float = DEFAULT_TIMEOUT,
                 tries: int = DEFAULT_TRIES, use_hosts_file: bool = True) -> None:
        if not nameservers:
            raise StubError("no nameserver to ask: the system's original resolvers are unknown")
        self.nameservers = tuple(nameservers)
        self._timeout = timeout
        self._tries = tries
        self._hosts_file = HOSTS_FILE if use_hosts_file else None
        self._resolver: aiodns.DNSResolver | None = None

    @classmethod
    def from_system(cls, resolv_conf: str | Path = "/etc/resolv.conf", backup_path: str | Path | None = None,
                    own_addresses: Iterable[Upstream] = (), **kwargs: object) -> "StubResolver":
        """A resolver for the system's original nameservers (ourselves skipped). Raises StubError
        when there are none, and sysresolv.ResolvConfError when a file cannot be read."""
        servers = read_original_resolvers(resolv_conf, backup_path, own_addresses)
        if not servers:
            raise StubError(f"no usable nameserver in {resolv_conf} (or its backup)")
        return cls(servers, **kwargs)  # type: ignore[arg-type]

    def _channel(self) -> aiodns.DNSResolver:
        if self._resolver is None:
            # Servers given at creation, not set afterwards: c-ares counts them as the caller's
            # choice, not the system's.
            self._resolver = _UnmonitoredResolver(
                servers=[_server_spec(u) for u in self.nameservers], timeout=self._timeout, tries=self._tries,
                flags=pycares.ARES_FLAG_NOSEARCH)
        return self._resolver

    async def resolve(self, host: str, family: int = socket.AF_UNSPEC) -> tuple[Address, ...]:
        """Every address of `host` (IPv4 first, then IPv6, each in the order given); an IP
        literal is returned as it is. `family` is AF_INET, AF_INET6 or AF_UNSPEC (both)."""
        name = host.strip().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        try:
            return (ipaddress.ip_address(name.split("%", 1)[0]),)
        except ValueError:
            pass
        if not name:
            raise StubError("empty host name")
        families = (socket.AF_INET, socket.AF_INET6) if family == socket.AF_UNSPEC else (family,)
        if self._hosts_file is not None:
            pinned = tuple(a for a in hosts_file_addresses(name, self._hosts_file)
                           if family == socket.AF_UNSPEC or (a.version == 4) == (family == socket.AF_INET))
            if pinned:
                return pinned  # as glibc's "files dns": the hosts file wins
        channel = self._channel()
        found: list[Address] = []
        errors: list[str] = []
        # One query per family, one after the other: a resolver that refuses AAAA (dnsmasq without
        # upstreams does) must not fail the A answer. Plain queries, not c-ares's getaddrinfo: that
        # failed now and then without sending a packet ("Could not contact DNS servers").
        for fam in families:
            qtype = "A" if fam == socket.AF_INET else "AAAA"
            try:
                result = await channel.query_dns(name, qtype)
            except aiodns.error.DNSError as exc:
                errors.append(exc.args[1] if len(exc.args) > 1 else str(exc))
                continue
            for record in result.answer:  # a recursive resolver's answer: CNAME chain, then addresses
                if record.type in (1, 28):
                    addr = ipaddress.ip_address(record.data.addr)
                    if addr not in found:
                        found.append(addr)
        if not found:
            reason = errors[0] if errors else "no address"
            raise StubError(f"cannot resolve {name}: {reason} (asked {self._servers_text()})")
        return tuple(found)

    def _servers_text(self) -> str:
        return ", ".join(u.spec for u in self.nameservers)

    async def close(self) -> None:
        if self._resolver is not None:
            resolver, self._resolver = self._resolver, None
            await resolver.close()

    async def __aenter__(self) -> "StubResolver":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def resolve_host(host: str, family: int = socket.AF_UNSPEC, *,
                       resolv_conf: str | Path = "/etc/resolv.conf", backup_path: str | Path | None = None,
                       own_addresses: Iterable[Upstream] = ()) -> tuple[Address, ...]:
    """One name through the system's original resolvers: `StubResolver.from_system` + `resolve`."""
    resolver = StubResolver.from_system(resolv_conf, backup_path, own_addresses)
    async with resolver:
        return await resolver.resolve(host, family)


async def resolve_upstreams(specs: Iterable[str], resolver: StubResolver | None = None, *,
                            resolv_conf: str | Path = "/etc/resolv.conf",
                            own_addresses: Iterable[Upstream] = ()) -> tuple[Upstream, ...]:
    """Upstream specs where a host may be a name (`dns.example`, `dns.example:5353`): names are
    resolved through the stub (every address becomes an upstream), addresses parsed as they are.
    Raises upstream.UpstreamError for a malformed spec and StubError for a name that does not resolve."""
    import dataclasses

    from .upstream import UpstreamError, encrypted_by_name, parse_upstream, split_host_port

    specs = list(specs)
    out: list[Upstream] = []
    own_resolver = resolver is None
    try:
        for spec in specs:
            named = None
            try:
                out.append(parse_upstream(spec))
                continue
            except UpstreamError:
                named = encrypted_by_name(spec)  # tls://NAME or https://NAME/...: connect to NAME's addresses
                if named is not None:
                    host, port = named.tls_name, named.port
                else:
                    host, port = split_host_port(spec)  # raises UpstreamError when it is not HOST[:PORT]
            if resolver is None:
                resolver = StubResolver.from_system(resolv_conf, own_addresses=own_addresses)
            addrs = await resolver.resolve(host)
            if named is not None:
                out.extend(dataclasses.replace(named, host=str(a)) for a in addrs)
            else:
                out.extend(Upstream(str(a), port) for a in addrs)
    finally:
        if own_resolver and resolver is not None:
            await resolver.close()
    return tuple(out)


def resolve_upstreams_sync(specs: Iterable[str], **kwargs: object) -> tuple[Upstream, ...]:
    """`resolve_upstreams` for code outside an event loop (the command line, at start)."""
    return asyncio.run(resolve_upstreams(specs, **kwargs))  # type: ignore[arg-type]


class AiohttpStubResolver:
    """The stub as an aiohttp resolver, for HTTP clients that must not depend on our own DNS
    (the node's control client, relay connections):

        connector = aiohttp.TCPConnector(resolver=AiohttpStubResolver(StubResolver.from_system()))
    """

    def __init__(self, stub: StubResolver) -> None:
        self.stub = stub

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        addrs = await self.stub.resolve(host, family)
        return [{"hostname": host, "host": str(a), "port": port,
                 "family": socket.AF_INET if a.version == 4 else socket.AF_INET6,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in addrs]

    async def close(self) -> None:
        await self.stub.close()


def _register_with_aiohttp() -> None:
    # Registered as a virtual subclass so aiohttp's connector accepts it, without importing aiohttp
    # for every user of this module at class-definition time.
    try:
        from aiohttp.abc import AbstractResolver
    except ImportError:  # aiohttp is a dependency, but the stub itself does not need it
        return
    AbstractResolver.register(AiohttpStubResolver)


_register_with_aiohttp()
