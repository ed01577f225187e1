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
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

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
        return (await self.resolve_with_ttl(host, family))[0]

    async def resolve_with_ttl(self, host: str, family: int = socket.AF_UNSPEC) -> tuple[tuple[Address, ...], int | None]:
        """`resolve`, and the smallest TTL of the address records (None: a literal or the hosts file)."""
        name = host.strip().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        try:
            return (ipaddress.ip_address(name.split("%", 1)[0]),), None
        except ValueError:
            pass
        if not name:
            raise StubError("empty host name")
        families = (socket.AF_INET, socket.AF_INET6) if family == socket.AF_UNSPEC else (family,)
        if self._hosts_file is not None:
            pinned = tuple(a for a in hosts_file_addresses(name, self._hosts_file)
                           if family == socket.AF_UNSPEC or (a.version == 4) == (family == socket.AF_INET))
            if pinned:
                return pinned, None  # as glibc's "files dns": the hosts file wins
        channel = self._channel()
        found: list[Address] = []
        ttl: int | None = None
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
                    ttl = record.ttl if ttl is None else min(ttl, record.ttl)
                    if addr not in found:
                        found.append(addr)
        if not found:
            reason = errors[0] if errors else "no address"
            raise StubError(f"cannot resolve {name}: {reason} (asked {self._servers_text()})")
        return tuple(found), ttl

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


class NameCache:
    """Addresses of the host names in upstream URLs (`tls://dns.example`), asked of a StubResolver
    (never of ourselves) and kept for their TTL, clamped to [MIN_TTL, MAX_TTL]; one lookup in
    flight per name. `forget` after a connection to every address failed makes the next use
    re-resolve; should that lookup fail, the old addresses are used once more (stale on error) and
    a failed name is not asked again for NEGATIVE_TTL, so a dead resolver is not asked per query.

    A stub is made per lookup (`make_stub`) and closed after it: c-ares keeps answers of its own
    for their TTL, which would hand `forget` the very addresses that just failed, and a fresh one
    reads the system's resolvers as they are now. Lookups are rare (once per TTL per name), so
    this costs nothing that matters. `clock` is monotonic seconds, passed in for tests."""

    MIN_TTL = 30.0
    MAX_TTL = 3600.0
    HOSTS_TTL = 300.0  # hosts-file entries have no TTL: re-read every five minutes
    NEGATIVE_TTL = 5.0

    def __init__(self, make_stub: "Callable[[], StubResolver]", clock: "Callable[[], float]" = time.monotonic) -> None:
        self._make_stub = make_stub
        self.clock = clock
        # name -> (addresses, fresh until); addresses stay after expiry for stale-on-error
        self._entries: dict[str, tuple[tuple[Address, ...], float]] = {}
        self._failed: dict[str, tuple[StubError, float]] = {}
        self._inflight: dict[str, asyncio.Future[tuple[Address, ...]]] = {}
        self.lookups = 0

    async def addresses(self, name: str) -> tuple[Address, ...]:
        """NAME's addresses (IPv4 first); raises StubError when it has none and never had."""
        key = name.lower().rstrip(".")
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None and now < entry[1]:
            return entry[0]
        failed = self._failed.get(key)
        if failed is not None and now < failed[1]:
            if entry is not None:
                return entry[0]
            raise failed[0]
        waiting = self._inflight.get(key)
        if waiting is not None:
            return await asyncio.shield(waiting)
        fut: asyncio.Future[tuple[Address, ...]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            addrs = await self._lookup(key, entry)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, StubError) else StubError(str(exc)))
                fut.exception()  # retrieved: waiters get it, nobody else must
            raise
        else:
            fut.set_result(addrs)
            return addrs
        finally:
            self._inflight.pop(key, None)

    async def _lookup(self, key: str, entry: tuple[tuple[Address, ...], float] | None) -> tuple[Address, ...]:
        self.lookups += 1
        try:
            stub = self._make_stub()  # StubError when there are no original resolvers
            try:
                addrs, ttl = await stub.resolve_with_ttl(key)
            finally:
                await stub.close()
        except StubError as exc:
            self._failed[key] = (exc, self.clock() + self.NEGATIVE_TTL)
            if entry is not None:
                return entry[0]  # stale on error: the old addresses are our best guess
            raise
        keep = self.HOSTS_TTL if ttl is None else min(max(float(ttl), self.MIN_TTL), self.MAX_TTL)
        self._failed.pop(key, None)
        self._entries[key] = (addrs, self.clock() + keep)
        return addrs

    def forget(self, name: str) -> None:
        """Every address of NAME failed: ask again on next use (the addresses stay as a fallback)."""
        key = name.lower().rstrip(".")
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], float("-inf"))

    def status(self) -> dict[str, object]:
        now = self.clock()
        return {"lookups": self.lookups,
                "names": {k: {"addresses": [str(a) for a in v[0]], "fresh_for_s": max(0, round(v[1] - now))}
                          for k, v in self._entries.items()}}

    async def close(self) -> None:
        """Nothing is held between lookups (a stub per lookup); kept for symmetry with the stub."""


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
    An encrypted upstream by name (`tls://NAME`, `https://NAME/dns-query`) is kept by name: its
    addresses are looked up when it is connected to, and again when they expire or fail
    (`NameCache`, upstream_tls.py). Raises upstream.UpstreamError for a malformed spec and
    StubError for a name that does not resolve."""
    from .upstream import UpstreamError, parse_upstream, split_host_port

    specs = list(specs)
    out: list[Upstream] = []
    own_resolver = resolver is None
    try:
        for spec in specs:
            try:
                out.append(parse_upstream(spec))
                continue
            except UpstreamError:
                host, port = split_host_port(spec)  # raises UpstreamError when it is not HOST[:PORT]
            if resolver is None:
                resolver = StubResolver.from_system(resolv_conf, own_addresses=own_addresses)
            addrs = await resolver.resolve(host)
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
