"""The wg-quick configuration file: `[Interface]` and `[Peer]` sections of `Key = Value` lines.

Parsing is pure (no DNS): endpoints stay (host, port) and the CLI resolves them. Errors name the
file and line so a user can fix them without guessing."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from .crypto import KeyFormatError, decode_key
from .engine import DEFAULT_MTU
from .noise import ZERO_PSK
from .peer import Network

log = logging.getLogger(__name__)

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# wg-quick keys that only matter to wg-quick's shell hooks; we accept the file and say so.
_IGNORED_KEYS = {"dns", "table", "preup", "postup", "predown", "postdown", "saveconfig", "fwmark"}

_KEY_NAMES = {"privatekey": "PrivateKey", "publickey": "PublicKey", "presharedkey": "PresharedKey"}


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the line."""


@dataclass(frozen=True)
class PeerSection:
    """One `[Peer]`, with the endpoint still as written (host, port)."""

    public_key: bytes
    preshared_key: bytes
    allowed_ips: tuple[Network, ...]
    endpoint: tuple[str, int] | None
    persistent_keepalive: int
    line: int


@dataclass(frozen=True)
class WgConfig:
    """A parsed wg-quick file."""

    private_key: bytes
    addresses: tuple[Interface, ...]
    listen_port: int | None
    mtu: int
    peers: tuple[PeerSection, ...]


def parse_endpoint(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` as (host, port); raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [address]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("expected host:port (IPv6 addresses go in brackets)")
    if not host:
        raise ValueError("missing host")
    p = int(port)
    if not 0 < p < 65536:
        raise ValueError(f"port {p} out of range")
    return host, p


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.iface: dict[str, tuple[str, int]] = {}
        self.peers: list[tuple[int, dict[str, tuple[str, int]]]] = []
        self.iface_line: int | None = None

    def error(self, line: int, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}:{line}: {msg}")

    def feed(self, text: str) -> None:
        section: dict[str, tuple[str, int]] | None = None
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("["):
                name = line.lower()
                if name == "[interface]":
                    if self.iface_line is not None:
                        raise self.error(n, f"second [Interface] (first at line {self.iface_line})")
                    self.iface_line = n
                    section = self.iface
                elif name == "[peer]":
                    section = {}
                    self.peers.append((n, section))
                else:
                    raise self.error(n, f"unknown section {line}")
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise self.error(n, f"expected Key = Value, got {raw.strip()!r}")
            if section is None:
                raise self.error(n, "setting outside [Interface] or [Peer]")
            k = key.strip().lower()
            if k in section:
                if k in ("address", "allowedips"):  # lists may be split across lines
                    section[k] = (section[k][0] + "," + value.strip(), section[k][1])
                    continue
                raise self.error(n, f"{key.strip()} given twice (first at line {section[k][1]})")
            section[k] = (value.strip(), n)

    def key(self, sect: dict[str, tuple[str, int]], name: str) -> bytes:
        value, n = sect[name]
        try:
            return decode_key(value)
        except KeyFormatError as exc:
            raise self.error(n, f"{_KEY_NAMES[name]}: {exc}") from None

    def interface(self) -> tuple[bytes, tuple[Interface, ...], int | None, int]:
        if self.iface_line is None:
            raise ConfigError(f"{self.source}: no [Interface] section")
        sect = self.iface
        for k, (_, n) in sect.items():
            if k not in ("privatekey", "address", "listenport", "mtu") and k not in _IGNORED_KEYS:
                raise self.error(n, f"unknown [Interface] key {k!r}")
            if k in _IGNORED_KEYS:
                log.warning("%s:%d: %s is a wg-quick hook setting; ignored", self.source, n, k)
        if "privatekey" not in sect:
            raise self.error(self.iface_line, "[Interface] has no PrivateKey")
        private = self.key(sect, "privatekey")
        addresses: list[Interface] = []
        if "address" in sect:
            value, n = sect["address"]
            for item in _split_list(value):
                try:
                    addresses.append(ipaddress.ip_interface(item))
                except ValueError:
                    raise self.error(n, f"Address: {item!r} is not an address/prefix") from None
        port = None
        if "listenport" in sect:
            value, n = sect["listenport"]
            if not value.isdigit() or not 0 <= int(value) < 65536:
                raise self.error(n, f"ListenPort: {value!r} is not a port number")
            port = int(value)
        mtu = DEFAULT_MTU
        if "mtu" in sect:
            value, n = sect["mtu"]
            if not value.isdigit() or not 576 <= int(value) <= 65535:
                raise self.error(n, f"MTU: {value!r} is not a number between 576 and 65535")
            mtu = int(value)
        return private, tuple(addresses), port, mtu

    def peer(self, line: int, sect: dict[str, tuple[str, int]]) -> PeerSection:
        known = ("publickey", "presharedkey", "allowedips", "endpoint", "persistentkeepalive")
        for k, (_, n) in sect.items():
            if k not in known:
                raise self.error(n, f"unknown [Peer] key {k!r}")
        if "publickey" not in sect:
            raise self.error(line, "[Peer] has no PublicKey")
        public = self.key(sect, "publickey")
        psk = self.key(sect, "presharedkey") if "presharedkey" in sect else ZERO_PSK
        allowed: list[Network] = []
        if "allowedips" in sect:
            value, n = sect["allowedips"]
            for item in _split_list(value):
                try:
                    allowed.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    raise self.error(n, f"AllowedIPs: {item!r} is not a prefix") from None
        endpoint = None
        if "endpoint" in sect:
            value, n = sect["endpoint"]
            try:
                endpoint = parse_endpoint(value)
            except ValueError as exc:
                raise self.error(n, f"Endpoint: {value!r}: {exc}") from None
        keepalive = 0
        if "persistentkeepalive" in sect:
            value, n = sect["persistentkeepalive"]
            if value.lower() == "off":
                value = "0"
            if not value.isdigit() or int(value) > 65535:
                raise self.error(n, f"PersistentKeepalive: {value!r} is not a number of seconds")
            keepalive = int(value)
        return PeerSection(public, psk, tuple(allowed), endpoint, keepalive, line)


def parse_config(text: str, source: str = "<config>") -> WgConfig:
    """Parse a wg-quick file's text; raises ConfigError naming `source` and the line."""
    p = _Parser(source)
    p.feed(text)
    private, addresses, port, mtu = p.interface()
    peers = [p.peer(line, sect) for line, sect in p.peers]
    seen: dict[bytes, int] = {}
    for peer in peers:
        if peer.public_key in seen:
            raise p.error(peer.line, f"peer listed twice (first at line {seen[peer.public_key]})")
        seen[peer.public_key] = peer.line
    return WgConfig(private, addresses, port, mtu, tuple(peers))


def load_config(path: str | Path) -> WgConfig:
    """Read and parse a wg-quick file; raises ConfigError (also for an unreadable file)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_config(text, str(path))
