"""Host names the node needs before its own DNS works (the login server, relay servers), resolved
through the system's *original* resolvers by magicdns's stub (c-ares via aiodns), never through
100.100.100.100: once the node runs, glibc would ask us, and we may not answer yet (or answer by
asking the very server we are trying to reach).

`HostResolver` is an aiohttp resolver (`aiohttp.TCPConnector(resolver=HostResolver(),
use_dns_cache=False)`) and also hands addresses to code that dials itself (the DERP client).

A name with several addresses (A and AAAA: replicas of one control server, say) gives them all, in
the order the resolvers gave them, except that the address that answered last (`prefer`) comes
first: the node stays on the replica that answers and moves on only when it fails, rather than
going back to the first address on every new connection. The connector tries the next address when
one fails (aiohttp's happy eyeballs: the next one 250 ms after a silent one, at once after a refusal).

No usable original resolver (none configured but ourselves): /etc/hosts and IP literals still work;
any other name is an error that says why, rather than a query to ourselves.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any, Callable

from aiohttp.abc import AbstractResolver

from magicdns.stub import HOSTS_FILE, Address, StubError, StubResolver, hosts_file_addresses

log = logging.getLogger("meshnode.hostresolve")


class HostResolver(AbstractResolver):
    def __init__(self, stub_factory: Callable[[], StubResolver] = StubResolver.from_system,
                 hosts_file: str = HOSTS_FILE) -> None:
        self._factory = stub_factory
        self._hosts_file = hosts_file
        self._stub: StubResolver | None = None
        self._no_stub: str | None = None     # why there is no stub (no original resolvers)
        self._preferred: dict[str, Address] = {}

    def _get_stub(self) -> StubResolver | None:
        if self._stub is None and self._no_stub is None:
            try:
                self._stub = self._factory()
            except (StubError, OSError, ValueError) as exc:
                self._no_stub = str(exc)
                log.warning("host names: %s; only /etc/hosts and addresses can be used", exc)
        return self._stub

    async def addresses(self, host: str, family: int = socket.AF_UNSPEC) -> list[Address]:
        """Every address of `host`, the one that answered last first. Raises OSError (StubError)."""
        name = host.strip().rstrip(".").lower()
        try:
            return [ipaddress.ip_address(name.strip("[]").split("%", 1)[0])]
        except ValueError:
            pass
        stub = self._get_stub()
        if stub is not None:
            found = list(await stub.resolve(name, family))
        else:
            found = [a for a in hosts_file_addresses(name, self._hosts_file)
                     if family == socket.AF_UNSPEC or (a.version == 4) == (family == socket.AF_INET)]
            if not found:
                raise StubError(f"cannot resolve {name}: {self._no_stub}")
        best = self._preferred.get(name)
        if best in found:
            found.remove(best)
            found.insert(0, best)
        return found

    def prefer(self, host: str, address: str) -> None:
        """`address` of `host` answered: try it first next time."""
        try:
            self._preferred[host.strip().rstrip(".").lower()] = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            pass

    def preferred(self, host: str) -> Address | None:
        """The address of `host` that answered last (None: none yet), for status and tests."""
        return self._preferred.get(host.strip().rstrip(".").lower())

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        addrs = await self.addresses(host, family)
        return [{"hostname": host, "host": str(a), "port": port,
                 "family": socket.AF_INET if a.version == 4 else socket.AF_INET6,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in addrs]

    async def close(self) -> None:
        if self._stub is not None:
            stub, self._stub = self._stub, None
            await stub.close()


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        return True
    except ValueError:
        return False
