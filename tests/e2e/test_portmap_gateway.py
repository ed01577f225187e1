"""Port mapping against a real gateway: Debian's miniupnpd (nftables backend) on a router namespace
that masquerades a LAN onto a WAN. NAT-PMP and PCP each get a mapping whose external address:port,
used from the WAN, reaches the LAN host's UDP socket; closing the mapper deletes it again."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from meshnode.portmap.client import Protocol
from meshnode.portmap.runner import Gateway, PortMapper, default_gateway, probe
from tests.e2e.portmap_lab import GW_LAN_IP, GW_WAN_IP, LAN_IP, WAN_IP, NatLab
from tests.e2e.netns import in_netns
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root,
              pytest.mark.skipif(shutil.which("miniupnpd") is None, reason="miniupnpd-nftables not installed")]

WG_PORT = 41641


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[NatLab]:
    lab = NatLab.create()
    try:
        lab.log = lab.start_miniupnpd(tmp_path)  # type: ignore[attr-defined]
        yield lab
    finally:
        lab.destroy()


def _udp_reaches(lab: NatLab, lan_sock: socket.socket, external: str) -> bool:
    """One datagram from the WAN namespace to `external` arrives on the LAN host's socket."""
    ip, port = external.rsplit(":", 1)
    token = b"through-the-mapping"

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(token, (ip, int(port)))

    lan_sock.settimeout(0.5)
    for _ in range(6):                      # UDP: a few tries, bounded
        in_netns(lab.wan, send)
        try:
            data, src = lan_sock.recvfrom(100)
        except socket.timeout:
            continue
        return data == token and src[0] == WAN_IP
    return False


def _rules(lab: NatLab) -> str:
    return subprocess.run(["ip", "netns", "exec", lab.rtr, "nft", "list", "chain", "inet", "filter",
                           "prerouting_miniupnpd"], capture_output=True, text=True).stdout


@pytest.mark.parametrize("protocol", [Protocol.PMP, Protocol.PCP, Protocol.UPNP])
def test_mapping_reaches_lan_socket_and_is_deleted(gateway: NatLab, protocol: Protocol) -> None:
    lab = gateway
    lan_sock = in_netns(lab.lan, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        lan_sock.bind((LAN_IP, WG_PORT))
        gw = in_netns(lab.lan, default_gateway)
        assert gw == Gateway(GW_LAN_IP, LAN_IP)

        async def scenario() -> tuple[tuple[Protocol, ...], str | None, str]:
            protos = await probe(gw)
            changes: list[str | None] = []
            mapper = PortMapper(WG_PORT, lambda m: changes.append(m.endpoint if m else None),
                                gateway=lambda: gw, protocol=protocol)
            mapper.start()
            deadline = asyncio.get_running_loop().time() + 10
            while mapper.mapping is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            endpoint = mapper.mapping.endpoint if mapper.mapping else None
            assert endpoint is not None, (mapper.error, lab.log.read_text())  # type: ignore[attr-defined]
            reached = await asyncio.to_thread(_udp_reaches, lab, lan_sock, endpoint)
            assert reached, f"{endpoint} does not reach {LAN_IP}:{WG_PORT}"
            assert f"dport {endpoint.rsplit(':', 1)[1]}" in _rules(lab)
            await mapper.close()
            assert changes == [endpoint, None]
            return protos, endpoint, _rules(lab)

        protos, endpoint, rules_after = in_netns(lab.lan, lambda: asyncio.run(scenario()))
        assert set(protos) == {Protocol.PMP, Protocol.PCP, Protocol.UPNP}
        assert endpoint is not None and endpoint.startswith(GW_WAN_IP + ":")
        # the deletion reached the gateway: its DNAT rule is gone and the port no longer leads in
        assert "dnat" not in rules_after, rules_after
        assert not _udp_reaches(lab, lan_sock, endpoint)
    finally:
        lan_sock.close()


@pytest.mark.parametrize("protocol", [Protocol.PMP, Protocol.PCP])
def test_gateway_restart_loses_mapping_and_renewal_restores_it(tmp_path: Path, protocol: Protocol) -> None:
    """The router reboots (miniupnpd stopped, its rules flushed, started again): the next renewal
    (short lifetimes here) makes the mapping again, and it carries traffic again."""
    lab = NatLab.create()
    try:
        log = lab.start_miniupnpd(tmp_path, min_lifetime=2)
        lan_sock = in_netns(lab.lan, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        lan_sock.bind((LAN_IP, WG_PORT))
        gw = Gateway(GW_LAN_IP, LAN_IP)

        async def scenario() -> None:
            mapper = PortMapper(WG_PORT, gateway=lambda: gw, protocol=protocol, lifetime=4)
            mapper.start()
            loop = asyncio.get_running_loop()

            async def until(cond: object, what: str, timeout: float = 15) -> None:
                deadline = loop.time() + timeout
                while not cond():  # type: ignore[operator]
                    assert loop.time() < deadline, (what, mapper.error, log.read_text()[-2000:])
                    await asyncio.sleep(0.05)

            await until(lambda: mapper.mapping is not None, "first mapping")
            endpoint = mapper.mapping.endpoint  # type: ignore[union-attr]
            # the reboot: miniupnpd stops (and removes its rules), a new one starts
            proc = next(p for p in lab.lab.procs if p.poll() is None)
            await asyncio.to_thread(lambda: (proc.terminate(), proc.wait(10)))
            subprocess.run(["ip", "netns", "exec", lab.rtr, "nft", "flush", "chain", "inet", "filter",
                            "prerouting_miniupnpd"], check=True)
            assert "dnat" not in _rules(lab)
            await asyncio.to_thread(lab.start_miniupnpd, tmp_path, 2)
            await until(lambda: "dnat" in _rules(lab), "the mapping made again by a renewal")
            assert mapper.mapping is not None
            assert await asyncio.to_thread(_udp_reaches, lab, lan_sock, mapper.mapping.endpoint), endpoint
            await mapper.close()

        in_netns(lab.lan, lambda: asyncio.run(scenario()))
        lan_sock.close()
    finally:
        lab.destroy()


def test_hostile_gateway_refusal_in_words_and_no_request_storm() -> None:
    """A gateway of our own on the router's port 5351 that answers every request with junk, a PCP
    answer for another nonce, a truncated one, and then NOT_AUTHORIZED: the mapper ignores the
    junk, says why it has no mapping in words, and stops asking (a handful of datagrams, not a storm)."""
    lab = NatLab.create()
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((GW_LAN_IP, 5351))
            s.settimeout(0.1)
            while not stop.is_set() and len(received) < 200:
                try:
                    data, src = s.recvfrom(2048)
                except socket.timeout:
                    continue
                received.append(data)
                if data[:2] == bytes([2, 1]) and len(data) == 60:    # a PCP MAP request
                    other = bytearray(data)
                    other[24] ^= 0xFF
                    for junk in (b"\x02", bytes(range(64)), bytes([2, 0x81, 0, 0]) + bytes(20),
                                 _pcp_reply(bytes(other), 0)):
                        s.sendto(junk, src)
                    s.sendto(_pcp_reply(data, 2), src)               # NOT_AUTHORIZED
                elif data[:1] == b"\x02":                             # ANNOUNCE: PCP is here
                    s.sendto(bytes([2, 0x80, 0, 0]) + bytes(20), src)

    server = threading.Thread(target=in_netns, args=(lab.rtr, serve))
    server.start()
    try:
        gw = Gateway(GW_LAN_IP, LAN_IP)

        async def scenario() -> tuple[str | None, object]:
            mapper = PortMapper(WG_PORT, gateway=lambda: gw)
            mapper.start()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not (mapper.error or "").startswith("PCP:") and loop.time() < deadline:
                await asyncio.sleep(0.05)
            sent = len(received)
            await asyncio.sleep(1.5)            # a window in which a retry storm would show
            error, mapping = mapper.error, mapper.mapping
            await mapper.close()
            return error, (mapping, len(received) - sent)

        error, (mapping, later) = in_netns(lab.lan, lambda: asyncio.run(scenario()))
        assert error == "PCP: the gateway supports PCP but mapping is turned off (not authorized)"
        assert mapping is None and later == 0
        # the probe (NAT-PMP retried within its second, one PCP ANNOUNCE) and one MAP request
        assert len(received) <= 6 and sum(d[:2] == bytes([2, 1]) for d in received) == 1, received
    finally:
        stop.set()
        server.join()
        lab.destroy()


def _pcp_reply(req: bytes, result: int) -> bytes:
    head = bytes([2, req[1] | 0x80, 0, result]) + (7200).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(12)
    return head + req[24:42] + (40000).to_bytes(2, "big") + bytes(10) + b"\xff\xff" + bytes([11, 61, 0, 1])


def test_leaving_the_network_drops_the_mapping_and_a_new_gateway_gets_one(gateway: NatLab) -> None:
    """The node's default route goes away (it left the network): the mapping is no longer claimed
    within seconds; the route comes back (a network again): a mapping is made again at once, not
    after the two-minute re-probe."""
    lab = gateway
    changes: list[str | None] = []

    async def scenario() -> None:
        # default_gateway must read the LAN namespace's routes, from the worker thread too
        mapper = PortMapper(WG_PORT, lambda m: changes.append(m.endpoint if m else None),
                            gateway=lambda: in_netns(lab.lan, default_gateway))
        mapper.start()
        loop = asyncio.get_running_loop()

        async def until(cond: object, what: str, timeout: float) -> float:
            start = loop.time()
            while not cond():  # type: ignore[operator]
                assert loop.time() - start < timeout, (what, mapper.error, changes)
                await asyncio.sleep(0.05)
            return loop.time() - start

        await until(lambda: mapper.mapping is not None, "first mapping", 10)
        subprocess.run(["ip", "-n", lab.lan, "route", "del", "default"], check=True)
        await until(lambda: mapper.mapping is None, "mapping dropped after leaving", 12)
        subprocess.run(["ip", "-n", lab.lan, "route", "add", "default", "via", GW_LAN_IP], check=True)
        await until(lambda: mapper.mapping is not None, "a mapping on the 'new' network", 15)
        await mapper.close()

    in_netns(lab.lan, lambda: asyncio.run(scenario()))
    assert changes[0] is not None and changes[1] is None and changes[2] is not None and changes[-1] is None
