"""The WireGuard-protocol data plane: Noise IKpsk2 handshake, transport, timers, TUN/UDP glue.

For the node daemon:
- `create_device(private_key, tun, addresses=..., listen_port=..., peers=[PeerConfig...])` -> `Device`
- `Device.set_peers / set_peer / remove_peer / set_private_key` change it live;
  `Device.set_packet_filter(accept)` installs the inbound ACL hook;
  `Device.stats()` -> [PeerStats], `Device.drops()` -> {reason: count}; `Device.close()`.
- `Engine` is the sans-I/O core underneath (datagrams and packets in, bytes out, time passed in).
"""

from .config import ConfigError, WgConfig, load_config, parse_config
from .device import Device, create_device
from .engine import Drop, Engine, PacketFilter
from .peer import PeerConfig, PeerStats

__all__ = ["ConfigError", "Device", "Drop", "Engine", "PacketFilter", "PeerConfig", "PeerStats",
           "WgConfig", "create_device", "load_config", "parse_config"]
