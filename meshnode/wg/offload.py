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
    if len(data) < VNET_HDR_LEN + 20:
        raise OffloadError("short read from the TUN")
    flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(data)
    gso_type &= ~GSO_ECN
    if gso_type == GSO_NONE:
        if not flags & F_NEEDS_CSUM:
            return [data[VNET_HDR_LEN:]]
        packet = bytearray(data[VNET_HDR_LEN:])
        if csum_start + csum_offset + 2 > len(packet) or packet[0] >> 4 not in (4, 6):
            raise OffloadError("partial checksum outside the packet")
        finish_checksum(packet, csum_start, csum_offset)
        return [bytes(packet)]
    if gso_type in (GSO_TCPV4, GSO_TCPV6):
        return segment_tcp(data, gso_size)
    raise OffloadError(f"unexpected GSO type {gso_type}")


def segment_tcp(data: bytes, mss: int) -> list[bytes]:
    """Split a TSO super-packet (vnet header included) into segments of `mss` payload bytes.

    Checksums are built incrementally: the sums of the constant header words are taken once per
    super-packet, so per segment only the payload is summed (one C-speed conversion) and the
    varying words (length, id, seq, flags) are added in."""
    packet = memoryview(data)[VNET_HDR_LEN:]
    v6 = packet[0] >> 4 == 6
    iphl = 40 if v6 else (packet[0] & 15) * 4
    if len(packet) < iphl + 20 or iphl < 20:
        raise OffloadError("bad TSO super-packet")
    tcphl = (packet[iphl + 12] >> 4) * 4
    hl = iphl + tcphl
    if mss <= 0 or tcphl < 20 or len(packet) <= hl:
        raise OffloadError("bad TSO super-packet")
    h = bytes(packet[:hl])
    seq0 = int.from_bytes(h[iphl + 4:iphl + 8], "big")
    flags = h[iphl + 13]
    # Header checksum sums with the varying fields zeroed.
    tcp_fixed = h[iphl:iphl + 4] + bytes(4) + h[iphl + 8:iphl + 13] + b"\0" + h[iphl + 14:iphl + 16] \
        + b"\0\0" + h[iphl + 18:hl]
    tcp_base = csum_sum(h[8:40] if v6 else h[12:20]) + 6 + csum_sum(tcp_fixed)
    tail = (h[iphl:iphl + 4], h[iphl + 8:iphl + 13], h[iphl + 14:iphl + 16], h[iphl + 18:hl])
    if v6:
        build = struct.Struct(f"!4sH{iphl - 6}s4sI5sB2sH{hl - iphl - 18}s").pack
        head = (h[:4],)
        mid = h[6:iphl]
    else:
        build = struct.Struct(f"!2sHH4sH{iphl - 12}s4sI5sB2sH{hl - iphl - 18}s").pack
        ip_id = int.from_bytes(h[4:6], "big")
        ip_base = csum_sum(h[:2] + bytes(4) + h[6:10] + b"\0\0" + h[12:iphl])
        head = (h[:2],)
        mid = h[6:10]
        ip_rest = h[12:iphl]
    out = []
    payload_len = len(packet) - hl
    offset = 0
    index = 0
    while offset < payload_len:
        chunk = packet[hl + offset:hl + offset + mss]
        n = len(chunk)
        f = flags
        if offset + n < payload_len:
            f &= ~(TCP_FIN | TCP_PSH)
        if index:
            f &= ~TCP_CWR
        seq = (seq0 + offset) & 0xFFFFFFFF
        tcp_len = tcphl + n
        tcp_sum = ~_fold(tcp_base + tcp_len + (seq >> 16) + (seq & 0xFFFF) + f
                         + csum_sum(chunk)) & 0xFFFF
        if v6:
            header = build(head[0], tcp_len, mid, tail[0], seq, tail[1], f, tail[2], tcp_sum,
                           tail[3])
        else:
            total, ident = hl + n, (ip_id + index) & 0xFFFF
            ip_sum = ~_fold(ip_base + total + ident) & 0xFFFF
            header = build(head[0], total, ident, mid, ip_sum, ip_rest, tail[0], seq, tail[1], f,
                           tail[2], tcp_sum, tail[3])
        out.append(header + chunk)
        offset += n
        index += 1
    return out


# Header bytes that may differ between segments Linux GRO would merge: lengths, IPv4 id and
# checksum, seq, TCP flags (only ACK/PSH get this far) and TCP checksum. Everything else in the
# IP and TCP headers (addresses, ports, ack, window, options...) must match the run's first
# segment; comparing the headers as masked integers does that in three C calls per packet.
_VARIABLE = {4: (2, 3, 4, 5, 10, 11, 24, 25, 26, 27, 33, 36, 37),
             6: (4, 5, 44, 45, 46, 47, 53, 56, 57)}
_masks: dict[tuple[int, int], int] = {}


def _mask(version: int, hl: int) -> int:
    mask = _masks.get((version, hl))
    if mask is None:
        raw = bytearray(b"\xff" * hl)
        for i in _VARIABLE[version]:
            raw[i] = 0
        mask = _masks[(version, hl)] = int.from_bytes(raw, "big")
    return mask


def _merge(first: bytes, iphl: int, hl: int, payloads: list[bytes | memoryview],
           psh: bool) -> bytes:
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
    run: list[bytes | memoryview] = []  # payloads of the current run
    first = b""
    iphl = hl = mss = last = total = 0
    key = next_seq = -1
    psh = False
    for p in packets:
        size = len(p)
        b0 = p[0] if size >= 40 else 0
        if b0 == 0x45:  # IPv4 without options
            if p[9] != 6 or (p[6] & 0x3F) or p[7] or ((p[2] << 8) | p[3]) != size:
                b0 = 0  # not TCP, a fragment, or a length that does not add up
            p_iphl, version = 20, 4
        elif b0 >> 4 == 6:
            if size < 60 or p[6] != 6 or 40 + ((p[4] << 8) | p[5]) != size:
                b0 = 0  # extension headers or a bad length: leave it to the kernel
            p_iphl, version = 40, 6
        else:
            b0 = 0  # IPv4 with options, or not IP at all
        if b0:
            flags = p[p_iphl + 13]
            p_hl = p_iphl + ((p[p_iphl + 12] >> 4) << 2)
            n = size - p_hl
            if flags & ~(TCP_ACK | TCP_PSH) or n <= 0 or p_hl < p_iphl + 20:
                b0 = 0  # SYN/FIN/RST/URG/ECE/CWR, or no payload: never merged (as Linux GRO)
        if not b0:
            if len(run) > 1:
                out.append(_merge(first, iphl, hl, run, psh))
            elif run:
                out.append(PLAIN_HDR + first)
            run.clear()
            out.append(PLAIN_HDR + p)
            continue
        seq = int.from_bytes(p[p_iphl + 4:p_iphl + 8], "big")
        k = int.from_bytes(p[:p_hl], "big") & _mask(version, p_hl)
        if (run and k == key and seq == next_seq and n <= mss and last == mss
                and total + n <= MAX_COALESCED):
            run.append(memoryview(p)[p_hl:])
            psh = psh or bool(flags & TCP_PSH)
        else:
            if len(run) > 1:
                out.append(_merge(first, iphl, hl, run, psh))
            elif run:
                out.append(PLAIN_HDR + first)
            run.clear()
            run.append(memoryview(p)[p_hl:])
            first, iphl, hl, mss, key, total = p, p_iphl, p_hl, n, k, p_hl
            psh = bool(flags & TCP_PSH)
        last = n
        total += n
        next_seq = (seq + n) & 0xFFFFFFFF
    if len(run) > 1:
        out.append(_merge(first, iphl, hl, run, psh))
    elif run:
        out.append(PLAIN_HDR + first)
    return out
