"""The WireGuard-protocol data plane: Noise IKpsk2 handshake, transport, timers, TUN/UDP glue.

For the node daemon:
- `create_device(private_key, tun, addresses=..., listen_port=..., peers=[PeerConfig...])` -> `Device`
- `Device.set_peers / set_peer / remove_peer / set_private_key` change it live;
  `Device.set_packet_filter(accept)` installs the inbound ACL hook;
  `Device.stats()` -> [PeerStats], `Device.drops()` -> {reason: count}; `Device.close()`.
- `Engine` is the sans-I/O core underneath (datagrams and packets in, bytes out, time passed in).
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported lazily: `meshnode --help` must not pay for pyroute2 and the crypto bindings.
_EXPORTS = {
    "ConfigError": "config", "WgConfig": "config", "load_config": "config",
    "parse_config": "config", "Device": "device", "create_device": "device", "Drop": "engine",
    "Engine": "engine", "PacketFilter": "engine", "PeerConfig": "peer", "PeerStats": "peer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
