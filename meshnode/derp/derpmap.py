"""The relay map: regions, each with one or more relay servers (Tailscale's `tailcfg.DERPMap`).

Two JSON forms:
- Tailscale's, as in a policy file's `"derpMap"` section or `--derp-map FILE`:
      {"OmitDefaultRegions": true,
       "Regions": {"900": {"RegionID": 900, "RegionCode": "home", "RegionName": "Home",
                           "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "relay.example",
                                      "IPv4": "192.0.2.10", "DERPPort": 443, "STUNPort": 3478}]}}}
  `DERPPort` 0 means 443, `STUNPort` 0 means 3478 and -1 no STUN, as in Tailscale. One field is ours:
  `"HTTPOnly": true` for a relay served over plain HTTP (the control server's embedded relay when the
  control server itself is plain HTTP).
- Ours, in the network map's `derp_map` (snake case like the rest of the map); see `to_json`.

An empty `host` means "the control server's own host": the embedded relay does not know under which
name nodes reach the control server, the node does (`RelayNode.url(control_url)`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("meshnode.derp")

EMBEDDED_REGION_ID = 999
MAX_REGIONS = 1000
MAX_NODES = 100


class RelayMapError(ValueError):
    """A relay map that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class RelayNode:
    name: str
    region_id: int
    host: str = ""                 # DNS name or address; "" = the control server's host
    port: int = 443                # HTTP(S) port of /derp
    stun_port: int = 3478          # -1: no STUN here
    tls: bool = True
    ipv4: str = ""                 # optional fixed addresses (skip DNS)
    ipv6: str = ""

    def url(self, control_url: str = "") -> str:
        """The /derp URL of this server; an empty host is taken from `control_url`."""
        host = self.host or (urllib.parse.urlsplit(control_url).hostname or "")
        if not host:
            raise RelayMapError(f"relay {self.name!r} has no host and no control server URL was given")
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/derp"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "host": self.host, "port": self.port,
                               "stun_port": self.stun_port, "tls": self.tls}
        if self.ipv4:
            out["ipv4"] = self.ipv4
        if self.ipv6:
            out["ipv6"] = self.ipv6
        return out


@dataclass(frozen=True, slots=True)
class Region:
    region_id: int
    code: str
    name: str
    nodes: tuple[RelayNode, ...]

    def urls(self, control_url: str = "") -> list[str]:
        """The /derp URLs of this region's servers, in the map's order: what `DerpClient` takes."""
        return [n.url(control_url) for n in self.nodes]

    def to_json(self) -> dict[str, Any]:
        return {"region_id": self.region_id, "code": self.code, "name": self.name,
                "nodes": [n.to_json() for n in self.nodes]}


@dataclass(frozen=True, slots=True)
class RelayMap:
    regions: tuple[Region, ...] = ()          # sorted by region id
    omit_default_regions: bool = False        # Tailscale-format input only: replace, don't merge

    def region(self, region_id: int) -> Region | None:
        for r in self.regions:
            if r.region_id == region_id:
                return r
        return None

    def merged(self, other: "RelayMap") -> "RelayMap":
        """`other` on top of this map: its regions replace ours with the same id; with
        `omit_default_regions` only its regions remain."""
        if other.omit_default_regions:
            return RelayMap(other.regions)
        by_id = {r.region_id: r for r in self.regions}
        by_id.update({r.region_id: r for r in other.regions})
        return RelayMap(tuple(by_id[k] for k in sorted(by_id)))

    def to_json(self) -> dict[str, Any]:
        return {"regions": [r.to_json() for r in self.regions]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True)

    @staticmethod
    def from_json(obj: Any) -> "RelayMap":
        """Read our (network map) form."""
        where = "derp_map"
        if not isinstance(obj, dict) or not isinstance(obj.get("regions", []), list):
            raise RelayMapError(f"{where}: expected {{'regions': [...]}}")
        regions = []
        for i, r in enumerate(obj.get("regions", [])):
            w = f"{where}.regions[{i}]"
            if not isinstance(r, dict):
                raise RelayMapError(f"{w}: expected an object")
            rid = _int(r.get("region_id"), f"{w}.region_id", 1, 65535)
            nodes = tuple(_node(n, rid, f"{w}.nodes[{j}]", tailscale=False)
                          for j, n in enumerate(_list(r.get("nodes"), f"{w}.nodes")))
            regions.append(Region(rid, _str(r.get("code", ""), f"{w}.code"), _str(r.get("name", ""), f"{w}.name"),
                                  nodes))
        return _checked(regions, False)

    @staticmethod
    def from_tailscale(obj: Any, where: str = "derpMap") -> "RelayMap":
        """Read Tailscale's DERPMap JSON (policy file section or --derp-map file)."""
        if not isinstance(obj, dict):
            raise RelayMapError(f"{where}: expected an object")
        unknown = set(obj) - {"Regions", "OmitDefaultRegions", "HomeParams"}
        if unknown:
            raise RelayMapError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        regions_obj = obj.get("Regions", {})
        if not isinstance(regions_obj, dict):
            raise RelayMapError(f"{where}.Regions: expected an object keyed by region ID")
        regions = []
        for key, r in regions_obj.items():
            w = f"{where}.Regions[{key!r}]"
            if not isinstance(r, dict):
                raise RelayMapError(f"{w}: expected an object")
            rid = _int(r.get("RegionID"), f"{w}.RegionID", 1, 65535)
            if str(rid) != str(key).strip():
                raise RelayMapError(f"{w}: RegionID {rid} does not match its key")
            nodes = tuple(_node(n, rid, f"{w}.Nodes[{j}]", tailscale=True)
                          for j, n in enumerate(_list(r.get("Nodes"), f"{w}.Nodes")))
            regions.append(Region(rid, _str(r.get("RegionCode", ""), f"{w}.RegionCode"),
                                  _str(r.get("RegionName", ""), f"{w}.RegionName"), nodes))
        omit = obj.get("OmitDefaultRegions", False)
        if not isinstance(omit, bool):
            raise RelayMapError(f"{where}.OmitDefaultRegions: expected true or false")
        return _checked(regions, omit)


def embedded_map(region_id: int = EMBEDDED_REGION_ID, host: str = "", port: int = 443, tls: bool = True,
                 stun_port: int = 3478, code: str = "control", name: str = "Control server") -> RelayMap:
    """The one-region map of the relay embedded in the control server."""
    return RelayMap((Region(region_id, code, name,
                            (RelayNode(f"{region_id}a", region_id, host, port, stun_port, tls),)),))


def _checked(regions: list[Region], omit: bool) -> RelayMap:
    if len(regions) > MAX_REGIONS:
        raise RelayMapError(f"at most {MAX_REGIONS} regions")
    ids = [r.region_id for r in regions]
    if len(set(ids)) != len(ids):
        raise RelayMapError("region IDs must be unique")
    for r in regions:
        if not r.nodes:
            raise RelayMapError(f"region {r.region_id} has no servers")
    return RelayMap(tuple(sorted(regions, key=lambda r: r.region_id)), omit)


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise RelayMapError(f"{where}: expected a list")
    if len(v) > MAX_NODES:
        raise RelayMapError(f"{where}: at most {MAX_NODES} servers")
    return v


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise RelayMapError(f"{where}: expected a number from {lo} to {hi}")
    return v


def _str(v: Any, where: str, max_len: int = 253) -> str:
    if not isinstance(v, str) or len(v) > max_len or any(ord(c) < 32 for c in v):
        raise RelayMapError(f"{where}: expected a short string")
    return v


def _ip(v: Any, where: str, version: int) -> str:
    v = _str(v, where)
    if not v:
        return ""
    try:
        addr = ipaddress.ip_address(v)
    except ValueError:
        raise RelayMapError(f"{where}: {v!r} is not an IP address") from None
    if addr.version != version:
        raise RelayMapError(f"{where}: expected an IPv{version} address")
    return str(addr)


def _host(v: Any, where: str) -> str:
    v = _str(v, where)
    if v and not all(c.isalnum() or c in ".-_:" for c in v):
        raise RelayMapError(f"{where}: {v!r} is not a host name or address")
    return v


def _node(n: Any, rid: int, where: str, *, tailscale: bool) -> RelayNode:
    if not isinstance(n, dict):
        raise RelayMapError(f"{where}: expected an object")
    if tailscale:
        if "RegionID" in n and n["RegionID"] != rid:
            raise RelayMapError(f"{where}.RegionID: must be {rid}, the region it is listed in")
        http_only = n.get("HTTPOnly", False)
        if not isinstance(http_only, bool):
            raise RelayMapError(f"{where}.HTTPOnly: expected true or false")
        port = _int(n.get("DERPPort", 0), f"{where}.DERPPort", 0, 65535) or (80 if http_only else 443)
        stun = _int(n.get("STUNPort", 0), f"{where}.STUNPort", -1, 65535) or 3478
        return RelayNode(_str(n.get("Name", ""), f"{where}.Name") or f"{rid}a", rid,
                         _host(n.get("HostName", ""), f"{where}.HostName"), port, stun, not http_only,
                         _ip(n.get("IPv4", ""), f"{where}.IPv4", 4), _ip(n.get("IPv6", ""), f"{where}.IPv6", 6))
    tls = n.get("tls", True)
    if not isinstance(tls, bool):
        raise RelayMapError(f"{where}.tls: expected true or false")
    return RelayNode(_str(n.get("name", ""), f"{where}.name"), rid, _host(n.get("host", ""), f"{where}.host"),
                     _int(n.get("port", 443), f"{where}.port", 1, 65535),
                     _int(n.get("stun_port", 3478), f"{where}.stun_port", -1, 65535), tls,
                     _ip(n.get("ipv4", ""), f"{where}.ipv4", 4), _ip(n.get("ipv6", ""), f"{where}.ipv6", 6))


class RelayMapFile:
    """A Tailscale-format relay map file, re-read when it changes; a version that fails to load is
    logged and the last good map kept."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.current: RelayMap | None = None
        self.error: str | None = None
        self.reload()
        if self.current is None:
            raise RelayMapError(f"{path}: {self.error}")

    def reload(self) -> bool:
        """Re-read the file if it changed; True if the map in force changed."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            with open(self.path, encoding="utf-8") as f:
                new = RelayMap.from_tailscale(json.load(f), "derpMap")
        except (OSError, ValueError) as exc:       # RelayMapError and JSON errors are ValueErrors
            self.error = str(exc)
            log.error("relay map %s does not load (%s); keeping the last good one", self.path, exc)
            return False
        self.error = None
        changed = new != self.current
        self.current = new
        return changed
