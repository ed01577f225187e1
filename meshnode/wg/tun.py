"""The TUN device: /dev/net/tun with TUNSETIFF (IFF_TUN | IFF_NO_PI), optionally with a
virtio_net_hdr in front of every packet (IFF_VNET_HDR) so the kernel can hand us TSO super-packets
and take GSO super-packets from us (see offload.py)."""

from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
IFNAMSIZ = 16


class TunError(OSError):
    """The TUN device could not be created (no /dev/net/tun, no permission, bad name)."""


def open_tun(name: str, vnet_hdr: bool = False, tso: bool = False) -> tuple[int, str]:
    """Create (or attach to) TUN `name`; returns (non-blocking fd, the kernel's name for it).

    `vnet_hdr`: every read and write carries a 10-byte virtio_net_hdr (needed to write GSO
    super-packets); `tso`: also let the kernel send us TCP super-packets with partial checksums."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise TunError(f"bad interface name {name!r} (1-15 bytes)")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        ifr = struct.pack("16sH22x", name.encode(), flags)
        out = fcntl.ioctl(fd, TUNSETIFF, ifr)
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 if tso else 0)
    except OSError as exc:
        os.close(fd)
        raise TunError(exc.errno, f"TUNSETIFF {name}: {exc.strerror}") from None
    return fd, out[:IFNAMSIZ].rstrip(b"\0").decode()
