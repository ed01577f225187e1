"""UPnP IGD port mapping (the fallback when the gateway speaks neither PCP nor NAT-PMP), as
Tailscale's net/portmapper/upnp.go does it: an SSDP M-SEARCH for an InternetGatewayDevice sent to
the gateway, its device description fetched from the LOCATION it answers, and SOAP calls to its
WANIPConnection (2 or 1) or WANPPPConnection service: GetExternalIPAddress, AddPortMapping
(UDP, our address, a lease) and DeletePortMapping.

The message building and parsing here are pure functions; `UpnpGateway` does the HTTP with aiohttp.
Everything read from the gateway is bounded in size, and parsed by expat (2.4+ refuses entity
expansion bombs).
"""

from __future__ import annotations

import asyncio
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import escape

SSDP_PORT = 1900
MAX_BODY = 64 * 1024
# Tailscale's uPnPIGDPacket: some devices answer ssdp:all with only their first descriptor.
M_SEARCH = (b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n"
            b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nMAN: \"ssdp:discover\"\r\nMX: 2\r\n\r\n")
# In order of preference.
SERVICES = ("urn:schemas-upnp-org:service:WANIPConnection:2", "urn:schemas-upnp-org:service:WANIPConnection:1",
            "urn:schemas-upnp-org:service:WANPPPConnection:1")
DESCRIPTION = "meshnode"


class UpnpError(Exception):
    """The gateway's UPnP answer was missing, malformed, or a refusal (`code`: the UPnP error code)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def parse_ssdp_location(data: bytes) -> str | None:
    """The LOCATION of an SSDP answer for an IGD (None: not one)."""
    try:
        text = data[:4096].decode("latin-1")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    if not lines or not lines[0].startswith("HTTP/1.1 200"):
        return None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    loc = headers.get("location", "")
    if not loc.startswith("http://"):
        return None
    return loc


@dataclass(frozen=True, slots=True)
class Service:
    service_type: str
    control_url: str


def parse_description(xml: bytes, location: str) -> Service:
    """The best WAN connection service of a device description, with its absolute control URL."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise UpnpError(f"unreadable device description: {exc}") from None
    base = location
    found: dict[str, str] = {}
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "URLBase" and el.text and el.text.strip():
            base = el.text.strip()
        if tag == "service":
            fields = {c.tag.rsplit("}", 1)[-1]: (c.text or "").strip() for c in el}
            st, url = fields.get("serviceType", ""), fields.get("controlURL", "")
            if st in SERVICES and url:
                found.setdefault(st, url)
    for st in SERVICES:
        if st in found:
            url = urllib.parse.urljoin(base, found[st])
            if not url.startswith("http://"):
                raise UpnpError(f"control URL {url!r} is not http")
            return Service(st, url)
    raise UpnpError("the gateway's UPnP device has no WAN connection service")


def soap_request(service: str, action: str, args: list[tuple[str, str]]) -> tuple[dict[str, str], bytes]:
    """Headers and body of one SOAP call."""
    inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in args)
    body = ('<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:{action} xmlns:u="{service}">{inner}</u:{action}></s:Body></s:Envelope>\r\n')
    return ({"Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": f'"{service}#{action}"'},
            body.encode())


def parse_soap_response(xml: bytes, action: str) -> dict[str, str]:
    """The out-arguments of a SOAP answer; a UPnP fault raises UpnpError with its code."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise UpnpError(f"unreadable SOAP answer to {action}: {exc}") from None
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "UPnPError":
            fields = {c.tag.rsplit("}", 1)[-1]: (c.text or "").strip() for c in el}
            code = fields.get("errorCode", "")
            raise UpnpError(f"UPnP {action} refused: {fields.get('errorDescription') or 'error'} ({code})",
                            int(code) if code.isdigit() else None)
        if tag == action + "Response":
            return {c.tag.rsplit("}", 1)[-1]: (c.text or "").strip() for c in el}
    raise UpnpError(f"no {action}Response in the gateway's answer")


async def discover(gateway_ip: str, client_ip: str, timeout: float) -> str | None:
    """Ask the gateway (unicast, port 1900) for its IGD; its description URL or None."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[str] = loop.create_future()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            loc = parse_ssdp_location(data)
            if loc and not got.done():
                got.set_result(loc)

        def error_received(self, exc: Exception) -> None:
            pass

    transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=(client_ip, 0))
    try:
        deadline = loop.time() + timeout
        wait = 0.25
        while not got.done() and loop.time() < deadline:
            transport.sendto(M_SEARCH, (gateway_ip, SSDP_PORT))
            try:
                await asyncio.wait_for(asyncio.shield(got), min(wait, deadline - loop.time()))
            except asyncio.TimeoutError:
                wait *= 2
        return got.result() if got.done() else None
    finally:
        transport.close()


class UpnpGateway:
    """SOAP calls to one gateway's WAN connection service."""

    def __init__(self, service: Service, timeout: float = 3.0) -> None:
        self.service = service
        self.timeout = timeout

    @classmethod
    async def from_location(cls, location: str, timeout: float = 3.0) -> "UpnpGateway":
        return cls(parse_description(await _get(location, timeout), location), timeout)

    async def call(self, action: str, args: list[tuple[str, str]]) -> dict[str, str]:
        import aiohttp
        headers, body = soap_request(self.service.service_type, action, args)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as http:
                async with http.post(self.service.control_url, data=body, headers=headers) as resp:
                    data = await resp.content.read(MAX_BODY + 1)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise UpnpError(f"UPnP {action}: {exc or type(exc).__name__}") from None
        if len(data) > MAX_BODY:
            raise UpnpError(f"UPnP {action}: answer larger than {MAX_BODY} bytes")
        return parse_soap_response(data, action)

    async def external_ip(self) -> str:
        ip = (await self.call("GetExternalIPAddress", [])).get("NewExternalIPAddress", "")
        if not ip:
            raise UpnpError("the gateway has no external address (UPnP)")
        return ip

    async def add(self, external_port: int, internal_port: int, client_ip: str, lease: int) -> None:
        await self.call("AddPortMapping", [
            ("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "UDP"),
            ("NewInternalPort", str(internal_port)), ("NewInternalClient", client_ip), ("NewEnabled", "1"),
            ("NewPortMappingDescription", DESCRIPTION), ("NewLeaseDuration", str(lease))])

    async def delete(self, external_port: int) -> None:
        await self.call("DeletePortMapping", [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)),
                                              ("NewProtocol", "UDP")])


async def _get(url: str, timeout: float) -> bytes:
    import aiohttp
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.get(url) as resp:
                if resp.status != 200:
                    raise UpnpError(f"GET {url}: HTTP {resp.status}")
                data = await resp.content.read(MAX_BODY + 1)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise UpnpError(f"GET {url}: {exc or type(exc).__name__}") from None
    if len(data) > MAX_BODY:
        raise UpnpError(f"GET {url}: larger than {MAX_BODY} bytes")
    return data
