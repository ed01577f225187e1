"""The path layer: which way traffic to each peer goes (direct UDP, the relay, or none yet),
found with disco pings and kept with heartbeats; sans-I/O (see `layer`)."""

from .layer import DATA_TIMEOUT, HEARTBEAT, PING_INTERVAL, PING_TIMEOUT, TRUST, PathLayer
from .quality import better
from .types import (DataPlane, Endpoint, Output, Path, PathChanged, PathType, PeerInfo, PingResult,
                    SendRelay, SendUDP, format_endpoint, parse_endpoint)

__all__ = ["DATA_TIMEOUT", "HEARTBEAT", "PING_INTERVAL", "PING_TIMEOUT", "TRUST", "DataPlane",
           "Endpoint", "Output", "Path", "PathChanged", "PathLayer", "PathType", "PeerInfo",
           "PingResult", "SendRelay", "SendUDP", "better", "format_endpoint", "parse_endpoint"]
