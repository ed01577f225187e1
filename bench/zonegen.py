"""The same DNS data for every server: zone files, dnsmasq/unbound/knot/nsd configs and dnsperf query
mixes, generated from a magicdns network view.

Shared by bench/dns.sh (through bench/dns_bench.py) and tests/integration/test_differential.py.

The zone contents are derived from the view *independently* of magicdns/zone.py (only the constants
are imported), following DESIGN.md section 3: if both derivations agree, a reference server fed these
zone files must answer like magicdns, which is what the differential test checks.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from magicdns.view import DnsView
from magicdns.zone import (APEX_TTL, NEGATIVE_TTL, NODE_TTL, RESOLVER_V4, RESOLVER_V6, TAILNET_V4,
                           TAILNET_V6, V4_REVERSE_APEXES, V6_REVERSE_APEX)

# The SOA timers magicdns serves (zone.py writes them inline: serial, refresh, retry, expire, minimum).
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 10800, 3600, 604800

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class ZoneData:
    """One zone: its apex and its records as (owner, ttl, type, presentation value), owners absolute."""

    apex: str
    rrs: list[tuple[str, int, str, str]] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"$ORIGIN {self.apex}.", ""]
        lines += [f"{owner}. {ttl} IN {rtype} {value}" for owner, ttl, rtype, value in self.rrs]
        return "\n".join(lines) + "\n"


def _under(name: str, apex: str) -> bool:
    return name == apex or name.endswith("." + apex)


def reverse_apex(addr: IPAddr) -> str | None:
    """The magicdns reverse zone holding the PTR of `addr`, or None outside the node ranges."""
    if addr.version == 4 and addr in TAILNET_V4:
        return f"{addr.packed[1]}.100.in-addr.arpa"
    if addr.version == 6 and addr in TAILNET_V6:
        return V6_REVERSE_APEX
    return None


def zones_from_view(view: DnsView, all_reverse: bool = True) -> dict[str, ZoneData]:
    """Every zone magicdns is authoritative for, keyed by apex.

    `all_reverse` writes all 64 IPv4 reverse zones (magicdns answers for each of them, so a reference
    server must too for NXDOMAIN answers to agree); otherwise only those holding a PTR.
    """
    domain = view.domain
    ns_name = f"magicdns.{domain}"
    apexes = [domain, V6_REVERSE_APEX, *V4_REVERSE_APEXES]
    apexes += [d for d, ups in view.dns.routes.items() if not ups and not _under(d, domain)]
    zones = {apex: ZoneData(apex) for apex in apexes}
    for apex, z in zones.items():
        soa = (f"{ns_name}. hostmaster.{domain}. {view.version} {SOA_REFRESH} {SOA_RETRY} "
               f"{SOA_EXPIRE} {NEGATIVE_TTL}")
        z.rrs.append((apex, NEGATIVE_TTL, "SOA", soa))
        z.rrs.append((apex, APEX_TTL, "NS", f"{ns_name}."))
    tail = zones[domain].rrs
    tail.append((ns_name, APEX_TTL, "A", str(RESOLVER_V4)))
    tail.append((ns_name, APEX_TTL, "AAAA", str(RESOLVER_V6)))

    # Hosts: two nodes with one name serve the addresses of both; an address's PTR names its first owner.
    hosts: dict[str, list[IPAddr]] = {}
    for host in view.hosts:
        hosts.setdefault(f"{host.name}.{domain}", []).extend(host.addresses)
    ptr: dict[IPAddr, str] = {}
    for fqdn, addrs in hosts.items():
        for a in addrs:
            ptr.setdefault(a, fqdn)

    # Admin records: a CNAME stands alone; A/AAAA/CNAME at a node name shadow the node only when all
    # of them say override (else they are ignored).
    by_name: dict[str, list] = {}
    for rec in view.dns.records:
        by_name.setdefault(rec.name, []).append(rec)
    shadowed: set[str] = set()
    records: list = []
    for name, recs in by_name.items():
        if any(r.rtype == "CNAME" for r in recs):
            recs = [next(r for r in recs if r.rtype == "CNAME")]
        if name in hosts:
            clash = [r for r in recs if r.rtype in ("A", "AAAA", "CNAME")]
            if clash and not all(r.override for r in clash):
                recs = [r for r in recs if r.rtype not in ("A", "AAAA", "CNAME")]
            elif clash:
                shadowed.add(name)
        records.extend(recs)

    for fqdn, addrs in hosts.items():
        if fqdn in shadowed:
            continue
        for a in addrs:
            tail.append((fqdn, NODE_TTL, "A" if a.version == 4 else "AAAA", str(a)))
    for a, fqdn in ptr.items():
        apex = reverse_apex(a)
        if apex is not None:
            zones[apex].rrs.append((a.reverse_pointer, NODE_TTL, "PTR", f"{fqdn}."))
    by_length = sorted(zones, key=len, reverse=True)
    for rec in records:
        apex = next((z for z in by_length if _under(rec.name, z)), None)
        if apex is not None:  # a record outside every local zone is never served
            zones[apex].rrs.append((rec.name, rec.ttl, rec.rtype, rec.value))
    if not all_reverse:
        zones = {a: z for a, z in zones.items() if len(z.rrs) > 2 or not a.endswith(".arpa")}
    return zones


def write_zones(zones: dict[str, ZoneData], directory: Path) -> dict[str, str]:
    """Write `<apex>.zone` files; returns apex -> file name."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for apex, z in zones.items():
        files[apex] = f"{apex}.zone"
        (directory / files[apex]).write_text(z.text())
    return files


def knot_conf(tmp: Path, zonedir: Path, files: dict[str, str], port: int, workers: int = 1,
              address: str = "127.0.0.1") -> str:
    """knotd configuration. Trap: knotd pins each UDP worker to a CPU itself, overriding taskset, so
    the benchmark re-pins its threads after start (`taskset -a -p`)."""
    zones = "\n".join(f"  - domain: {apex}\n    file: {f}" for apex, f in files.items())
    return f"""server:
    listen: {address}@{port}
    rundir: {tmp}
    udp-workers: {workers}
    tcp-workers: {workers}
    background-workers: 1
database:
    storage: {tmp}
log:
  - target: stderr
    any: error
template:
  - id: default
    storage: {zonedir}
    journal-content: none
    zonefile-sync: -1
    semantic-checks: off
zone:
{zones}
"""


def nsd_conf(tmp: Path, zonedir: Path, files: dict[str, str], port: int, workers: int = 1,
             address: str = "127.0.0.1") -> str:
    """nsd configuration; nsd rate-limits by default, so RRL is switched off."""
    zones = "\n".join(f"zone:\n  name: {apex}\n  zonefile: {f}" for apex, f in files.items())
    return f"""server:
  ip-address: {address}@{port}
  port: {port}
  server-count: {workers}
  reuseport: yes
  username: ""
  chroot: ""
  zonesdir: "{zonedir}"
  pidfile: "{tmp}/nsd.pid"
  zonelistfile: "{tmp}/nsd.zonelist"
  xfrdfile: "{tmp}/nsd.xfrd"
  xfrdir: "{tmp}"
  database: ""
  verbosity: 0
  hide-version: yes
  rrl-ratelimit: 0
remote-control:
  control-enable: no
{zones}
"""


def dnsmasq_conf(view: DnsView, tmp: Path, port: int, address: str = "127.0.0.1") -> str:
    """dnsmasq as an authoritative-ish server: host-record (A, AAAA and their PTRs) and local= domains
    so that unknown names get NXDOMAIN instead of being forwarded."""
    domain = view.domain
    lines = [f"port={port}", f"listen-address={address}", "bind-interfaces", "no-resolv", "no-hosts",
             "no-poll", "user=root", f"pid-file={tmp}/dnsmasq.pid", "cache-size=0",
             f"local=/{domain}/", f"local=/{V6_REVERSE_APEX}/", "log-facility=/dev/null"]
    apexes = {reverse_apex(a) for h in view.hosts for a in h.addresses} - {None}
    lines += [f"local=/{a}/" for a in sorted(apexes) if a != V6_REVERSE_APEX]
    for h in view.hosts:
        lines.append(f"host-record={h.name}.{domain}," + ",".join(str(a) for a in h.addresses))
    for rec in view.dns.records:
        if rec.rtype == "TXT":
            lines.append(f"txt-record={rec.name},{rec.value.strip(chr(34))}")
    return "\n".join(lines) + "\n"


def dnsmasq_hosts_conf(view: DnsView, tmp: Path, port: int, address: str = "127.0.0.1") -> str:
    """dnsmasq as its users usually run it: the names in an addn-hosts file (A, AAAA and PTRs) and
    its default cache, local= domains so unknown names get NXDOMAIN."""
    domain = view.domain
    hosts = tmp / "hosts"
    hosts.write_text("".join(f"{a} {h.name}.{domain}\n" for h in view.hosts for a in h.addresses))
    lines = [f"port={port}", f"listen-address={address}", "bind-interfaces", "no-resolv", "no-hosts",
             "no-poll", "user=root", f"pid-file={tmp}/dnsmasq.pid", f"addn-hosts={hosts}",
             f"local=/{domain}/", f"local=/{V6_REVERSE_APEX}/", "log-facility=/dev/null"]
    apexes = {reverse_apex(a) for h in view.hosts for a in h.addresses} - {None}
    lines += [f"local=/{a}/" for a in sorted(apexes) if a != V6_REVERSE_APEX]
    for rec in view.dns.records:
        if rec.rtype == "TXT":
            lines.append(f"txt-record={rec.name},{rec.value.strip(chr(34))}")
    return "\n".join(lines) + "\n"


def unbound_conf(zones: dict[str, ZoneData], tmp: Path, port: int, threads: int = 1,
                 address: str = "127.0.0.1") -> str:
    """unbound answering the zones from local-zone/local-data (static: NXDOMAIN/NODATA with the SOA)."""
    lines = ["server:", f"  interface: {address}@{port}", f"  port: {port}", "  do-daemonize: no",
             '  username: ""', '  chroot: ""', f'  directory: "{tmp}"', f'  pidfile: "{tmp}/unbound.pid"',
             "  use-syslog: no", '  logfile: ""', "  verbosity: 0", f"  num-threads: {threads}",
             "  so-reuseport: yes", "  access-control: 127.0.0.0/8 allow", '  module-config: "iterator"',
             "  do-ip6: no", "  ratelimit: 0", "  ip-ratelimit: 0", "  minimal-responses: yes",
             # Never recurse: a name outside the zones gets REFUSED instead of a query to the Internet.
             '  local-zone: "." refuse']
    for apex, z in zones.items():
        lines.append(f'  local-zone: "{apex}." static')
        for owner, ttl, rtype, value in z.rrs:
            lines.append(f"  local-data: '{owner}. {ttl} IN {rtype} {value}'")
    lines += ["remote-control:", "  control-enable: no"]
    return "\n".join(lines) + "\n"


def bench_view_json(hosts: int, domain: str = "tailnet", version: int = 1, txt_every: int = 10) -> dict:
    """A view of `hosts` nodes `host-N`, each with one IPv4 and one IPv6 address, and a TXT record on
    every `txt_every`th (0: none) so that TXT queries elsewhere are NODATA."""
    peers = []
    base4 = int(TAILNET_V4.network_address)
    base6 = int(TAILNET_V6.network_address)
    for i in range(1, hosts + 1):
        peers.append({"name": f"host-{i}",
                      "addresses": [str(ipaddress.IPv4Address(base4 + i)), str(ipaddress.IPv6Address(base6 + i))]})
    records = [{"name": f"host-{i}.{domain}", "type": "TXT", "value": f'"node {i}"', "ttl": 300}
               for i in range(txt_every, hosts + 1, txt_every)] if txt_every else []
    return {"domain": domain, "self": peers[0], "peers": peers[1:],
            "dns": {"nameservers": [], "routes": {}, "search_domains": [domain], "records": records},
            "version": version}


# The benchmark's query mix, in percent: hits (A, AAAA, PTR v4/v6), NXDOMAIN and NODATA.
MIX = (("A", 40), ("AAAA", 20), ("PTR4", 10), ("PTR6", 10), ("NXDOMAIN", 10), ("NODATA", 10))


def bench_queries(view: DnsView, count: int = 10_000, seed: int = 1) -> list[str]:
    """dnsperf input lines drawn from the view with the MIX proportions, shuffled reproducibly."""
    rnd = random.Random(seed)
    hosts = list(view.hosts)
    out: list[str] = []
    for kind, pct in MIX:
        for _ in range(count * pct // 100):
            h = rnd.choice(hosts)
            fqdn = f"{h.name}.{view.domain}"
            v4 = next(a for a in h.addresses if a.version == 4)
            v6 = next(a for a in h.addresses if a.version == 6)
            if kind in ("A", "AAAA"):
                out.append(f"{fqdn} {kind}")
            elif kind == "PTR4":
                out.append(f"{v4.reverse_pointer} PTR")
            elif kind == "PTR6":
                out.append(f"{v6.reverse_pointer} PTR")
            elif kind == "NXDOMAIN":
                out.append(f"nx-{rnd.randrange(10**9)}.{view.domain} A")
            else:  # hosts without a TXT record (every tenth has one)
                out.append(f"{fqdn if not h.name.endswith('0') else 'host-1.' + view.domain} TXT")
    rnd.shuffle(out)
    return out


def upstream_zone(apex: str, names: int, serial: int = 1) -> ZoneData:
    """The forwarding benchmark's upstream: `names` fixed names plus a wildcard for cache misses.
    Addresses are from TEST-NET (outside the tailnet ranges, so rebinding protection keeps them)."""
    z = ZoneData(apex)
    z.rrs.append((apex, 3600, "SOA", f"ns.{apex}. hostmaster.{apex}. {serial} 3600 600 86400 60"))
    z.rrs.append((apex, 3600, "NS", f"ns.{apex}."))
    z.rrs.append((f"ns.{apex}", 3600, "A", "192.0.2.53"))
    for i in range(names):
        z.rrs.append((f"n{i}.{apex}", 3600, "A", f"198.51.100.{i % 250 + 1}"))
    z.rrs.append((f"*.rnd.{apex}", 3600, "A", "203.0.113.7"))
    return z


def write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))
