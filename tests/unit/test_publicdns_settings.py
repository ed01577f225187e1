"""The public-DNS upgrade as a tailnet setting: `meshnode control dns upgrade-public-dns on` ->
control store -> network map JSON -> the node's view -> the resolver's routes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from magicdns.server import DnsServer, ServerConfig
from magicdns.upstream import Upstream
from magicdns.view import view_from_json
from meshnode.control.mapbuilder import dns_json
from meshnode.control.store import ControlStore
from meshnode.netmap import DnsConfig, MapNode, NetMap, netmap_to_view

MESHNODE = [sys.executable, "-c", "from meshnode.cli import main; main()"]


def _self_node() -> MapNode:
    return MapNode(id=1, name="a", fqdn="a.tailnet", user="u", addresses=("100.64.0.1",), node_key="A" * 43 + "=")


def _node_view(store: ControlStore):  # noqa: ANN202
    wire = json.loads(json.dumps(dns_json(store.dns_settings(), ())))  # as it travels
    nm = NetMap(1, "tailnet", _self_node(), dns=DnsConfig.from_json(wire, "tailnet"))
    return netmap_to_view(NetMap.from_json(nm.to_json()))


def test_the_setting_travels_from_the_store_to_the_nodes_view(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "c.db")
    store.set_nameservers(["8.8.8.8", "192.0.2.1"])
    assert "upgrade_public_dns" not in dns_json(store.dns_settings(), ())  # off: maps unchanged
    assert _node_view(store).dns.upgrade_public_dns is False
    store.set_upgrade_public_dns(True)
    assert store.dns_settings().upgrade_public_dns is True
    view = _node_view(store)
    assert view.dns.upgrade_public_dns is True
    assert view.dns.nameservers == (Upstream("8.8.8.8"), Upstream("192.0.2.1"))  # upgraded by the resolver
    store.set_upgrade_public_dns(False)
    assert _node_view(store).dns.upgrade_public_dns is False


def test_the_resolver_upgrades_when_the_view_says_so() -> None:
    base = {"domain": "tailnet", "self": {"name": "a", "addresses": ["100.64.0.1"]}, "peers": [], "version": 1,
            "dns": {"nameservers": ["9.9.9.9", "192.0.2.1"], "routes": {"corp.example": ["1.1.1.1"]}}}

    def routes(view_obj: dict, **config: object) -> dict:
        server = DnsServer(ServerConfig(**config))  # type: ignore[arg-type]
        server.set_view(view_from_json(view_obj))
        return server.status()["routes"]

    plain = routes(base)
    assert plain["."] == ["9.9.9.9", "192.0.2.1"] and plain["corp.example"] == ["1.1.1.1"]
    on = dict(base, dns=dict(base["dns"], upgrade_public_dns=True))
    assert view_from_json(on).to_json()["dns"]["upgrade_public_dns"] is True  # round-trips
    up = routes(on)
    assert up["."][0].startswith("https://dns.quad9.net@9.9.9.9/dns-query (upgraded") and up["."][1] == "192.0.2.1"
    assert up["corp.example"][0].startswith("https://cloudflare-dns.com@1.1.1.1/dns-query")
    assert routes(base, upgrade_public_dns=True)["."][0].startswith("https://dns.quad9.net@9.9.9.9")


def test_a_bad_value_in_a_view_is_a_clear_error() -> None:
    import pytest

    from magicdns.view import ViewError
    with pytest.raises(ViewError, match="upgrade_public_dns"):
        view_from_json({"domain": "tailnet", "dns": {"upgrade_public_dns": "yes"}})


def test_control_cli_turns_it_on_and_off(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    ControlStore(db)  # the tailnet exists before the operator changes a setting

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MESHNODE, "control", "dns", *args, "--db", str(db)], capture_output=True,
                              text=True, timeout=60)
    assert ctl("upgrade-public-dns", "on").returncode == 0
    shown = ctl("show", "--json")
    assert json.loads(shown.stdout)["upgrade_public_dns"] is True, shown.stderr
    assert "upgraded to DoH" in ctl("show").stdout
    assert ctl("upgrade-public-dns", "off").returncode == 0
    assert json.loads(ctl("show", "--json").stdout)["upgrade_public_dns"] is False
    bad = ctl("upgrade-public-dns", "maybe")
    assert bad.returncode == 2 and "maybe" in bad.stderr
