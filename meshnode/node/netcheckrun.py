"""The node's side of port mapping and netcheck: glue between the daemon and the sans-I/O cores
(meshnode.portmap, meshnode.netcheck), so the daemon only calls this module from a few places.

- `NodeConnectivity.start_portmap(port)` keeps a NAT-PMP/PCP mapping of the WireGuard UDP port at
  the default gateway while the tunnel runs; `mapped_first()` puts the mapped address:port first
  among the endpoints the daemon reports (the daemon's one-second endpoint watch re-reports when
  the mapping appears, changes or goes away); `stop_portmap()` deletes the mapping at the gateway.
- `NodeConnectivity.netcheck()` runs netcheck's STUN probes against the relay map of the network
  map, and asks the gateway which port-mapping protocols it answers, at the same time.

Port mapping is on by default, as in Tailscale; MESHNODE_DISABLE_PORTMAPPER=1 turns it off (like
TS_DISABLE_PORTMAPPER), e.g. on a network whose gateway must not be asked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

from ..netcheck import NetcheckReport, run_netcheck
from ..netmap import NetMap
from ..portmap.runner import PortMapper, default_gateway, probe

log = logging.getLogger("meshnode.node")


def portmap_disabled() -> bool:
    return os.environ.get("MESHNODE_DISABLE_PORTMAPPER", "").strip().lower() in ("1", "true", "yes")


def interface_ips() -> frozenset[str]:
    """Every address on this machine's interfaces (blocking: netlink)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return frozenset(str(m.get_attr("IFA_ADDRESS")) for m in ipr.get_addr() if m.get_attr("IFA_ADDRESS"))


@dataclass(frozen=True)
class ControlProbe:
    """Whether the login server answers GET /key, how fast, and with the key this node pinned."""

    url: str | None
    reachable: bool
    latency_ms: float | None
    key_matches_pin: bool | None   # None: nothing pinned yet, or no answer
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "reachable": self.reachable, "latency_ms": self.latency_ms,
                "key_matches_pin": self.key_matches_pin, "error": self.error}


async def probe_control(url: str | None, here: str, pinned: str | None, timeout: float) -> ControlProbe:
    """GET `here`/key, bounded by `timeout`; never raises. `url` is the login server as configured
    (possibly "URL1,URL2"), `here` the replica to ask."""
    import aiohttp
    if not url:
        return ControlProbe(None, False, None, None, "no login server: run `meshnode up --login-server URL`")
    start = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.get(here.rstrip("/") + "/key") as resp:
                status = resp.status
                body = await resp.json(content_type=None) if status == 200 else None
    except asyncio.TimeoutError:
        error = f"no answer within {timeout:g}s"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        error = str(exc) or type(exc).__name__
    else:
        latency = round((time.monotonic() - start) * 1000, 1)
        if status != 200:
            error = f"GET /key answered HTTP {status}"
        elif not isinstance(body, dict) or not isinstance(body.get("public_key"), str):
            error = "GET /key answered without a public key"
        else:
            return ControlProbe(url, True, latency, None if pinned is None else body["public_key"] == pinned, None)
    return ControlProbe(url, False, None, None, error)


class NodeConnectivity:
    def __init__(self) -> None:
        self._mapper: PortMapper | None = None
        self._home: int | None = None        # the last preferred region (for hysteresis)

    # --- port mapping ----------------------------------------------------------------------------

    def start_portmap(self, port: int | None) -> None:
        if not port or portmap_disabled():
            return
        if self._mapper is not None and self._mapper.internal_port == port:
            return
        if self._mapper is not None:       # a new WireGuard port: the old mapping is deleted later
            asyncio.get_running_loop().create_task(self._mapper.close())
        self._mapper = PortMapper(port)
        self._mapper.start()

    async def stop_portmap(self) -> None:
        mapper, self._mapper = self._mapper, None
        if mapper is not None:
            try:
                await mapper.close()
            except OSError as exc:     # the gateway went away: the mapping expires on its own
                log.warning("portmap: deleting the mapping failed: %s", exc)

    @property
    def mapped_endpoint(self) -> str | None:
        m = self._mapper.mapping if self._mapper is not None else None
        return m.endpoint if m is not None else None

    def mapped_first(self, endpoints: list[str]) -> list[str]:
        mapped = self.mapped_endpoint
        if mapped is None:
            return endpoints
        return [mapped] + [e for e in endpoints if e != mapped]

    def portmap_status(self) -> dict[str, Any]:
        m = self._mapper
        return {"enabled": not portmap_disabled(), "mapped": self.mapped_endpoint,
                "protocol": m.mapping.protocol.value if m is not None and m.mapping is not None else None,
                "error": m.error if m is not None else None}

    # --- netcheck --------------------------------------------------------------------------------

    async def netcheck(self, netmap: NetMap | None, login_server: str, timeout: float,
                       local_endpoints: list[str] | None) -> dict[str, Any]:
        """The report with the issue's keys (`udp`, `global_v4`, ..., `nat`) plus `port_mapping_detail`
        and `relay_regions` (ID to code, for printing). `local_endpoints` None: no tunnel runs."""
        # The machine's own addresses (not the endpoints list: that also holds STUN-learned ones),
        # so a global address that is one of them means no NAT at all.
        try:
            local_ips = await asyncio.to_thread(interface_ips)
        except OSError:
            local_ips = frozenset()
        relay_map = netmap.derp_map if netmap is not None else None

        async def stun() -> NetcheckReport:
            if relay_map is None or not relay_map.regions:
                return NetcheckReport(udp=False, ipv4=False, ipv6=False, global_v4=None, global_v6=None,
                                      mapping_varies_by_dest_ip=None,
                                      nat="unknown: the network map has no relay servers to ask (STUN)")
            return await run_netcheck(relay_map, control_url=login_server, timeout=timeout,
                                      previous_home=self._home, local_ips=local_ips)

        async def portmap() -> tuple[str, ...]:
            # Only with a running tunnel: without a WireGuard port there is nothing to map, and a
            # DNS-only daemon has no business talking to the gateway.
            if portmap_disabled() or local_endpoints is None:
                return ()
            try:
                gw = await asyncio.to_thread(default_gateway)
                return tuple(p.value for p in await probe(gw, min(timeout, 1.0))) if gw else ()
            except OSError as exc:
                log.warning("netcheck: port mapping probe failed: %s", exc)
                return ()

        report, protocols = await asyncio.gather(stun(), portmap())
        if report.preferred_relay is not None:
            self._home = report.preferred_relay
        report = replace(report, port_mapping=protocols)
        mapped = self.mapped_endpoint
        if mapped is not None and report.udp:
            report = replace(report, nat=report.nat + f"; the gateway's port mapping gives peers a fixed address, "
                             f"{mapped}, so direct connections work even with peers behind hard NATs")
        out = report.to_json()
        out["port_mapping_detail"] = self.portmap_status()
        out["relay_regions"] = {str(r.region_id): r.code or r.name or str(r.region_id)
                                for r in (relay_map.regions if relay_map is not None else ())}
        return out


def format_report(r: dict[str, Any]) -> list[str]:
    """The STUN/NAT/port-mapping lines of `meshnode netcheck`, in the shape of Tailscale's."""
    if "udp" not in r:          # a daemon from before this report existed
        return []
    names = r.get("relay_regions") or {}

    def region(rid: Any) -> str:
        name = names.get(str(rid))
        return f"{rid} ({name})" if name and name != str(rid) else str(rid)

    def yes(v: Any) -> str:
        return "unknown" if v is None else str(bool(v)).lower()

    lines = [f"\t* UDP works: {yes(r['udp'])}",
             f"\t* IPv4: {'yes, ' + r['global_v4'] if r.get('global_v4') else 'no'}",
             f"\t* IPv6: {'yes, ' + r['global_v6'] if r.get('global_v6') else 'no'}",
             f"\t* MappingVariesByDestIP: {yes(r.get('mapping_varies_by_dest_ip'))}",
             f"\t* PortMapping: {', '.join(r.get('port_mapping') or []) or 'none answered'}"]
    pm = r.get("port_mapping_detail") or {}
    if pm.get("mapped"):
        lines.append(f"\t  (mapped {pm['mapped']} with {pm.get('protocol')}; reported first to the control server)")
    lat = r.get("relay_latency_ms") or {}
    pref = r.get("preferred_relay")
    lines.append(f"\t* Nearest relay: {region(pref) if pref is not None else '-'}")
    lines.append("\t* Relay latency:" + ("" if lat else " none measured"))
    for rid, ms in sorted(lat.items(), key=lambda kv: kv[1]):
        lines.append(f"\t\t- {region(rid)}: {ms:.1f}ms")
    cp = r.get("captive_portal")
    lines.append(f"\t* Captive portal: {'unknown' if cp is None else ('yes' if cp else 'no')}")
    lines.append(f"\t* NAT: {r.get('nat') or '-'}")
    return lines
