"""The TUN device: /dev/net/tun with TUNSETIFF (IFF_TUN | IFF_NO_PI), one IP packet per read."""

from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


class TunError(OSError):
    """The TUN device could not be created (no /dev/net/tun, no permission, bad name)."""


def open_tun(name: str) -> tuple[int, str]:
    """Create (or attach to) TUN `name`; returns (non-blocking fd, the kernel's name for it)."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise TunError(f"bad interface name {name!r} (1-15 bytes)")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
        out = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        raise TunError(exc.errno, f"TUNSETIFF {name}: {exc.strerror}") from None
    return fd, out[:IFNAMSIZ].rstrip(b"\0").decode()
