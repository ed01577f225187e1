"""The network view: JSON validation with errors naming the field, names, upstream specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magicdns.names import NameError_, absolute_owner, normalize_domain, normalize_host_label
from magicdns.upstream import Upstream, UpstreamError, parse_upstream
from magicdns.view import ViewError, load_view, view_from_json

ROOT = Path(__file__).resolve().parents[2]


def test_sample_view_loads_and_round_trips() -> None:
    view = load_view(ROOT / "conf" / "view.json")
    assert view.domain == "tailnet" and view.self_host and view.self_host.name == "my-laptop"
    assert view_from_json(json.loads(json.dumps(view.to_json()))) == view


@pytest.mark.parametrize("obj, field", [
    ([], "JSON object"),
    ({"domain": "bad domain"}, "domain"),
    ({"peers": {}}, "peers"),
    ({"peers": [{"name": "-bad", "addresses": []}]}, "peers[0].name"),
    ({"peers": [{"name": "ok", "addresses": ["1.2.3"]}]}, "peers[0].addresses[0]"),
    ({"dns": {"nameservers": ["resolver.example"]}}, "dns.nameservers"),
    ({"dns": {"routes": {"corp": "10.0.0.1"}}}, "dns.routes['corp']"),
    ({"dns": {"records": [{"name": "x", "type": "A", "value": "nope"}]}}, "dns.records[0]"),
    ({"version": -1}, "version"),
    ({"version": "7"}, "version"),
])
def test_bad_views_name_the_field(obj: object, field: str) -> None:
    with pytest.raises(ViewError) as err:
        view_from_json(obj)
    assert field in str(err.value)


def test_load_view_reports_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "v.json"
    bad.write_text("{")
    with pytest.raises(ViewError, match="v.json: not valid JSON"):
        load_view(bad)
    with pytest.raises(ViewError, match="missing.json"):
        load_view(tmp_path / "missing.json")


def test_names() -> None:
    assert normalize_domain("Corp.Example.") == "corp.example"
    assert normalize_host_label("My-Laptop") == "my-laptop"
    for bad in ("", "a..b", "-a", "a" * 64 + ".x", ".".join(["abcdefghi"] * 30)):
        with pytest.raises(NameError_):
            normalize_domain(bad)
    with pytest.raises(NameError_):
        normalize_host_label("two.labels")
    assert absolute_owner("web", "tailnet") == "web.tailnet"
    assert absolute_owner("*.dev", "tailnet") == "*.dev.tailnet"


def test_upstreams() -> None:
    assert parse_upstream("1.1.1.1") == Upstream("1.1.1.1", 53)
    assert parse_upstream("127.0.0.1:5301") == Upstream("127.0.0.1", 5301)
    assert parse_upstream("[::1]:5353") == Upstream("::1", 5353)
    assert parse_upstream("::1") == Upstream("::1", 53)
    assert parse_upstream("[::1]:5353").spec == "[::1]:5353"
    for bad in ("dns.google", "1.1.1.1:0", "1.1.1.1:99999", "[::1", "[::1]x", "1.1.1.1:x"):
        with pytest.raises(UpstreamError):
            parse_upstream(bad)
