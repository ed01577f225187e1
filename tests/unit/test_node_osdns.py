"""OS DNS configuration on temp files: backup, restore, marker, crash recovery, overwrite detection."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from meshnode.node.osdns import ResolvConfConfigurator, resolved_commands, resolved_in_use
from meshnode.node.resolvconf import (MARKER, Drift, OsDnsConfig, Recovery, ResolvConf, forwarding_upstreams,
                                      is_ours, parse_resolv_conf, plan_recovery, render_resolv_conf)

ORIGINAL = "# from DHCP\nnameserver 192.0.2.53\nnameserver 2001:db8::53\nsearch corp.example\noptions edns0 ndots:2\n"
CONFIG = OsDnsConfig(("100.100.100.100",), ("tailnet",))


@pytest.fixture
def conf(tmp_path: Path) -> tuple[Path, ResolvConfConfigurator]:
    path = tmp_path / "etc" / "resolv.conf"
    path.parent.mkdir()
    path.write_text(ORIGINAL)
    state = tmp_path / "state"
    state.mkdir()
    return path, ResolvConfConfigurator(path, state / "resolv.pre-meshnode.conf")


def test_parse_takes_nameservers_last_search_and_options() -> None:
    rc = parse_resolv_conf("nameserver 1.1.1.1\nnameserver bogus\nnameserver fe80::1%eth0\n"
                           "domain a.example\nsearch b.example c.example # trailing\noptions rotate\n")
    assert rc == ResolvConf(("1.1.1.1", "fe80::1"), ("b.example", "c.example"), ("rotate",))


def test_render_is_marked_and_keeps_original_search_and_options() -> None:
    text = render_resolv_conf(CONFIG, parse_resolv_conf(ORIGINAL), "/state/backup")
    assert is_ours(text) and text.startswith(MARKER)
    rc = parse_resolv_conf(text)
    assert rc.nameservers == ("100.100.100.100",)
    assert rc.search == ("tailnet", "corp.example")
    assert rc.options == ("edns0", "ndots:2")
    assert "/state/backup" in text
    assert not is_ours(ORIGINAL) and not is_ours(None)


def test_forwarding_never_includes_ourselves() -> None:
    rc = ResolvConf(("100.100.100.100", "192.0.2.1"))
    assert forwarding_upstreams(rc, frozenset({"100.100.100.100"})) == ("192.0.2.1",)


@pytest.mark.parametrize("current,backup,plan", [
    (None, False, Recovery.NOTHING),
    (None, True, Recovery.RESTORE),
    (ORIGINAL, False, Recovery.NOTHING),
    (ORIGINAL, True, Recovery.DROP_STALE_BACKUP),
    (MARKER + "\nnameserver 100.100.100.100\n", True, Recovery.RESTORE),
    (MARKER + "\nnameserver 100.100.100.100\n", False, Recovery.ORPHANED),
])
def test_plan_recovery(current: str | None, backup: bool, plan: Recovery) -> None:
    assert plan_recovery(current, backup) is plan


def test_apply_backs_up_then_restore_puts_original_back(conf) -> None:
    path, c = conf
    c.apply(CONFIG)
    assert is_ours(path.read_text())
    assert c.backup.read_text() == ORIGINAL
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # every user's resolver must read it
    assert c.original().nameservers == ("192.0.2.53", "2001:db8::53")
    # Re-applying (e.g. a new search domain) must not back up our own file over the original.
    c.apply(OsDnsConfig(("100.100.100.100",), ("tailnet", "other")))
    assert c.backup.read_text() == ORIGINAL
    c.restore()
    assert path.read_text() == ORIGINAL
    assert not c.backup.exists()
    assert c.status().active is False


def test_crash_recovery_at_next_start(conf) -> None:
    path, c = conf
    c.apply(CONFIG)
    # The daemon dies (kill -9): a new configurator knows nothing but what is on disk.
    fresh = ResolvConfConfigurator(path, c.backup)
    fresh.recover()
    assert path.read_text() == ORIGINAL
    assert not c.backup.exists()


def test_recover_is_a_noop_on_a_clean_system(conf) -> None:
    path, c = conf
    c.recover()
    assert path.read_text() == ORIGINAL


def test_overwrite_is_detected_reported_and_theirs_kept_on_restore(conf) -> None:
    path, c = conf
    c.apply(CONFIG)
    assert c.check() is Drift.INTACT
    path.write_text("nameserver 198.51.100.1\n")  # e.g. a DHCP client
    assert c.check() is Drift.OVERWRITTEN
    st = c.status()
    assert st.drift == "overwritten" and st.drift_since is not None
    c.restore()
    # The other program's file is newer than our backup: keep it.
    assert path.read_text() == "nameserver 198.51.100.1\n"
    assert not c.backup.exists()


def test_rewrite_with_same_content_is_not_an_overwrite(conf) -> None:
    path, c = conf
    c.apply(CONFIG)
    text = path.read_text()
    path.unlink()
    path.write_text(text)
    assert c.check() is Drift.INTACT


def test_removal_is_detected_and_restore_brings_the_original_back(conf) -> None:
    path, c = conf
    c.apply(CONFIG)
    path.unlink()
    assert c.check() is Drift.REMOVED
    c.restore()
    assert path.read_text() == ORIGINAL


def test_stale_backup_dropped_when_someone_replaced_our_file_while_down(conf) -> None:
    path, c = conf
    c.apply(CONFIG)
    path.write_text("nameserver 198.51.100.7\n")
    fresh = ResolvConfConfigurator(path, c.backup)
    fresh.recover()
    assert path.read_text() == "nameserver 198.51.100.7\n"
    assert not c.backup.exists()


def test_orphaned_file_gets_a_placeholder(conf) -> None:
    path, c = conf
    c.apply(CONFIG)
    c.backup.unlink()
    ResolvConfConfigurator(path, c.backup).recover()
    text = path.read_text()
    assert not is_ours(text)
    assert "100.100.100.100" not in text


def test_symlinked_resolv_conf_is_restored_as_a_link(tmp_path: Path) -> None:
    real = tmp_path / "run-resolv.conf"
    real.write_text(ORIGINAL)
    link = tmp_path / "resolv.conf"
    link.symlink_to(real)
    c = ResolvConfConfigurator(link, tmp_path / "backup.conf")
    c.apply(CONFIG)
    assert not link.is_symlink() and is_ours(link.read_text())
    assert real.read_text() == ORIGINAL  # the link's target is never written
    c.restore()
    assert link.is_symlink() and os.readlink(link) == str(real)


def test_missing_resolv_conf_is_removed_again(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    c = ResolvConfConfigurator(path, tmp_path / "backup.conf")
    c.apply(CONFIG)
    assert is_ours(path.read_text())
    assert c.original().nameservers == ()
    c.restore()
    assert not path.exists()


def test_resolved_commands_route_only_the_tailnet() -> None:
    cmds = resolved_commands("meshnode0", CONFIG)
    assert ["resolvectl", "dns", "meshnode0", "100.100.100.100"] in cmds
    assert ["resolvectl", "domain", "meshnode0", "~tailnet", "tailnet"] in cmds
    assert not any("~." in c for cmd in cmds for c in cmd)


def test_resolved_detection(tmp_path: Path) -> None:
    run = tmp_path / "resolve"
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\n")
    assert not resolved_in_use(conf, run)  # resolved's run directory absent: not in use
    run.mkdir()
    conf.write_text("nameserver 192.0.2.1\n")
    assert not resolved_in_use(conf, run)


# -- properties ------------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

label = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
domain = st.builds(lambda ls: ".".join(ls), st.lists(label, min_size=1, max_size=3))
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
resolv_text = st.lists(st.one_of(
    st.builds(lambda a: f"nameserver {a}", st.one_of(ipv4, ipv6)),
    st.builds(lambda ds: "search " + " ".join(ds), st.lists(domain, min_size=1, max_size=4)),
    st.builds(lambda o: f"options {o}", st.sampled_from(["edns0", "rotate", "ndots:3", "timeout:1"])),
    st.text(max_size=40).filter(lambda t: "\n" not in t and "\r" not in t),
), max_size=12).map("\n".join)


@given(resolv_text)
def test_parser_never_fails_and_never_invents_nameservers(text: str) -> None:
    rc = parse_resolv_conf(text)
    # Every address must come from a nameserver line (comment and zone suffixes aside).
    words = [line.replace("#", " ").replace(";", " ").replace("%", " ").split() for line in text.splitlines()]
    declared = {str(ipaddress.ip_address(w[1])) for w in words if len(w) >= 2 and w[0] == "nameserver"
                and _is_ip(w[1])}
    assert set(rc.nameservers) <= declared


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


@settings(max_examples=200)
@given(resolv_text, st.lists(st.one_of(ipv4, ipv6), min_size=1, max_size=3, unique=True),
       st.lists(domain, min_size=1, max_size=3, unique=True))
def test_render_then_parse_gives_our_config_first(original: str, nameservers: list[str],
                                                  search: list[str]) -> None:
    orig = parse_resolv_conf(original)
    text = render_resolv_conf(OsDnsConfig(tuple(nameservers), tuple(search)), orig, "/b")
    assert is_ours(text) and not is_ours(original)
    rc = parse_resolv_conf(text)
    assert rc.nameservers == tuple(str(ipaddress.ip_address(n)) for n in nameservers)
    assert rc.search[:len(search)] == tuple(search)
    assert set(rc.search) == set(search) | set(orig.search)
    assert rc.options == orig.options


@settings(max_examples=50, deadline=None)
@given(resolv_text)
def test_apply_restore_round_trips_any_original(tmp_path_factory, original: str) -> None:
    d = tmp_path_factory.mktemp("rc")
    path = d / "resolv.conf"
    path.write_text(original)
    c = ResolvConfConfigurator(path, d / "backup")
    c.apply(CONFIG)
    ResolvConfConfigurator(path, d / "backup").recover()  # as after a crash
    assert path.read_text() == original


def test_resolved_configurator_sets_and_reverts_the_link(tmp_path: Path) -> None:
    from meshnode.node.osdns import ResolvedConfigurator
    calls: list[list[str]] = []
    run = tmp_path / "resolve"
    run.mkdir()
    (run / "resolv.conf").write_text("nameserver 192.0.2.1\nnameserver 192.0.2.2\n")
    c = ResolvedConfigurator("meshnode0", run, runner=lambda cmd: calls.append(list(cmd)))
    c.restore()
    assert calls == []  # nothing to revert before apply
    c.apply(CONFIG)
    assert calls == resolved_commands("meshnode0", CONFIG)
    assert c.original().nameservers == ("192.0.2.1", "192.0.2.2")  # the uplink's, not the 127.0.0.53 stub
    assert c.status().active and c.status().mode == "systemd-resolved"
    calls.clear()
    c.restore()
    assert calls == [["resolvectl", "revert", "meshnode0"]]
    assert not c.status().active
