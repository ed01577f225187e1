"""Allowed IPs: longest-prefix match from an address to a peer (WireGuard's cryptokey routing).

One dict per prefix length, probed from the longest length down; a lookup costs one dict probe
per distinct length in use (a handful), and a bounded per-address cache in front makes the hot
path a single dict hit. Any change clears the cache."""

from __future__ import annotations

import ipaddress
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CACHE_LIMIT = 4096
_MISS = object()


class _Family(Generic[T]):
    __slots__ = ("bits", "by_len", "lengths")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.by_len: dict[int, dict[int, T]] = {}
        self.lengths: list[int] = []  # longest first

    def lookup(self, addr: int) -> T | None:
        by_len = self.by_len
        for plen in self.lengths:
            table = by_len.get(plen)  # may vanish under a concurrent removal
            if table is not None:
                hit = table.get(addr >> (self.bits - plen))
                if hit is not None:
                    return hit
        return None


class AllowedIPs(Generic[T]):
    """A prefix table mapping IPv4/IPv6 networks to values (peers); a prefix has one owner."""

    def __init__(self) -> None:
        self._fam = {4: _Family[T](32), 6: _Family[T](128)}
        self._cache: dict[bytes, object] = {}

    @staticmethod
    def _parse(network: Network | str) -> Network:
        return network if not isinstance(network, str) else ipaddress.ip_network(network, strict=False)

    def insert(self, network: Network | str, value: T) -> None:
        """Route `network` to `value`, taking it from any previous owner (as wg does)."""
        net = self._parse(network)
        fam = self._fam[net.version]
        table = fam.by_len.get(net.prefixlen)
        if table is None:
            table = fam.by_len[net.prefixlen] = {}
            fam.lengths = sorted(fam.by_len, reverse=True)
        table[int(net.network_address) >> (fam.bits - net.prefixlen)] = value
        self._cache = {}

    def remove(self, network: Network | str) -> None:
        """Forget `network` (no error if absent)."""
        net = self._parse(network)
        fam = self._fam[net.version]
        table = fam.by_len.get(net.prefixlen)
        if table is not None:
            table.pop(int(net.network_address) >> (fam.bits - net.prefixlen), None)
            if not table:
                del fam.by_len[net.prefixlen]
                fam.lengths = sorted(fam.by_len, reverse=True)
        self._cache = {}

    def owner(self, network: Network | str) -> T | None:
        """Who holds exactly `network` (not a lookup: no longest-prefix matching)."""
        net = self._parse(network)
        fam = self._fam[net.version]
        table = fam.by_len.get(net.prefixlen, {})
        return table.get(int(net.network_address) >> (fam.bits - net.prefixlen))

    def remove_value(self, value: T) -> None:
        """Forget every prefix owned by `value`."""
        for net in list(self.networks_of(value)):
            self.remove(net)

    def networks_of(self, value: T) -> Iterator[Network]:
        """The prefixes owned by `value`."""
        for version, fam in self._fam.items():
            make = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
            for plen, table in fam.by_len.items():
                for key, owner in table.items():
                    if owner is value:
                        yield make((key << (fam.bits - plen), plen))

    def lookup(self, addr: bytes) -> T | None:
        """The owner of the longest prefix holding `addr` (4 or 16 packed bytes), else None.

        Safe against a concurrent change from another thread: the cache is taken before the
        tables are read, so a result computed from old tables lands only in the old cache."""
        cache = self._cache
        hit = cache.get(addr, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        fam = self._fam[4 if len(addr) == 4 else 6]
        value = fam.lookup(int.from_bytes(addr, "big"))
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[addr] = value
        return value

    def lookup_ip(self, addr: str) -> T | None:
        """`lookup` for a textual address (slow path, tests and tools)."""
        return self.lookup(ipaddress.ip_address(addr).packed)
