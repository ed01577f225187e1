"""TUN offloads (IFF_VNET_HDR): split the kernel's TSO super-packets into MTU-sized TCP segments
on the way out, and coalesce received TCP segments into GSO super-packets on the way in.

Why: per packet, Python's cost is the budget and the kernel's TCP stack costs as much again. A
64 KiB super-packet costs one TUN read instead of ~50, and a coalesced write one trip through the
receiving TCP stack instead of ~50 (what GRO does for a NIC; wireguard-go does the same).

Pure functions over bytes, with the 10-byte virtio_net_hdr in front (native byte order, which is
what the kernel uses for a legacy vnet header without TUNSETVNETLE)."""

from __future__ import annotations

import struct

VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6 = 0, 1, 3, 4
GSO_ECN = 0x80
PLAIN_HDR = bytes(VNET_HDR_LEN)  # a packet with nothing to offload: the kernel checks it

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = (
    1, 2, 4, 8, 16, 32, 64, 128)
MAX_COALESCED = 65535


class OffloadError(ValueError):
    """A super-packet from the kernel that we cannot split (never expected; dropped)."""


def csum_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit ones'-complement sum of `data` (not inverted), in 1..0xFFFF.

    2**16 = 1 (mod 0xFFFF), so the big-endian integer of the bytes is congruent to the sum of its
    16-bit words: one C-speed conversion instead of a Python loop."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    return int.from_bytes(data, "big") % 0xFFFF or 0xFFFF


def _fold(total: int) -> int:
    return total % 0xFFFF or 0xFFFF


def _pseudo_sum(packet: bytes | bytearray, v6: bool, proto: int, length: int) -> int:
    if v6:
        return csum_sum(packet[8:40]) + length + proto
    return csum_sum(packet[12:20]) + length + proto


def finish_checksum(packet: bytearray, start: int, offset: int) -> None:
    """Complete a CHECKSUM_PARTIAL packet: the field already holds the pseudo-header sum."""
    value = ~csum_sum(packet[start:]) & 0xFFFF
    if value == 0 and packet[9 if packet[0] >> 4 == 4 else 6] == 17:
        value = 0xFFFF  # UDP: zero would mean 'no checksum'
    struct.pack_into("!H", packet, start + offset, value)


def ipv4_header_checksum(header: bytearray) -> None:
    header[10:12] = b"\0\0"
    struct.pack_into("!H", header, 10, ~csum_sum(header) & 0xFFFF)


def from_tun(data: bytes) -> list[bytes]:
    """One read from a vnet-header TUN as complete IP packets with correct checksums."""
    flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(data)
    gso_type &= ~GSO_ECN
    if gso_type == GSO_NONE:
        if not flags & F_NEEDS_CSUM:
            return [data[VNET_HDR_LEN:]]
        packet = bytearray(data[VNET_HDR_LEN:])
        finish_checksum(packet, csum_start, csum_offset)
        return [bytes(packet)]
    if gso_type in (GSO_TCPV4, GSO_TCPV6):
        return segment_tcp(data, gso_size)
    raise OffloadError(f"unexpected GSO type {gso_type}")


def segment_tcp(data: bytes, mss: int) -> list[bytes]:
    """Split a TSO super-packet (vnet header included) into segments of `mss` payload bytes."""
    packet = memoryview(data)[VNET_HDR_LEN:]
    v6 = packet[0] >> 4 == 6
    iphl = 40 if v6 else (packet[0] & 15) * 4
    tcphl = (packet[iphl + 12] >> 4) * 4
    hl = iphl + tcphl
    if mss <= 0 or len(packet) < hl:
        raise OffloadError("bad TSO super-packet")
    payload_len = len(packet) - hl
    seq0 = int.from_bytes(packet[iphl + 4:iphl + 8], "big")
    ip_id = int.from_bytes(packet[4:6], "big")
    flags = packet[iphl + 13]
    template = bytearray(packet[:hl])
    template[iphl + 16:iphl + 18] = b"\0\0"
    out = []
    offset = 0
    index = 0
    while offset < payload_len:
        chunk = packet[hl + offset:hl + offset + mss]
        n = len(chunk)
        last = offset + n >= payload_len
        header = bytearray(template)
        if v6:
            struct.pack_into("!H", header, 4, tcphl + n)
        else:
            struct.pack_into("!HH", header, 2, hl + n, (ip_id + index) & 0xFFFF)
            ipv4_header_checksum(memoryview(header)[:iphl])  # type: ignore[arg-type]
        struct.pack_into("!I", header, iphl + 4, (seq0 + offset) & 0xFFFFFFFF)
        f = flags
        if not last:
            f &= ~(TCP_FIN | TCP_PSH)
        if index:
            f &= ~TCP_CWR
        header[iphl + 13] = f
        total = _pseudo_sum(header, v6, 6, tcphl + n) + csum_sum(header[iphl:]) + csum_sum(chunk)
        struct.pack_into("!H", header, iphl + 16, ~_fold(total) & 0xFFFF)
        out.append(bytes(header) + chunk)
        offset += n
        index += 1
    return out


def _tcp_key(p: bytes) -> tuple[int, int, int, int] | None:
    """(ip header length, tcp header length, payload length, seq) of a plain TCP data segment
    we may coalesce, else None (options, fragments, SYN/FIN/RST/URG/CWR/ECE, no payload)."""
    if len(p) < 40:
        return None
    version = p[0] >> 4
    if version == 4:
        if p[0] != 0x45 or p[9] != 6 or (p[6] & 0x3F) or p[7]:
            return None  # IP options, not TCP, or a fragment
        iphl = 20
        total = (p[2] << 8) | p[3]
    elif version == 6:
        if len(p) < 60 or p[6] != 6:
            return None  # extension headers: leave to the kernel
        iphl = 40
        total = 40 + ((p[4] << 8) | p[5])
    else:
        return None
    if total != len(p):
        return None
    tcphl = (p[iphl + 12] >> 4) * 4
    if p[iphl + 13] & ~(TCP_ACK | TCP_PSH) or tcphl < 20 or total <= iphl + tcphl:
        return None
    return iphl, tcphl, total - iphl - tcphl, int.from_bytes(p[iphl + 4:iphl + 8], "big")


def _same_flow(a: bytes, b: bytes, iphl: int, hl: int) -> bool:
    # Addresses, ports, ack, window, options and everything else in the headers must match,
    # except lengths, IP id/checksum, seq, flags and TCP checksum (as Linux GRO requires).
    if iphl == 20:
        if a[8:10] != b[8:10] or a[12:20] != b[12:20]:  # ttl/proto, addresses
            return False
    elif a[:4] != b[:4] or a[6:40] != b[6:40]:
        return False
    return (a[iphl:iphl + 4] == b[iphl:iphl + 4] and a[iphl + 8:iphl + 13] == b[iphl + 8:iphl + 13]
            and a[iphl + 14:iphl + 16] == b[iphl + 14:iphl + 16] and a[iphl + 18:hl] == b[iphl + 18:hl])


def _merge(first: bytes, iphl: int, hl: int, payloads: list[bytes], psh: bool) -> bytes:
    total_payload = sum(len(x) for x in payloads)
    header = bytearray(first[:hl])
    v6 = iphl == 40
    if v6:
        struct.pack_into("!H", header, 4, hl - iphl + total_payload)
    else:
        struct.pack_into("!H", header, 2, hl + total_payload)
        ipv4_header_checksum(memoryview(header)[:20])  # type: ignore[arg-type]
    if psh:
        header[iphl + 13] |= TCP_PSH
    # CHECKSUM_PARTIAL: the field holds the (uncomplemented) pseudo-header sum; the kernel trusts
    # the payload, which WireGuard's AEAD already authenticated end to end.
    pseudo = _fold(_pseudo_sum(header, v6, 6, hl - iphl + total_payload))
    struct.pack_into("!H", header, iphl + 16, pseudo)
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hl, len(payloads[0]),
                         iphl, 16)
    return b"".join((vnet, header, *payloads))


def to_tun(packets: list[bytes]) -> list[bytes]:
    """Inner packets as TUN writes with vnet headers, runs of in-order segments of one TCP flow
    coalesced into GSO super-packets (all but the last of a run are the same size)."""
    out: list[bytes] = []
    run: list[bytes] = []  # payloads
    first = b""
    iphl = hl = mss = 0
    next_seq = -1
    psh = False

    def flush() -> None:
        if len(run) == 1:
            out.append(PLAIN_HDR + first)
        elif run:
            out.append(_merge(first, iphl, hl, run, psh))
        run.clear()

    total = 0
    for p in packets:
        key = _tcp_key(p)
        if key is None:
            flush()
            out.append(PLAIN_HDR + p)
            continue
        p_iphl, p_tcphl, n, seq = key
        p_hl = p_iphl + p_tcphl
        if (run and seq == next_seq and p_hl == hl and n <= mss and len(run[-1]) == mss
                and total + n <= MAX_COALESCED and _same_flow(first, p, iphl, hl)):
            run.append(p[hl:])
            psh = psh or bool(p[iphl + 13] & TCP_PSH)
            total += n
            next_seq = (seq + n) & 0xFFFFFFFF
            continue
        flush()
        first, iphl, hl, mss = p, p_iphl, p_hl, n
        run.append(p[hl:])
        psh = bool(p[iphl + 13] & TCP_PSH)
        total = hl + n
        next_seq = (seq + n) & 0xFFFFFFFF
    flush()
    return out
