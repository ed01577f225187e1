"""asyncio glue for the port-mapping client: find the default gateway, probe which protocols it
answers, keep one mapping of the WireGuard UDP port alive, and delete it on shutdown.

All talk to the gateway goes over one small UDP socket of its own (bound to our address on the
gateway's link, connected to the gateway's port 5351); the gateway maps *our address* and the
internal port named in the request, so it does not have to be the WireGuard socket itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Callable

from . import pcp, pmp, upnp
from .client import Failed, GatewayRestarted, Lost, Mapped, Mapping, PortMapClient, Protocol, Released

log = logging.getLogger("meshnode.portmap")
PROBE_TIMEOUT = 1.0
REPROBE = 120.0           # no gateway answered: look again this often
GATEWAY_CHECK = 5.0       # how often the default route is read again: a new network is a new gateway


@dataclass(frozen=True, slots=True)
class Gateway:
    ip: str               # the default gateway
    client_ip: str        # our address toward it (the one it maps)


def default_gateway() -> Gateway | None:
    """The IPv4 default gateway from the kernel's routing table (netlink) and our source address
    toward it; None without a default route via a gateway."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        routes = sorted(ipr.get_default_routes(family=socket.AF_INET),
                        key=lambda r: r.get_attr("RTA_PRIORITY") or 0)
    for r in routes:
        gw = r.get_attr("RTA_GATEWAY")
        if not gw:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((gw, pcp.PORT))      # picks the source address; sends nothing
            except OSError:
                continue
            return Gateway(gw, s.getsockname()[0])
    return None


class _Proto(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.queue.full():          # a flood only drops datagrams, never grows memory
            self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:   # ICMP port unreachable: nobody listens
        pass


async def _open(gw: Gateway) -> tuple[asyncio.DatagramTransport, _Proto]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        _Proto, local_addr=(gw.client_ip, 0), remote_addr=(gw.ip, pcp.PORT))
    return transport, proto


async def probe(gw: Gateway, timeout: float = PROBE_TIMEOUT) -> tuple[Protocol, ...]:
    """Which of PCP, NAT-PMP and UPnP the gateway answers, in that order of preference."""
    pxp, location = await asyncio.gather(probe_pxp(gw, timeout), upnp.discover(gw.ip, gw.client_ip, timeout))
    return pxp + ((Protocol.UPNP,) if location else ())


async def probe_pxp(gw: Gateway, timeout: float = PROBE_TIMEOUT) -> tuple[Protocol, ...]:
    """Which of NAT-PMP and PCP the gateway answers (any well-formed response counts, errors
    included: the protocol is there even when mapping is refused), as Tailscale's Probe does with
    a NAT-PMP public-address request and a PCP ANNOUNCE."""
    transport, proto = await _open(gw)
    found: set[Protocol] = set()
    try:
        deadline = time.monotonic() + timeout
        wait = pmp.INITIAL_TIMEOUT
        while len(found) < 2:
            if Protocol.PMP not in found:
                transport.sendto(pmp.public_address_request())
            if Protocol.PCP not in found:
                transport.sendto(pcp.announce_request(gw.client_ip))
            end = min(deadline, time.monotonic() + wait)
            wait *= 2
            while len(found) < 2 and (left := end - time.monotonic()) > 0:
                try:
                    data = await asyncio.wait_for(proto.queue.get(), left)
                except asyncio.TimeoutError:
                    break
                try:
                    pmp.parse_response(data)
                    found.add(Protocol.PMP)
                except pmp.PmpError:
                    pass
                try:
                    pcp.parse_response(data)
                    found.add(Protocol.PCP)
                except pcp.PcpError:
                    pass
            if time.monotonic() >= deadline:
                break
    finally:
        transport.close()
    return tuple(p for p in (Protocol.PCP, Protocol.PMP) if p in found)


class PortMapper:
    """Keeps a mapping of `internal_port` at the default gateway; `on_change(mapping or None)` is
    called whenever the external address:port appears, changes or goes away."""

    def __init__(self, internal_port: int, on_change: Callable[[Mapping | None], None] | None = None, *,
                 gateway: Callable[[], Gateway | None] = default_gateway, lifetime: int = 7200,
                 protocol: Protocol | None = None) -> None:
        self.internal_port = internal_port
        self.only = protocol          # use only this protocol (tests; the default prefers PCP)
        self.on_change = on_change or (lambda m: None)
        self._gateway = gateway
        self.lifetime = lifetime
        self.mapping: Mapping | None = None
        self.protocols: tuple[Protocol, ...] = ()
        self.error: str | None = None
        self._client: PortMapClient | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._upnp: tuple[upnp.UpnpGateway, int] | None = None   # (gateway, external port) mapped
        self._gw: Gateway | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _set(self, mapping: Mapping | None) -> None:
        old = self.mapping.endpoint if self.mapping else None
        self.mapping = mapping
        if (mapping.endpoint if mapping else None) != old:
            log.info("portmap: %s", f"{mapping.protocol.value} mapped {mapping.endpoint} -> :{self.internal_port}"
                     if mapping else "no mapping")
            self.on_change(mapping)

    async def _run(self) -> None:
        while True:
            try:
                await self._once()
            except OSError as exc:     # our address vanished, the network is down: try again later
                self.error = f"port mapping: {exc}"
                log.warning("portmap: %s", exc)
                self._set(None)
            await self._wait_for_change(REPROBE)

    async def _gateway_now(self) -> Gateway | None:
        try:
            return await asyncio.to_thread(self._gateway)
        except OSError:
            return None

    async def _wait_for_change(self, timeout: float) -> None:
        """Sleep up to `timeout`, less when the default gateway or our address toward it changes."""
        before = self._gw
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(GATEWAY_CHECK, left))
            if await self._gateway_now() != before:
                return

    async def _moved(self, gw: Gateway) -> bool:
        """True (and the mapping dropped) when the node is no longer behind `gw` (another network)."""
        if await self._gateway_now() == gw:
            return False
        self.error = "the default gateway changed: the mapping there no longer helps"
        log.info("portmap: %s", self.error)
        self._gw = None      # any gateway seen from now on (the same one back, too) is asked at once
        self._set(None)
        return True

    async def _once(self) -> None:
        """Probe the gateway and keep a mapping until the client gives up."""
        gw = self._gw = await self._gateway_now()
        protos = await probe(gw) if gw else ()
        self.protocols = protos
        if self.only is not None:
            protos = tuple(p for p in protos if p is self.only)
        if gw is None or not protos:
            self.error = "no default gateway" if gw is None else "the gateway answers neither NAT-PMP nor PCP"
            return
        if protos[0] is Protocol.UPNP:
            await self._keep_upnp(gw)
        else:
            await self._keep(gw, protos[0])     # returns when it gave up; probe again later

    async def _keep_upnp(self, gw: Gateway) -> None:
        """AddPortMapping with a lease, renewed at half of it; returns when it failed for good."""
        location = await upnp.discover(gw.ip, gw.client_ip, PROBE_TIMEOUT)
        if location is None:
            self.error = "the gateway's UPnP no longer answers"
            return
        try:
            igd = await upnp.UpnpGateway.from_location(location)
            lease, port = self.lifetime, self.internal_port
            while True:
                try:
                    await igd.add(port, self.internal_port, gw.client_ip, lease)
                except upnp.UpnpError as exc:
                    if exc.code == 725 and lease:     # OnlyPermanentLeasesSupported
                        lease = 0
                        continue
                    if self.mapping is not None and time.monotonic() < self.mapping.expires_at:
                        self.error = str(exc)         # keep the mapping we hold; try again soon
                        await asyncio.sleep(min(30.0, self.mapping.expires_at - time.monotonic()))
                        continue
                    raise
                ip = await igd.external_ip()
                now = time.monotonic()
                life = lease or self.lifetime         # a permanent lease: check it as often anyway
                self._upnp = (igd, port)
                self.error = None
                self._set(Mapping(Protocol.UPNP, ip, port, self.internal_port, life, now, now + life / 2,
                                  now + life))
                renew_at = now + life / 2
                while (left := renew_at - time.monotonic()) > 0:
                    await asyncio.sleep(min(GATEWAY_CHECK, left))
                    if await self._moved(gw):
                        self._upnp = None
                        return
        except upnp.UpnpError as exc:
            self.error = str(exc)
            log.warning("portmap: %s", exc)
            self._upnp = None
            self._set(None)

    async def _keep(self, gw: Gateway, protocol: Protocol) -> None:
        client = self._client = PortMapClient(protocol, client_ip=gw.client_ip, internal_port=self.internal_port,
                                              lifetime=self.lifetime)
        transport, proto = await _open(gw)
        self._transport = transport
        next_check = time.monotonic() + GATEWAY_CHECK
        try:
            client.start(time.monotonic())
            while True:
                now = time.monotonic()
                dgrams, events = client.poll(now)
                for d in dgrams:
                    transport.sendto(d)
                if self._handle(events):
                    break
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + GATEWAY_CHECK
                    if await self._moved(gw):
                        client.mapping = None      # nothing to delete on a network we left
                        break
                deadline = client.next_deadline()
                deadline = next_check if deadline is None else min(deadline, next_check)
                try:
                    data = await asyncio.wait_for(proto.queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    continue
                if self._handle(client.receive(data, time.monotonic())):
                    break
        except asyncio.CancelledError:
            if client.mapping is None:
                transport.close()
                self._transport = None
            raise                   # else close() still needs the socket to delete the mapping
        except BaseException:
            transport.close()
            self._transport = None
            raise
        transport.close()           # given up: no mapping left to delete
        self._transport = None

    def _handle(self, events: list) -> bool:
        """True when the client gave up for good (the loop then probes again later)."""
        for ev in events:
            if isinstance(ev, Mapped):
                self.error = None
                self._set(ev.mapping)
            elif isinstance(ev, GatewayRestarted):
                log.info("portmap: the gateway restarted (epoch); asked again")
            elif isinstance(ev, Lost):
                self.error = ev.reason
                self._set(None)
            elif isinstance(ev, Failed):
                self.error = ev.reason
                log.warning("portmap: %s", ev.reason)
                if self._client is not None and self._client.mapping is None:
                    self._set(None)
                if ev.retry_at is None:
                    return True
        return False

    async def close(self, timeout: float = 1.0) -> None:
        """Stop, and delete the mapping at the gateway (waiting up to `timeout` for its answer)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._upnp is not None:
            (igd, port), self._upnp = self._upnp, None
            try:
                await asyncio.wait_for(igd.delete(port), timeout)
            except (upnp.UpnpError, asyncio.TimeoutError) as exc:
                log.warning("portmap: deleting the UPnP mapping failed: %s", exc)
            self._set(None)
            return
        client, transport = self._client, self._transport
        if client is None or transport is None or client.mapping is None:
            return
        gw_transport, proto = transport, transport.get_protocol()
        try:
            for d in client.release():
                gw_transport.sendto(d)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                try:
                    data = await asyncio.wait_for(proto.queue.get(), left)  # type: ignore[attr-defined]
                except asyncio.TimeoutError:
                    break
                if any(isinstance(e, Released) for e in client.receive(data, time.monotonic())):
                    break
        finally:
            gw_transport.close()
            self._transport = None
            self._set(None)
