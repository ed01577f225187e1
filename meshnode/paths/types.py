"""Values that cross the path layer's boundary: what it is told (peers, data-plane state) and
what it says (datagrams to send, the path of each peer)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

Endpoint = tuple[str, int]  # (ip text, port); IPv4 as a.b.c.d


class PathType(enum.Enum):
    DIRECT = "direct"
    RELAY = "relay"
    NONE = "none"


@dataclass(frozen=True)
class Path:
    """How traffic to one peer goes now. `since` is on the caller's clock (the `now` passed in)."""

    type: PathType
    endpoint: Endpoint | None = None
    relay_region: int | None = None
    latency_ms: float | None = None
    since: float = 0.0
    reason: str = ""

    def describe(self) -> str:
        """`direct 10.0.2.2:41641`, `relay "r1"`, `-` (as `meshnode status` prints it)."""
        if self.type is PathType.DIRECT and self.endpoint is not None:
            return f"direct {format_endpoint(self.endpoint)}"
        if self.type is PathType.RELAY:
            return f'relay "{self.relay_region}"'
        return "-"


@dataclass(frozen=True)
class PeerInfo:
    """What the network map says of one peer. `endpoints` in the order to try first."""

    node_key: bytes
    disco_key: bytes | None = None
    endpoints: tuple[Endpoint, ...] = ()
    relay_region: int | None = None


@dataclass(frozen=True)
class DataPlane:
    """WireGuard's view of one peer (engine clock): when data last went out, when anything
    authenticated last came in and from where, and since when sent data is unanswered."""

    last_sent: float | None = None
    last_received: float | None = None
    unanswered_since: float | None = None
    received_from: Endpoint | None = None


@dataclass(frozen=True)
class SendUDP:
    """Send `data` from the WireGuard socket to `endpoint`."""

    endpoint: Endpoint
    data: bytes


@dataclass(frozen=True)
class SendRelay:
    """Send `data` to the peer with `node_key` through the relay (DERP)."""

    node_key: bytes
    data: bytes


@dataclass(frozen=True)
class PathChanged:
    """The peer's path changed: WireGuard should now send to `send_to` (None: no UDP endpoint,
    i.e. the relay or nowhere)."""

    node_key: bytes
    path: Path
    send_to: Endpoint | None


@dataclass(frozen=True)
class PingResult:
    """The first answer to a user's ping (`meshnode ping`): which path answered and how fast."""

    ping_id: int
    node_key: bytes
    endpoint: Endpoint | None
    relay_region: int | None
    latency_ms: float


Output = SendUDP | SendRelay | PathChanged | PingResult


def format_endpoint(ep: Endpoint) -> str:
    host, port = ep
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str) -> Endpoint:
    """`ip:port` / `[v6]:port` to an Endpoint; raises ValueError."""
    import ipaddress
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"no port in {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"bad port in {text!r}")
    return (str(ip), number)
