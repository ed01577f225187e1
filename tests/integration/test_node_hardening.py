"""Node hardening with real `meshnode daemon` processes and a real control server on loopback: auth
keys never on a command line (file:, stdin, environment) and never logged; damaged state refused
clearly (a damaged server pin, a lost machine key) or moved aside and reported (map, prefs)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.test_node_cluster import MESHNODE, Cluster, addresses_of
from tests.support import wait_until


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, ("alpha",))
    try:
        yield c
    finally:
        c.close()


def cli(node, *args: str, env: dict[str, str] | None = None, stdin: str | None = None  # noqa: ANN001
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHNODE, "--socket", str(node.sock), *args], capture_output=True, text=True,
                          timeout=60, input=stdin, env={**os.environ, **(env or {})})


def health(node) -> list[str]:  # noqa: ANN001
    return node.api().request("GET", "/status")["health"]


def test_auth_key_from_a_file_stdin_or_the_environment_and_never_logged(cluster: Cluster,
                                                                        tmp_path: Path) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    key = cluster.authkey()
    secret = key.rsplit("-", 1)[-1]
    keyfile = tmp_path / "authkey"
    keyfile.write_text(key + "\n")
    url = cluster.control.url
    r = cli(alpha, "up", "--login-server", url, "--authkey", f"file:{keyfile}")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    ip = addresses_of(alpha)
    for args, env, stdin in ((["--authkey", "-"], None, key + "\n"), ([], {"MESHNODE_AUTHKEY": key}, None)):
        assert cli(alpha, "logout").returncode == 0
        r = cli(alpha, "up", "--login-server", url, *args, env=env, stdin=stdin)
        assert r.returncode == 0, (args, r.stderr)
        assert "warning" not in r.stderr and addresses_of(alpha) == ip
    # Inline still works, with a warning that says why not.
    assert cli(alpha, "logout").returncode == 0
    r = cli(alpha, "up", "--login-server", url, "--authkey", key)
    assert r.returncode == 0 and "warning" in r.stderr and "/proc" in r.stderr
    # Bad sources are clear usage errors.
    r = cli(alpha, "up", "--authkey", f"file:{tmp_path / 'nope'}")
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = cli(alpha, "up", "--authkey", "-", stdin="")
    assert r.returncode == 2 and "standard input" in r.stderr
    # The daemon logs at debug level; the secret appears nowhere.
    assert secret not in alpha.log.read_text()
    for f in alpha.state.iterdir():
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_a_damaged_server_pin_is_refused_never_re_pinned(cluster: Cluster, tmp_path: Path) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    key = cluster.authkey()
    alpha.up(cluster.control, key)
    ip = addresses_of(alpha)
    alpha.stop()
    pin = alpha.state / "control.json"
    for damage in ('{"login_server": "' + cluster.control.url + '", "server_public_key": "bm90IGEga2V5"}',
                   '{"login_server": ', "\x00\xff"):
        pin.write_text(damage, encoding="latin-1")
        alpha.start()
        wait_until(lambda: any("control.json" in h and "--force-reauth" in h for h in health(alpha)),
                   timeout=10, what="the damaged pin in health")
        r = cli(alpha, "up")
        assert r.returncode == 1 and "--force-reauth" in r.stderr and "control.json" in r.stderr
        assert pin.read_text(encoding="latin-1") == damage        # left for inspection, never re-pinned
        alpha.stop()
    alpha.start()
    keyfile = tmp_path / "k"
    keyfile.write_text(key)
    r = cli(alpha, "up", "--force-reauth", "--authkey", f"file:{keyfile}")
    assert r.returncode == 0, r.stderr
    assert addresses_of(alpha) == ip
    assert json.loads(pin.read_text())["server_public_key"] == cluster.control.server.public_key
    assert not any("control.json" in h for h in health(alpha))


def test_a_lost_machine_key_with_a_saved_map_is_refused_not_a_new_machine(cluster: Cluster,
                                                                          tmp_path: Path) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    key = cluster.authkey()
    alpha.up(cluster.control, key)
    wait_until(lambda: (alpha.state / "netmap.json").exists(), timeout=5, what="the saved map")
    alpha.stop()
    (alpha.state / "machine.key").unlink()
    alpha.start()
    st = alpha.api().request("GET", "/status")
    assert st["backend_state"] == "NeedsLogin"
    assert any("machine.key is missing" in h and "--force-reauth" in h for h in st["health"])
    r = cli(alpha, "up", "--authkey", "-", stdin=key)
    assert r.returncode == 1 and "--force-reauth" in r.stderr
    assert not (alpha.state / "machine.key").exists()                     # not silently recreated
    assert len(cluster.admin.list_nodes()) == 1
    r = cli(alpha, "up", "--force-reauth", "--authkey", "-", stdin=key)
    assert r.returncode == 0, r.stderr
    assert (alpha.state / "machine.key").exists() and len(cluster.admin.list_nodes()) == 2


def test_a_deeply_nested_map_and_damaged_prefs_are_moved_aside_and_reported(cluster: Cluster) -> None:
    alpha = cluster.nodes[0]
    alpha.start()
    alpha.up(cluster.control, cluster.authkey())
    alpha.stop()
    (alpha.state / "netmap.json").write_text('{"format": 1, "netmap": ' + "[" * 200_000 + "]" * 200_000 + "}")
    (alpha.state / "prefs.json").write_text('{"login_server": 5}')
    alpha.start()
    assert list(alpha.state.glob("netmap.json.corrupt-*")) and list(alpha.state.glob("prefs.json.corrupt-*"))
    h = health(alpha)
    assert any("netmap.json was damaged" in x and "nested" in x for x in h), h
    assert any("prefs.json was damaged" in x and "login_server" in x for x in h), h


def test_status_and_whois_show_a_hostile_peers_strings_escaped(cluster: Cluster) -> None:
    from meshnode.control.protocol import generate_private_key, public_key_of
    from meshnode.control.store import Grant, Registration
    alpha = cluster.nodes[0]
    alpha.start()
    alpha.up(cluster.control, cluster.authkey())
    evil_key, _ = cluster.admin.create_authkey("mallory\x1b[8m")
    peer = cluster.admin.register(
        Registration(public_key_of(generate_private_key()), public_key_of(generate_private_key()), "evil",
                     "linux\x1b[2J\x1b]52;c;ZXZpbA==\x07\u202e", evil_key),
        lambda user, tags, reg, existing: Grant((), (), False))
    wait_until(lambda: "evil" in cli(alpha, "status").stdout, timeout=5, what="the peer in status")
    for args in (("status",), ("whois", peer.addresses[0])):
        r = cli(alpha, *args)
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\u202e" not in r.stdout, args
        assert "\\x1b[2J" in r.stdout, (args, r.stdout)
