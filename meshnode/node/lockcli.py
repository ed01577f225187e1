"""`meshnode lock`: Tailnet Lock from the command line, with Tailscale's verbs and formats.

The commands act on the node's lock files under `<state-dir>/tka/` (meshnode/tka/statedir.py): the
chain, this node's lock key, signatures waiting to be sent (the outbox). When a daemon answers on the
LocalAPI socket (and no `--state-dir` is given), each command is sent to it and it runs the same code
on its own state directory (meshnode/node/lock.py): the daemon stays the only writer of its files, and
it hands what the command queued to the control server at once. Otherwise the command works on the
files directly, and the daemon sends the outbox when it next runs.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from ..tka import AUMKind, Authority, State, TKAError, disablement_kdf
from ..tka.aum import AUM, kind_label
from ..tka.cli_format import (format_node_key, format_public, format_secret, parse_disablement, parse_key_arg,
                              parse_node_key, parse_public)
from ..tka.enforce import decode_signature_blob
from ..tka.errors import NodeKeyNotAuthorized
from ..tka.nodelock import NodeLock
from ..tka.nodesig import sign_credential, sign_direct, wrap_authkey
from ..tka.signing import LockPrivateKey
from ..tka.statedir import LockDir

AUTHKEY_PREFIXES = ("mskey-", "tskey-auth-")


def _echo(text: Any = "", **kw: Any) -> None:
    """click.echo, or into the daemon's buffer when the daemon runs this command for the LocalAPI."""
    ctx = click.get_current_context(silent=True)
    out = ctx.find_root().obj.get("out") if ctx is not None and isinstance(ctx.find_root().obj, dict) else None
    if out is not None:
        out.write(f"{text}\n")
    else:
        click.echo(text, **kw)


def _via_daemon(ctx: click.Context, params: dict[str, Any]) -> bool:
    """Send this command to a running daemon (True), unless we are the daemon, or `--state-dir` was
    given (the files are used directly), or no daemon answers."""
    root = ctx.find_root().obj
    if not isinstance(root, dict) or root.get("in_daemon") or root.get("lock_explicit_dir"):
        return False
    from .cli import DEFAULT_SOCKET
    from .localclient import DaemonNotRunning, LocalApiRefused, LocalClient

    client = LocalClient(root.get("socket") or DEFAULT_SOCKET, timeout=120.0)
    try:
        ans = client.request("POST", "/lock", {"command": ctx.command.name,
                                               "params": {k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in params.items()}})
    except DaemonNotRunning:
        return False
    except LocalApiRefused as exc:
        raise click.ClickException(exc.args[0] if exc.args else str(exc)) from None
    out = ans.get("output") or ""
    if out:
        click.echo(out, nl=False)
    if ans.get("error"):
        raise click.ClickException(ans["error"])
    return True


def run_in_daemon(state_dir: Path, command: str, params: dict[str, Any], extra: dict[str, Any]) -> tuple[str, str | None]:
    """What the daemon calls (in a worker thread) for `POST /localapi/v0/lock`: run `lock COMMAND`
    with `params` on `state_dir`; (output, error message or None)."""
    import io

    cmd = lock.commands.get(command)
    if cmd is None or command == "disablement-kdf":
        return "", f"unknown lock command {command!r}"
    names = {p.name for p in cmd.params}
    bad = set(params) - names
    if bad:
        return "", f"unknown parameters {sorted(bad)} for lock {command}"
    buf = io.StringIO()
    obj = dict(extra, lock_state_dir=state_dir, out=buf, in_daemon=True)
    try:
        with click.Context(lock, obj=obj, info_name="lock") as root:
            # Values from the socket are checked and converted as click does for the command line.
            kwargs = {p.name: p.type_cast_value(root, params[p.name]) for p in cmd.params
                      if p.name in params and params[p.name] is not None}
            root.invoke(cmd, **kwargs)
    except click.ClickException as exc:
        return buf.getvalue(), exc.format_message()
    except click.exceptions.Exit:
        pass
    return buf.getvalue(), None


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def _run(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn Tailnet Lock errors into a one-line message and exit code 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        if args and isinstance(args[0], click.Context) and _via_daemon(args[0], kwargs):
            return
        try:
            fn(*args, **kwargs)
        except TKAError as exc:
            raise _fail(exc) from None
        except OSError as exc:
            raise _fail(exc) from None

    return wrapper


def _dir(ctx: click.Context) -> LockDir:
    return LockDir(ctx.obj["lock_state_dir"])


def _enabled(lock: LockDir) -> tuple[Authority, Any]:
    authority, store = lock.authority()
    if authority is None:
        raise click.ClickException("Tailnet Lock is not enabled")
    return authority, store


def _require_trusted(authority: Authority, me: LockPrivateKey) -> None:
    if not authority.key_trusted(me.public):
        raise click.ClickException(
            "this node's lock key is not trusted: run this on a signing node "
            f"(this node's key is {format_public(me.public)})")


@click.group("lock", invoke_without_command=True)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/var/lib/meshnode"),
              show_default=True, envvar="MESHNODE_STATE_DIR", help="The node's state directory.")
@click.pass_context
def lock(ctx: click.Context, state_dir: Path) -> None:
    """Manage Tailnet Lock: which keys may sign nodes, and signing them."""
    ctx.ensure_object(dict)
    if not ctx.obj.get("in_daemon"):
        ctx.obj["lock_state_dir"] = state_dir
        ctx.obj["lock_explicit_dir"] = ctx.get_parameter_source("state_dir") is click.core.ParameterSource.COMMANDLINE
    if ctx.invoked_subcommand is None:
        ctx.invoke(status)


@lock.command("init")
@click.option("--gen-disablements", "n", type=click.IntRange(1, 32), default=1, show_default=True,
              help="Number of disablement secrets to generate.")
@click.argument("args", nargs=-1, required=True)
@click.pass_context
@_run
def init(ctx: click.Context, n: int, args: tuple[str, ...]) -> None:
    """Enable Tailnet Lock, trusting KEY... (tlpub:HEX[?VOTES]); `disablement:HEX` and
    `disablement-secret:HEX` arguments add disablement values you already hold."""
    lock_dir = _dir(ctx)
    if lock_dir.authority()[0] is not None:
        raise click.ClickException("Tailnet Lock is already enabled")
    keys, values = [], []
    for i, a in enumerate(args, 1):
        try:
            if a.startswith("disablement"):
                d = parse_disablement(a)
                values.append(disablement_kdf(d.raw) if d.is_secret else d.raw)
            else:
                keys.append(parse_key_arg(a))
        except TKAError as exc:
            raise click.BadParameter(f"argument {i}: {exc}") from None
    me = lock_dir.lock_key()
    if not any(k.key_id == me.public for k in keys):
        raise click.UsageError("the tailnet lock key of the current node must be one of the trusted keys "
                               f"during initialization (it is {format_public(me.public)})")
    secrets = [os.urandom(32) for _ in range(n)]
    values += [disablement_kdf(s) for s in secrets]
    ids = os.urandom(16)
    state = State(disablement_values=tuple(values), keys=tuple(keys),
                  state_id1=int.from_bytes(ids[:8], "big"), state_id2=int.from_bytes(ids[8:], "big"))
    authority, genesis = Authority.create(lock_dir.store(), state, me)
    lock_dir.clear_local_disabled()
    box = lock_dir.outbox()
    box.init_genesis = base64.b64encode(genesis.serialized).decode()
    box.disablement_secret = None
    lock_dir.save_outbox(box)
    own = lock_dir.own_node_key()
    if own is not None:
        _queue_signature(lock_dir, own, sign_direct(me, own, me.public).serialize())
    # As Tailscale's does: sign the nodes the trusted keys belong to (peers report their lock key to
    # the control server and the map carries it), not only this one.
    trusted = {format_public(k.key_id) for k in keys}
    signed = []
    for p in ctx.obj.get("peers") or _peers_from_saved_map(lock_dir):
        if str(p.get("lock_key") or "") not in trusted:
            continue
        try:
            nk = base64.b64decode(str(p.get("node_key") or ""), validate=True)
        except ValueError:
            continue
        if len(nk) == 32 and nk != own:
            # The node's own lock key is its rotation key (Tailscale's TKASignInfo.RotationPubkey):
            # it can then re-sign a new node key of its own (`up --force-reauth`) without us.
            _queue_signature(lock_dir, nk, sign_direct(me, nk, parse_public(str(p["lock_key"]))).serialize())
            signed.append(str(p.get("name") or format_node_key(nk)))
    _echo("You have initialized tailnet lock with the following trusted signing keys:")
    for k in keys:
        _echo(f" - {format_public(k.key_id)} (25519 key, {k.votes} vote{'s' if k.votes != 1 else ''})")
    _echo(f"\n{n} disablement secrets have been generated and are printed below. "
               "Take note of them now, they WILL NOT be shown again.")
    for s in secrets:
        _echo(f"\t{format_secret(s)}")
    if signed:
        _echo(f"Signed the node keys of: {', '.join(sorted(signed))}")
    _echo("Initialization complete.")


def _queue_signature(lock_dir: LockDir, node_key: bytes, sig: bytes) -> None:
    box = lock_dir.outbox()
    box.signatures[format_node_key(node_key)] = base64.b64encode(sig).decode()
    lock_dir.save_outbox(box)


def _peers_from_saved_map(lock_dir: LockDir) -> list[dict[str, Any]]:
    f = lock_dir.path.parent / "netmap.json"
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError):
        return []
    nm = doc.get("netmap", doc) if isinstance(doc, dict) else {}
    peers = nm.get("peers", []) if isinstance(nm, dict) else []
    return [p for p in peers if isinstance(p, dict)]


def _status_doc(lock_dir: LockDir) -> dict[str, Any]:
    """NodeLock's status (the shape the daemon will report too), plus this node's key and the peers
    of the saved map, offline."""
    box = lock_dir.outbox()
    own = lock_dir.own_node_key()
    own_sig = box.signatures.get(format_node_key(own)) if own is not None else None
    root = click.get_current_context().find_root().obj or {}
    own_sig = own_sig or root.get("self_signature") or None  # the map's, when the daemon runs this
    node = NodeLock(lock_dir.store(), lock_dir.lock_key(), locally_disabled=lock_dir.locally_disabled)
    doc = node.status(own, decode_signature_blob(own_sig)).to_json()
    authority = node.authority
    if authority is None:
        return doc
    if own is not None:
        doc["node_key"] = format_node_key(own)
        doc["node_key_signed"] = doc["self_locked_out"] is None
    if root.get("last_refusal"):
        doc["last_refusal"] = root["last_refusal"]
    peers = []
    for p in root.get("peers") or _peers_from_saved_map(lock_dir):
        nk_text = str(p.get("node_key", ""))
        sig = p.get("key_signature") or box.signatures.get(nk_text)
        try:
            signed = _signed(authority, parse_node_key(nk_text), sig)
        except TKAError:
            signed = False
        peers.append({"name": p.get("name"), "node_key": nk_text, "signed": signed})
    doc["peers"] = peers
    return doc


def _signed(authority: Authority, node_key: bytes, sig: Any) -> bool:
    blob = decode_signature_blob(sig)
    if blob is None:
        return False
    try:
        authority.node_key_authorized(node_key, blob)
        return True
    except NodeKeyNotAuthorized:
        return False


@lock.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@_run
def status(ctx: click.Context, as_json: bool = False) -> None:
    """Show whether the lock is enabled, this node's lock key and the trusted keys."""
    doc = _status_doc(_dir(ctx))
    if as_json:
        _echo(json.dumps(doc, indent=2))
        return
    _echo("Tailnet Lock is ENABLED." if doc["enabled"] else "Tailnet Lock is NOT enabled.")
    if doc["locally_disabled"]:
        _echo("Tailnet Lock is DISABLED LOCALLY on this node (`lock local-disable`): it does not enforce.")
    _echo()
    if doc.get("node_key") is not None:
        if doc["node_key_signed"]:
            _echo("This node is accessible under Tailnet Lock.")
        else:
            _echo("This node is LOCKED OUT by Tailnet Lock, and action is required to establish connectivity.")
            _echo(f"Run the following command on a node with a trusted key:\n"
                       f"\tmeshnode lock sign {doc['node_key']} {doc['node_lock_key']}")
        _echo()
    _echo(f"This node's tailnet-lock key: {doc['node_lock_key']}")
    if doc["enabled"]:
        _echo(f"Head: {doc['head']}\n\nTrusted signing keys:")
        for k in doc["trusted_keys"]:
            _echo(f"\t{k['key']}\t{k['votes']}\t{'(self)' if k['self'] else ''}".rstrip())
        locked = [p for p in doc["peers"] if not p["signed"]]
        if locked:
            _echo("\nThe following nodes are locked out by tailnet lock and cannot connect to other nodes:")
            for p in locked:
                _echo(f"\t{p['name']}\t{p['node_key']}")


@lock.command("add")
@click.argument("keys", nargs=-1, required=True)
@click.pass_context
@_run
def add(ctx: click.Context, keys: tuple[str, ...]) -> None:
    """Trust one or more signing keys (tlpub:HEX[?VOTES])."""
    _modify(ctx, add=[_key_arg(k, i) for i, k in enumerate(keys, 1)], remove=[])


@lock.command("remove")
@click.argument("keys", nargs=-1, required=True)
@click.pass_context
@_run
def remove(ctx: click.Context, keys: tuple[str, ...]) -> None:
    """Stop trusting signing keys. Nodes they signed are locked out until signed again."""
    _modify(ctx, add=[], remove=[_key_arg(k, i).key_id for i, k in enumerate(keys, 1)])


def _key_arg(text: str, i: int):
    try:
        return parse_key_arg(text)
    except TKAError as exc:
        raise click.BadParameter(f"parsing key {i}: {exc}") from None


def _modify(ctx: click.Context, add: list, remove: list[bytes]) -> None:
    lock_dir = _dir(ctx)
    authority, store = _enabled(lock_dir)
    me = lock_dir.lock_key()
    _require_trusted(authority, me)
    if remove and len(authority.keys) - len(set(remove)) < 1:
        raise click.ClickException("cannot remove the last trusted signing key; use 'meshnode lock disable' "
                                   "to disable tailnet lock instead, or add another signing key first")
    b = authority.updater(me)
    for k in add:
        b.add_key(k)
    for kid in remove:
        b.remove_key(kid)
    updates = b.finalize(store)
    authority = authority.inform(store, updates, allow_known=False)
    for u in updates:
        _echo(f"update {u.hash} ({kind_label(u.kind)})")


@lock.command("sign")
@click.argument("target")
@click.argument("rotation_key", required=False)
@click.pass_context
@_run
def sign(ctx: click.Context, target: str, rotation_key: str | None) -> None:
    """Sign NODEKEY (base64 as `control nodes ls --json` shows it, or nodekey:HEX), optionally naming
    its ROTATION-KEY (tlpub:HEX); or pre-sign an AUTHKEY so nodes joining with it are trusted.
    `file:PATH` reads an argument from a file."""
    target = _maybe_file(target)
    rotation_key = _maybe_file(rotation_key) if rotation_key else None
    lock_dir = _dir(ctx)
    authority, store = _enabled(lock_dir)
    me = lock_dir.lock_key()
    _require_trusted(authority, me)
    if target.startswith(AUTHKEY_PREFIXES):
        if rotation_key:
            raise click.UsageError("usage: meshnode lock sign AUTHKEY (no rotation key)")
        if "--TL" in target:
            raise click.UsageError("the auth key is already pre-signed")
        _wrap_authkey(lock_dir, authority, store, me, target)
        return
    try:
        node_key = parse_node_key(target)
        rot = parse_public(rotation_key) if rotation_key else _rotation_key_of(ctx, lock_dir, node_key, me)
    except TKAError as exc:
        raise click.BadParameter(str(exc)) from None
    sig = sign_direct(me, node_key, rot).serialize()
    _queue_signature(lock_dir, node_key, sig)
    _echo(base64.b64encode(sig).decode())


def _rotation_key_of(ctx: click.Context, lock_dir: LockDir, node_key: bytes, me: LockPrivateKey) -> bytes | None:
    """Without an explicit ROTATION-KEY: the lock key the map says the node holds (as Tailscale's
    admin console fills in the rotation key from the control server), so that node can rotate its
    node key later without another `lock sign`. Trusting the map here adds nothing to trusting it
    for NODEKEY itself, which also comes from the control server (`control nodes ls`)."""
    if node_key == lock_dir.own_node_key():
        return me.public
    root = ctx.find_root().obj or {}
    for p in root.get("peers") or _peers_from_saved_map(lock_dir):
        try:
            if parse_node_key(str(p.get("node_key") or "")) == node_key and p.get("lock_key"):
                return parse_public(str(p["lock_key"]))
        except TKAError:
            continue
    return None


def _wrap_authkey(lock_dir: LockDir, authority: Authority, store, me: LockPrivateKey, authkey: str) -> None:
    import time

    delegate = LockPrivateKey.generate()
    meta = {"purpose": "pre-auth key", "wrapper_createtime": str(int(time.time()))}
    parts = authkey.split("-")
    if authkey.startswith("mskey-") and len(parts) >= 3:
        meta["authkey_stableid"] = parts[1]
    from ..tka.key import ed25519_key

    updates = authority.updater(me).add_key(ed25519_key(delegate.public, 1, meta)).finalize(store)
    authority.inform(store, updates, allow_known=False)
    _echo(wrap_authkey(authkey, sign_credential(me, delegate.public), delegate))


def _maybe_file(arg: str) -> str:
    if arg.startswith("file:"):
        try:
            return Path(arg[5:]).read_text().strip()
        except OSError as exc:
            raise click.BadParameter(f"{arg}: {exc}") from None
    return arg


@lock.command("disable")
@click.argument("secret")
@click.pass_context
@_run
def disable(ctx: click.Context, secret: str) -> None:
    """Turn Tailnet Lock off for good with a disablement secret (disablement-secret:HEX)."""
    try:
        d = parse_disablement(secret)
    except TKAError as exc:
        raise click.BadParameter(str(exc)) from None
    if not d.is_secret:
        raise click.BadParameter("expected a disablement-secret:HEX (a disablement: value cannot disable)")
    lock_dir = _dir(ctx)
    authority, _ = _enabled(lock_dir)
    if not authority.valid_disablement(d.raw):
        raise click.ClickException("invalid disablement secret")
    box = lock_dir.outbox()
    box.disablement_secret = d.raw.hex()
    lock_dir.save_outbox(box)
    lock_dir.forget_chain()
    _echo("Tailnet Lock is disabled on this node; the secret is queued for the control server, "
               "which disables it on every node.")


@lock.command("local-disable")
@click.pass_context
@_run
def local_disable(ctx: click.Context) -> None:
    """Stop enforcing Tailnet Lock on this node only (for a node whose lock state is stuck)."""
    lock_dir = _dir(ctx)
    authority, _ = _enabled(lock_dir)
    lock_dir.set_local_disabled(str(authority.head))
    _echo("Tailnet Lock is disabled locally: this node accepts peers whatever their signatures.")


@lock.command("log")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_run
def log(ctx: click.Context, limit: int, as_json: bool) -> None:
    """List the changes applied to Tailnet Lock, newest first."""
    authority, store = _enabled(_dir(ctx))
    aums = authority.log(store, limit)
    if as_json:
        _echo(json.dumps([_aum_json(a) for a in aums], indent=2))
        return
    for a in aums:
        _echo(_describe(a))


def _aum_json(a: AUM) -> dict[str, Any]:
    out: dict[str, Any] = {"hash": str(a.hash), "change": kind_label(a.kind),
                           "parent": str(a.parent) if a.parent else None,
                           "signatures": [format_public(s.key_id or b"") for s in a.signatures]}
    if a.key is not None:
        out["key"] = {"key": format_public(a.key.key_id), "votes": a.key.votes, "meta": dict(a.key.meta or {})}
    if a.key_id:
        out["key_id"] = format_public(a.key_id)
    if a.votes is not None:
        out["votes"] = a.votes
    if a.state is not None:
        out["keys"] = [format_public(k.key_id) for k in a.state.keys or ()]
        out["disablement_values"] = [v.hex() for v in a.state.disablement_values or ()]
    return out


def _describe(a: AUM) -> str:
    lines = [f"update {a.hash} ({kind_label(a.kind)})"]
    if a.kind == AUMKind.ADD_KEY and a.key is not None:
        lines += ["Type: 25519", f"KeyID: {format_public(a.key.key_id)}"]
        if a.key.meta:
            lines.append(f"Metadata: {dict(a.key.meta)}")
    elif a.kind in (AUMKind.REMOVE_KEY, AUMKind.UPDATE_KEY):
        lines.append(f"KeyID: {format_public(a.key_id or b'')}")
        if a.votes is not None:
            lines.append(f"Votes: {a.votes}")
    elif a.kind == AUMKind.CHECKPOINT and a.state is not None:
        lines.append("Disablement values:")
        lines += [f" - {v.hex()}" for v in a.state.disablement_values or ()]
        lines.append("Keys:")
        for k in a.state.keys or ():
            lines += ["  Type: 25519", f"  KeyID: {format_public(k.key_id)}"]
    return "\n".join(lines) + "\n"


@lock.command("disablement-kdf")
@click.argument("secret_hex")
def disablement_kdf_cmd(secret_hex: str) -> None:
    """Print the disablement value of a hex-encoded secret (advanced)."""
    try:
        raw = bytes.fromhex(secret_hex.removeprefix("disablement-secret:"))
    except ValueError:
        raise click.BadParameter("not hex") from None
    _echo(f"disablement:{disablement_kdf(raw).hex()}")


if __name__ == "__main__":  # pragma: no cover
    lock(sys.argv[1:])
