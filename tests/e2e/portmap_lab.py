"""A home network in namespaces: a LAN host behind a router that masquerades onto a WAN, for the
port-mapping and netcheck tests.

    lan  10.61.0.2/24, default via 10.61.0.1
    rtr  10.61.0.1/24 (lan side) and 11.61.0.1/24 (wan side): nftables masquerade
    wan  11.61.0.2/24 and .3/24 (the "internet": two servers for STUN)

The WAN uses 11.61.0.0/24, an address that is neither private nor reserved, because miniupnpd
refuses to map ports on an external interface with a private address; like every address here it
exists only inside these namespaces (the router has no other link), so nothing leaves them.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.netns import Lab, run, unique_name
from tests.support import wait_until

LAN_IP, GW_LAN_IP, GW_WAN_IP, WAN_IP, WAN_IP2 = "10.61.0.2", "10.61.0.1", "11.61.0.1", "11.61.0.2", "11.61.0.3"


@dataclass
class NatLab:
    lab: Lab = field(default_factory=Lab)
    lan: str = ""
    rtr: str = ""
    wan: str = ""
    rtr_lan_if: str = ""
    rtr_wan_if: str = ""

    @classmethod
    def create(cls, masquerade: str = "masquerade", forward_policy: str = "accept") -> NatLab:
        """`masquerade` is the nftables statement: "masquerade" (endpoint independent) or
        "masquerade random" / "masquerade fully-random" (a new port per destination)."""
        self = cls()
        try:
            p = unique_name("nl")
            self.lan, self.rtr, self.wan = f"{p}l", f"{p}r", f"{p}w"
            for ns in (self.lan, self.rtr, self.wan):
                self.lab.add_namespace(ns)
            self.rtr_lan_if, self.rtr_wan_if = "rlan0", "rwan0"
            run("ip", "link", "add", "lan0", "netns", self.lan, "type", "veth", "peer", "name", self.rtr_lan_if,
                "netns", self.rtr)
            run("ip", "link", "add", "wan0", "netns", self.wan, "type", "veth", "peer", "name", self.rtr_wan_if,
                "netns", self.rtr)
            for ns, dev, addrs in ((self.lan, "lan0", [LAN_IP]), (self.rtr, self.rtr_lan_if, [GW_LAN_IP]),
                                   (self.rtr, self.rtr_wan_if, [GW_WAN_IP]), (self.wan, "wan0", [WAN_IP, WAN_IP2])):
                for a in addrs:
                    run("ip", "-n", ns, "addr", "add", f"{a}/24", "dev", dev)
                run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", self.lan, "route", "add", "default", "via", GW_LAN_IP)
            run("ip", "netns", "exec", self.rtr, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            # The chains miniupnpd fills (its defaults: table inet filter, chains miniupnpd,
            # prerouting_miniupnpd, postrouting_miniupnpd); harmless when it is not running.
            ruleset = f"""
table inet filter {{
  chain miniupnpd {{
  }}
  chain prerouting_miniupnpd {{
  }}
  chain postrouting_miniupnpd {{
  }}
  chain forward {{
    type filter hook forward priority 0; policy {forward_policy};
    ct state established,related accept
    jump miniupnpd
    iifname "{self.rtr_lan_if}" accept
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    jump postrouting_miniupnpd
    oifname "{self.rtr_wan_if}" {masquerade}
  }}
}}
"""
            nft = subprocess.run(["ip", "netns", "exec", self.rtr, "nft", "-f", "-"], input=ruleset, text=True,
                                 capture_output=True)
            if nft.returncode:
                raise RuntimeError(f"nft: {nft.stderr}")
        except BaseException:
            self.lab.destroy()
            raise
        return self

    def destroy(self) -> None:
        self.lab.destroy()

    def start_miniupnpd(self, tmp: Path, min_lifetime: int = 120) -> Path:
        """Debian's miniupnpd (nftables backend) on the router, NAT-PMP and PCP for the LAN; its log."""
        conf = tmp / "miniupnpd.conf"
        conf.write_text(f"""ext_ifname={self.rtr_wan_if}
listening_ip={self.rtr_lan_if}
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=yes
min_lifetime={min_lifetime}
max_lifetime=86400
upnp_table_name=filter
upnp_nat_table_name=filter
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
uuid=3f1a8bd4-1c2e-4a8e-9a55-0c7bd2b0a001
allow 1024-65535 10.61.0.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
""")
        log = tmp / "miniupnpd.log"
        proc = self.lab.popen(self.rtr, "miniupnpd", "-d", "-f", str(conf), "-P", str(tmp / "miniupnpd.pid"),
                              log=log)
        wait_until(lambda: proc.poll() is not None or "Listening for NAT-PMP/PCP" in log.read_text(),
                   timeout=10, what="miniupnpd listening")
        if proc.poll() is not None:
            raise RuntimeError(f"miniupnpd exited: {log.read_text()}")
        return log
