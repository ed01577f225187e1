"""Per-source token buckets for handshake messages under load (wireguard-go's ratelimiter):
once a flood has us demanding cookies, a source holding a valid cookie still gets at most
RATE handshakes a second (BURST at once), so one address cannot eat the DH budget."""

from __future__ import annotations

import ipaddress

RATE = 20.0  # handshake messages per second per source
BURST = 5
IDLE = 1.0  # seconds after which a full bucket is forgotten
MAX_SOURCES = 65536


def source_key(host: str) -> bytes:
    """The bucket of an address: the IPv4 address, or the /64 of an IPv6 one."""
    addr = ipaddress.ip_address(host.split("%")[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.packed if addr.version == 4 else addr.packed[:8]


class RateLimiter:
    """Token buckets keyed by source, bounded in number; time is passed in."""

    def __init__(self, rate: float = RATE, burst: int = BURST,
                 max_sources: int = MAX_SOURCES) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: dict[bytes, list[float]] = {}  # key -> [tokens, last update]

    def allow(self, key: bytes, now: float) -> bool:
        """Take a token for `key`; False if its bucket is empty (or we track too many sources)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self.collect(now)
                if len(self._buckets) >= self.max_sources:
                    return False  # a flood of sources: refuse newcomers rather than grow
            self._buckets[key] = [self.burst - 1, now]
            return True
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1:
            bucket[0] = tokens - 1
            return True
        bucket[0] = tokens
        return False

    def collect(self, now: float) -> None:
        """Forget sources idle long enough that their bucket is full again."""
        for key in [k for k, (_, last) in self._buckets.items() if now - last > IDLE]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
