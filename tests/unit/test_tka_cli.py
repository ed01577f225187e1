"""`meshnode lock` working offline on a node's state directory."""

from __future__ import annotations

import base64
import json
import re

import pytest
from click.testing import CliRunner
from nacl.public import PrivateKey

from meshnode.cli import main
from meshnode.tka import Authority, FileStore
from meshnode.tka.nodesig import sign_by_credential, unwrap_authkey
from meshnode.tka.statedir import LockDir

from .tka_helpers import node_key


def run(state_dir, *args, code=0):
    r = CliRunner().invoke(main, ["lock", "--state-dir", str(state_dir), *args])
    assert r.exit_code == code, (r.output, r.exception)
    return r.output


def status(state_dir) -> dict:
    return json.loads(run(state_dir, "status", "--json"))


@pytest.fixture()
def nodes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    own = PrivateKey(bytes([3]) * 32)
    a.mkdir()
    (a / "node.key").write_text("privkey:" + bytes(own).hex() + "\n")
    return a, b, bytes(own.public_key)


def ka_of(state_dir) -> str:
    return status(state_dir)["node_lock_key"]


def _init(a, b, *extra):
    ka, kb = status(a)["node_lock_key"], status(b)["node_lock_key"]
    out = run(a, "init", "--gen-disablements", "2", ka, kb + "?2", *extra)
    secrets = re.findall(r"disablement-secret:([0-9A-F]{64})", out)
    # Node b receives the chain (what sync with the control server will do).
    genesis = LockDir(a).authority()[0].oldest_ancestor
    Authority.bootstrap(FileStore(b / "tka"), genesis)
    return ka, kb, secrets


def test_status_before_init(nodes) -> None:
    a, _, _ = nodes
    doc = status(a)
    assert doc["enabled"] is False and doc["node_lock_key"].startswith("tlpub:")
    assert status(a)["node_lock_key"] == doc["node_lock_key"]  # the key is kept, not regenerated
    assert "NOT enabled" in run(a)


def test_init_requires_own_key_and_prints_secrets(nodes) -> None:
    a, b, own = nodes
    kb = status(b)["node_lock_key"]
    assert "must be one of the trusted keys" in run(a, "init", kb, code=2)
    assert "parsing key 1" in run(a, "add", "tlpub:00", code=2)
    assert "Tailnet Lock is not enabled" in run(a, "add", ka_of(a), code=1)
    ka, kb, secrets = _init(a, b)
    assert len(secrets) == 2
    doc = status(a)
    assert doc["enabled"] and {k["key"] for k in doc["trusted_keys"]} == {ka, kb}
    assert [k["votes"] for k in doc["trusted_keys"]] == [1, 2]
    assert doc["node_key_signed"] is True  # init signed this node's own node key
    assert "already enabled" in run(a, "init", ka, code=1)
    assert status(b)["head"] == doc["head"]
    genesis = base64.b64decode(json.loads((a / "tka" / "outbox.json").read_text())["init_genesis"])
    assert LockDir(a).authority()[0].oldest_ancestor.serialized == genesis


def test_sign_node_keys_and_status_of_peers(nodes) -> None:
    a, b, _ = nodes
    _init(a, b)
    nk = base64.b64encode(node_key(1)).decode()
    sig = run(b, "sign", nk).strip()
    auth = LockDir(b).authority()[0]
    auth.node_key_authorized(node_key(1), base64.b64decode(sig))
    (b / "netmap.json").write_text(json.dumps({"format": 1, "netmap": {"peers": [
        {"name": "signed", "node_key": nk},
        {"name": "intruder", "node_key": base64.b64encode(node_key(2)).decode()}]}}))
    peers = {p["name"]: p["signed"] for p in status(b)["peers"]}
    assert peers == {"signed": True, "intruder": False}
    assert "intruder" in run(b, "status")
    assert "nodekey:" not in sig and run(b, "sign", "nodekey:" + node_key(1).hex()).strip() == sig
    assert "neither nodekey:HEX nor base64" in run(b, "sign", "garbage", code=2)


def test_add_remove_log(nodes, tmp_path) -> None:
    a, b, _ = nodes
    ka, kb, _ = _init(a, b)
    kc = status(tmp_path / "c")["node_lock_key"]
    assert "add-key" in run(a, "add", kc)
    assert "remove-key" in run(a, "remove", kb)
    keys = {k["key"] for k in status(a)["trusted_keys"]}
    assert keys == {ka, kc}
    log = json.loads(run(a, "log", "--json"))
    assert [e["change"] for e in log] == ["remove-key", "add-key", "checkpoint"]
    assert "update " in run(a, "log")
    run(a, "remove", kc)
    assert "last trusted signing key" in run(a, "remove", ka, code=1)
    assert "parsing key 1" in run(a, "add", "tlpub:zz", code=2)


def test_untrusted_node_cannot_sign(nodes, tmp_path) -> None:
    a, b, _ = nodes
    _init(a, b)
    c = tmp_path / "c"
    Authority.bootstrap(FileStore(c / "tka"), LockDir(a).authority()[0].oldest_ancestor)
    out = run(c, "sign", base64.b64encode(node_key(1)).decode(), code=1)
    assert "not trusted" in out


def test_presigned_authkey(nodes) -> None:
    a, b, _ = nodes
    _init(a, b)
    wrapped_text = run(a, "sign", "mskey-abc123-" + "f" * 64).strip()
    wrapped = unwrap_authkey(wrapped_text)
    assert wrapped.authkey == "mskey-abc123-" + "f" * 64
    auth = LockDir(a).authority()[0]
    meta = [dict(k.meta or {}) for k in auth.keys if k.meta]
    assert meta and meta[0]["purpose"] == "pre-auth key" and meta[0]["authkey_stableid"] == "abc123"
    sig = sign_by_credential(wrapped, node_key(5)).serialize()
    auth.node_key_authorized(node_key(5), sig)


def test_disable_and_local_disable(nodes) -> None:
    a, b, _ = nodes
    _, _, secrets = _init(a, b)
    assert "invalid disablement secret" in run(a, "disable", "disablement-secret:" + "00" * 32, code=1)
    assert "disablement-secret" in run(a, "disable", "nope", code=2)
    run(b, "local-disable")
    assert status(b)["locally_disabled"] is True and status(b)["enabled"] is True
    run(a, "disable", "disablement-secret:" + secrets[1])
    assert status(a)["enabled"] is False
    assert json.loads((a / "tka" / "outbox.json").read_text())["disablement_secret"] == secrets[1].lower()
    assert "not enabled" in run(a, "log", code=1)


def test_damaged_lock_key_is_not_replaced(nodes) -> None:
    a, _, _ = nodes
    status(a)
    (a / "tka" / "lock.key").write_text("nlpriv:1234\n")
    assert "move it away" in run(a, "status", code=1)
    assert (a / "tka" / "lock.key").read_text() == "nlpriv:1234\n"


def test_disablement_kdf_command(nodes) -> None:
    a, _, _ = nodes
    out = run(a, "disablement-kdf", "010203")
    assert re.fullmatch(r"disablement:[0-9a-f]{64}\n", out)


def test_commands_run_for_the_daemon_check_their_parameters(tmp_path) -> None:
    """What `POST /localapi/v0/lock` runs (node/lockcli.run_in_daemon): values from the socket are
    converted and checked as on the command line; errors are messages, never exceptions."""
    from meshnode.node.lockcli import run_in_daemon
    from meshnode.tka.cli_format import format_public
    from meshnode.tka.statedir import LockDir

    me = format_public(LockDir(tmp_path).lock_key().public)
    assert "not a valid integer" in run_in_daemon(tmp_path, "init", {"n": "abc", "args": [me]}, {})[1]
    assert "1<=x<=32" in run_in_daemon(tmp_path, "init", {"n": 99, "args": [me]}, {})[1]
    assert "unknown lock command" in run_in_daemon(tmp_path, "frob", {}, {})[1]
    assert "unknown parameters" in run_in_daemon(tmp_path, "status", {"evil": 1}, {})[1]
    assert "not enabled" in run_in_daemon(tmp_path, "sign", {"target": "nodekey:" + "00" * 32}, {})[1]
    out, err = run_in_daemon(tmp_path, "init", {"n": 1, "args": [me]}, {})
    assert err is None and "disablement-secret:" in out
    out, err = run_in_daemon(tmp_path, "status", {"as_json": True}, {"peers": [], "last_refusal": "X: y"})
    assert err is None and json.loads(out)["enabled"] and json.loads(out)["last_refusal"] == "X: y"
