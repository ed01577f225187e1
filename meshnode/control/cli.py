"""`meshnode control ...`: the coordination server and its admin commands.

Admin commands act on the database directly through `ControlStore` (DESIGN.md section 2); a running
server notices their changes within its poll interval and pushes them to every node.
Exit codes: 0 done, 1 the change failed (refused, not found, ...), 2 bad usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import click

from magicdns import sqldb

from ..safetext import safe
from . import audit, authkeys, naming
from .store import DEFAULT_DB, ControlStore, ControlStoreError, tighten

_DB_HELP = ("Control database: a SQLite file or a postgres://USER@HOST/DB URL (env MESHNODE_CONTROL_DB;"
            " default /var/lib/meshnode/control.db).")


def _db_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--db", "db_path", default=DEFAULT_DB, envvar="MESHNODE_CONTROL_DB",
                        show_default=True, help=_DB_HELP)(f)


def _json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def _default_token_path(db_path: str) -> str:
    """Beside a SQLite file; for PostgreSQL (shared by replicas on other machines) beside the default file."""
    if sqldb.is_postgres(db_path):
        return str(Path(DEFAULT_DB).with_name("control.admin-token"))
    return db_path + ".admin-token"


def _open(db_path: str, domain: str | None = None) -> ControlStore:
    """The store, with changes audited as this CLI's local user."""
    try:
        store = ControlStore(db_path)
        store.actor = audit.cli_actor()
        if domain is not None:
            store.set_domain(domain)
        return store
    except (ControlStoreError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


def _run(fn: Callable[[], Any]) -> Any:
    """Run a store action; its precise errors become a one-line message and exit code 1."""
    from ..policy import PolicyError
    try:
        return fn()
    except (ControlStoreError, naming.NameInvalid, naming.NameTaken, PolicyError) as exc:
        raise click.ClickException(str(exc)) from None


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    # Host names, OS strings and user names come from the network: escapes are shown, never obeyed.
    rows = [["-" if v is None or v == "" else safe(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _split(values: Sequence[str]) -> list[str]:
    """Accept both `a b` and `a,b`."""
    return [v for item in values for v in item.split(",") if v]


def _split_or_none(values: Sequence[str], what: str) -> list[str]:
    """`_split`, where the single word `none` (or nothing at all) means the empty list: clear."""
    items = _split(values)
    if [v.lower() for v in items] == ["none"]:
        return []
    if any(v.lower() == "none" for v in items):
        raise click.UsageError(f"'none' clears the {what}: give it alone")
    return items


@click.group()
def control() -> None:
    """Run and administer the coordination server."""


# -- serve --------------------------------------------------------------------------------------

def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"{text!r}: expected HOST:PORT", param_hint="--listen")
    return host.strip("[]") or "0.0.0.0", int(port)


@control.command()
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to serve on.")
@_db_option
@click.option("--domain", default=None, help="Tailnet domain (default: the stored one, initially 'tailnet').")
@click.option("--ephemeral-grace", default="5m", show_default=True,
              help="Delete an offline ephemeral node after this long (e.g. 30s, 5m).")
@click.option("--admin-token-file", default=None,
              help="Where to write the admin API token at first start (default: DB path + .admin-token;"
              " for a postgres:// database, control.admin-token beside the default database path).")
@click.option("--derp", "embed_derp", is_flag=True,
              help="Also serve a DERP relay (region 999) on this listener, with STUN on --stun-port.")
@click.option("--stun-port", type=click.IntRange(-1, 65535), default=3478, show_default=True,
              help="UDP port of the embedded relay's STUN server (-1: none, 0: any free port).")
@click.option("--derp-region-id", type=click.IntRange(1, 65535), default=999, show_default=True,
              help="Region ID of the embedded relay in the relay map.")
@click.option("--derp-host", default="",
              help="Host name nodes use for the embedded relay (default: the host of their --login-server URL).")
@click.option("--derp-map", "derp_map_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Relay regions in Tailscale's DERPMap JSON, published in the network map; re-read when it "
                   "changes (a version that does not load is logged and the last good one kept).")
@click.option("--server-url", default=None,
              help="This server's URL as browsers reach it (default: http://LISTEN); the OIDC redirect URI"
                   " is SERVER_URL/oidc/callback.")
@click.option("--oidc-issuer", default=None, help="OpenID Connect issuer URL: enables single sign-on to the console.")
@click.option("--oidc-client-id", default=None, help="OIDC client id registered at the issuer.")
@click.option("--oidc-client-secret-file", default=None, type=click.Path(dir_okay=False),
              help="File holding the OIDC client secret.")
@click.option("--oidc-allowed-domains", default="", help="Only these e-mail domains may sign in (comma list).")
@click.option("--oidc-allowed-users", default="", help="Only these e-mail addresses may sign in (comma list).")
@click.option("--oidc-allowed-groups", default="", help="Only members of these OIDC groups may sign in (comma list).")
@click.option("--oidc-preapproved-only", is_flag=True,
              help="Users are not created on first sign-in: they must exist (control users create).")
@click.option("--session-idle", default="8h", show_default=True, help="Console sign-out after this idle time.")
@click.option("--session-lifetime", default="7d", show_default=True, help="Console sign-out this long after sign-in.")
@click.option("--metrics", "metrics_listen", default=None,
              help="HOST:PORT serving /metrics without a token (otherwise /metrics needs the admin token).")
@click.option("--register-rate", default=200.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Requests a second from machine keys no node has (registrations); bursts of 5x.")
@click.option("--replica-id", default=None,
              help="Serve as one of several replicas of a postgres:// database, under this id (heartbeats,"
                   " shared presence; see `control replicas`).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def serve(listen: str, db_path: str, domain: str | None, ephemeral_grace: str, admin_token_file: str | None,
          embed_derp: bool, stun_port: int, derp_region_id: int, derp_host: str, derp_map_file: str | None,
          server_url: str | None, oidc_issuer: str | None, oidc_client_id: str | None,
          oidc_client_secret_file: str | None, oidc_allowed_domains: str, oidc_allowed_users: str,
          oidc_allowed_groups: str, oidc_preapproved_only: bool, session_idle: str, session_lifetime: str,
          metrics_listen: str | None, register_rate: float, replica_id: str | None, verbose: bool) -> None:
    """Run the coordination server."""
    from ..derp.derpmap import RelayMapError, RelayMapFile
    from .console.web import mount
    from .server import ControlServer, ServerConfig
    host, port = _parse_listen(listen)
    if replica_id is not None and not sqldb.is_postgres(db_path):
        raise click.BadParameter("replicas share a PostgreSQL database: give --db postgres://...",
                                 param_hint="--replica-id")
    map_file = None
    if derp_map_file:
        try:
            map_file = RelayMapFile(derp_map_file)
        except RelayMapError as exc:
            raise click.BadParameter(str(exc), param_hint="--derp-map") from None
    console_settings = _console_settings(
        server_url or "http://pending", oidc_issuer, oidc_client_id, oidc_client_secret_file,
        oidc_allowed_domains, oidc_allowed_users, oidc_allowed_groups, oidc_preapproved_only,
        session_idle, session_lifetime)
    metrics = _parse_listen(metrics_listen) if metrics_listen else None
    try:
        grace = authkeys.parse_duration(ephemeral_grace)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ephemeral-grace") from None
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = _open(db_path, domain)
    store.actor = "system"   # the server's own changes (ephemeral clean-up, retention)
    token = store.ensure_admin_token()
    token_path = Path(admin_token_file or _default_token_path(db_path))
    if token is not None:
        path = _write_token(token_path, token)
        logging.getLogger("meshnode.control").info("admin API token written to %s", path)
    else:
        tighten(token_path)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        relay, stun_transport, bound_stun = None, None, -1
        if embed_derp:
            from ..derp.server import RelayServer
            from ..stun.server import start_stun_server
            relay = RelayServer(os.urandom(32))
            if stun_port >= 0:
                stun_transport, stun = await start_stun_server("" if host in ("0.0.0.0", "::") else host,
                                                               stun_port)
                bound_stun = stun.port
        server = ControlServer(store, ServerConfig(ephemeral_grace=grace, reap_interval=min(5.0, grace / 2),
                                                   unregistered_rate=register_rate,
                                                   unregistered_burst=5 * register_rate,
                                                   replica_id=replica_id,
                                                   # LISTEN/NOTIFY rings at once; the poll is the fallback.
                                                   # SQLite has no doorbell: the poll is how a CLI write is
                                                   # seen (two indexed reads, ~10 us, 20 times a second).
                                                   poll_interval=1.0 if sqldb.is_postgres(db_path) else 0.05),
                               relay=relay, relay_map_file=map_file)
        if relay is not None and port != 0:
            # Known before listening, so the first snapshot already carries the relay.
            from ..derp.derpmap import embedded_map
            server.relay_map = embedded_map(derp_region_id, derp_host, port, tls=False, stun_port=bound_stun)
        console = mount(server, console_settings)
        bound = await server.start(host, port)
        if replica_id is not None:
            import dataclasses
            server.config = dataclasses.replace(server.config, replica_listen=f"{host}:{bound}")
        if metrics is not None:
            mport = await server.start_metrics(*metrics)
            click.echo(f"metrics on {metrics[0]}:{mport}/metrics", err=True)
        if relay is not None and port == 0:
            from ..derp.derpmap import embedded_map
            server.relay_map = embedded_map(derp_region_id, derp_host, bound, tls=False, stun_port=bound_stun)
            server.mark_dirty()
        if server_url is None:  # default: the address we listen on, as bound (port 0 works too)
            shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
            console.use_server_url(f"http://{shown}:{bound}")
        oidc_note = (f"; OIDC redirect URI {console.settings.server_url}/oidc/callback" if console.settings.oidc
                     else "; single sign-on off (--oidc-issuer ...)")
        click.echo(f"admin console at {console.settings.server_url}/console/{oidc_note}", err=True)
        click.echo(f"control server listening on {host}:{bound} (db {sqldb.redact(db_path)}, domain {store.domain()})"
                   + (f", relay on /derp (region {derp_region_id})" if relay is not None else "")
                   + (f", STUN on udp/{bound_stun}" if bound_stun >= 0 else ""), err=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        if stun_transport is not None:
            stun_transport.close()
        await server.stop()

    try:
        asyncio.run(main())
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    finally:
        store.close()


def _console_settings(server_url: str, issuer: str | None, client_id: str | None, secret_file: str | None,
                      domains: str, users_: str, groups: str, preapproved_only: bool, idle: str,
                      lifetime: str) -> Any:
    """The admin console's settings from `serve`'s flags; bad usage is exit code 2."""
    from .console.oidc import OidcSettings
    from .console.sessions import SessionPolicy
    from .console.web import ConsoleSettings
    if not server_url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{server_url!r}: expected http://HOST:PORT or https://...", param_hint="--server-url")
    try:
        sessions = SessionPolicy(idle=authkeys.parse_duration(idle), absolute=authkeys.parse_duration(lifetime))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--session-idle/--session-lifetime") from None
    oidc = None
    if issuer or client_id or secret_file:
        if not (issuer and client_id and secret_file):
            raise click.UsageError("single sign-on needs --oidc-issuer, --oidc-client-id and --oidc-client-secret-file")
        try:
            secret = Path(secret_file).read_text().strip()
        except OSError as exc:
            raise click.BadParameter(f"{secret_file}: {exc.strerror}", param_hint="--oidc-client-secret-file") from None
        oidc = OidcSettings(issuer=issuer.rstrip("/"), client_id=client_id, client_secret=secret,
                            redirect_uri=server_url.rstrip("/") + "/oidc/callback",
                            allowed_domains=tuple(_split([domains])), allowed_users=tuple(_split([users_])),
                            allowed_groups=tuple(_split([groups])), preapproved_only=preapproved_only)
    return ConsoleSettings(server_url=server_url.rstrip("/"), oidc=oidc, sessions=sessions)


def _write_token(path: Path, token: str) -> Path:
    """Write a secret readable by its owner only (created 0600, never world-readable even briefly)."""
    try:
        tighten(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    except OSError as exc:
        raise click.ClickException(f"cannot write the admin token to {path}: {exc.strerror}") from None
    return path


@control.command("admin-token")
@_db_option
@click.option("--rotate", is_flag=True, required=True, help="Replace the admin API token.")
@click.option("--admin-token-file", default=None, help="Where to write it (default: DB path + .admin-token).")
def admin_token(db_path: str, rotate: bool, admin_token_file: str | None) -> None:
    """Replace the admin API token; the new one is written to a 0600 file next to the database."""
    token = _run(lambda: _open(db_path).rotate_admin_token())
    path = _write_token(Path(admin_token_file or _default_token_path(db_path)), token)
    click.echo(f"new admin token written to {path}")


@control.command("replicas")
@_db_option
@_json_option
def replicas_cmd(db_path: str, as_json: bool) -> None:
    """The control replicas serving this database: nodes streaming from each, the version each
    serves, how far behind the tailnet's version it is (lag) and its last heartbeat."""
    store = _open(db_path)
    now, version = time.time(), store.version()
    rows = [{"id": r.id, "listen": r.listen, "nodes": r.nodes, "version": r.version, "lag": max(0, version - r.version),
             "heartbeat_at": r.heartbeat_at, "alive": r.alive(now)} for r in store.list_replicas()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _table(["ID", "LISTEN", "NODES", "VERSION", "LAG", "HEARTBEAT", "ALIVE"],
           [[r["id"], r["listen"], r["nodes"], r["version"], r["lag"], f"{now - r['heartbeat_at']:.1f}s ago",
             "yes" if r["alive"] else "no"] for r in rows])


@control.command("migrate")
@click.option("--from", "src", required=True, help="The database to copy from (a SQLite file or postgres:// URL).")
@click.option("--to", "dst", required=True, help="The database to copy into (empty, or a copy this command began).")
@click.option("--batch", default=500, show_default=True, type=click.IntRange(1, 100_000),
              help="Rows a destination transaction carries.")
def migrate_cmd(src: str, dst: str, batch: int) -> None:
    """Copy a tailnet to another database (e.g. SQLite to PostgreSQL), showing progress; compares both
    in full at the end. Safe to run again after an interruption. Stop the source's server first."""
    from .migrate import copy
    if not sqldb.is_postgres(src) and not Path(src).is_file():
        raise click.BadParameter(f"{src}: no such database file", param_hint="--from")
    total_rows = 0
    try:
        for p in copy(src, dst, batch):
            if p.done == p.total:
                total_rows += p.total
            click.echo(f"{p.table}: {p.done}/{p.total} rows", err=True)
    except ControlStoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"copied {total_rows} rows; the two databases hold the same content")


# -- users --------------------------------------------------------------------------------------

@control.group()
def users() -> None:
    """Users own nodes and auth keys."""


@users.command("ls")
@_db_option
@_json_option
def users_ls(db_path: str, as_json: bool) -> None:
    """List users and their console roles."""
    store = _open(db_path)
    items = store.list_users()
    roles = {r.name: r.role for r in store.list_user_roles()}
    if as_json:
        click.echo(json.dumps([{"id": u.id, "name": u.name, "created": u.created, "role": roles.get(u.name, "member")}
                               for u in items], indent=2))
    else:
        _table(["id", "name", "role", "created"],
               [(u.id, u.name, roles.get(u.name, "member"), _when(u.created)) for u in items])


@users.command("create")
@click.argument("name")
@_db_option
def users_create(name: str, db_path: str) -> None:
    """Create a user."""
    user = _run(lambda: _open(db_path).create_user(name))
    click.echo(f"created user {user.name}")


@users.command("rm")
@click.argument("name")
@_db_option
def users_rm(name: str, db_path: str) -> None:
    """Delete a user that owns no nodes."""
    _run(lambda: _open(db_path).delete_user(name))
    click.echo(f"deleted user {name}")


@users.command("role")
@click.argument("name")
@click.argument("role")
@_db_option
def users_role(name: str, role: str, db_path: str) -> None:
    """Set a user's console role: owner, admin, network-admin, it-admin, auditor or member."""
    from .console.roles import RoleRefused, parse_role
    try:
        new = parse_role(role)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="ROLE") from None

    def keep_an_owner(_old: str, owners_after: int) -> None:
        if owners_after < 1:
            raise RoleRefused("the tailnet needs at least one owner: make someone else owner first")
    try:
        _run(lambda: _open(db_path).set_user_role(name, new.value, keep_an_owner))
    except RoleRefused as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{name} is now {new.value}")


# -- auth keys ----------------------------------------------------------------------------------

@control.group()
def authkey() -> None:
    """Pre-auth keys for registering nodes."""


@authkey.command("create")
@click.option("--user", default="default", show_default=True, help="Owner of the nodes it registers.")
@click.option("--reusable", is_flag=True, help="May register any number of nodes (default: single use).")
@click.option("--ephemeral", is_flag=True, help="Nodes it registers are removed after going offline.")
@click.option("--tags", default="", help="Tags its nodes get, e.g. tag:server,tag:prod.")
@click.option("--expiry", default="90d", show_default=True, help="Lifetime, e.g. 1h, 30d; 'never' for none.")
@click.option("--create-user", is_flag=True, help="Create the --user if it does not exist yet.")
@_db_option
@_json_option
@click.pass_context
def authkey_create(ctx: click.Context, user: str, reusable: bool, ephemeral: bool, tags: str, expiry: str,
                   create_user: bool, db_path: str, as_json: bool) -> None:
    """Create a pre-auth key and print it (it is shown only once).

    The --user must exist (`control users create`), unless --create-user is given: a typo must not
    quietly make a new user. The default user is created when first needed."""
    from click.core import ParameterSource
    if expiry == "never":
        expires = None
    else:
        try:
            expires = time.time() + authkeys.parse_duration(expiry)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--expiry") from None
    tag_list = _split([tags])
    store = _open(db_path)
    explicit = ctx.get_parameter_source("user") is not ParameterSource.DEFAULT
    if explicit and not create_user and user not in {u.name for u in store.list_users()}:
        raise click.ClickException(f"no user {user!r}: create it with `meshnode control users create {user}`,"
                                   " or pass --create-user")
    text, key = _run(lambda: store.create_authkey(user, reusable, ephemeral, tag_list, expires))
    if as_json:
        click.echo(json.dumps({"key": text, "id": key.id, "user": key.user, "reusable": key.reusable,
                               "ephemeral": key.ephemeral, "tags": list(key.tags), "expires": key.expires}))
    else:
        click.echo(text)


@authkey.command("ls")
@_db_option
@_json_option
def authkey_ls(db_path: str, as_json: bool) -> None:
    """List pre-auth keys (ids and state, never secrets)."""
    now = time.time()
    keys = _open(db_path).list_authkeys()
    if as_json:
        click.echo(json.dumps([{"id": k.id, "user": k.user, "reusable": k.reusable, "ephemeral": k.ephemeral,
                                "tags": list(k.tags), "created": k.created, "expires": k.expires,
                                "used": k.used_count, "state": k.state(now)} for k in keys], indent=2))
    else:
        _table(["id", "user", "reusable", "ephemeral", "tags", "used", "expires", "state"],
               [(k.id, k.user, k.reusable, k.ephemeral, ",".join(k.tags), k.used_count, _when(k.expires),
                 k.state(now)) for k in keys])


@authkey.command("revoke")
@click.argument("key_id")
@_db_option
def authkey_revoke(key_id: str, db_path: str) -> None:
    """Revoke a key by id (the part after `mskey-`); nodes it registered stay."""
    if key_id.startswith("mskey-"):
        key_id = key_id.split("-")[1]
    _run(lambda: _open(db_path).revoke_authkey(key_id))
    click.echo(f"revoked {key_id}")


# -- nodes --------------------------------------------------------------------------------------

@control.group()
def nodes() -> None:
    """Registered nodes."""


def _node_json(n: Any, domain: str, now: float) -> dict[str, Any]:
    return {"id": n.id, "name": n.name, "fqdn": f"{n.name}.{domain}", "user": n.user,
            "addresses": list(n.addresses), "tags": list(n.tags), "os": n.os, "hostname": n.hostname,
            "ephemeral": n.ephemeral, "last_seen": n.last_seen, "expiry": n.expiry,
            "state": "logged-out" if n.logged_out else "expired" if n.expired(now) else "active",
            "node_key": n.node_key, "advertised_routes": list(n.advertised_routes),
            "approved_routes": list(n.approved_routes), "exit_node": n.exit_node_approved}


def _presence(store: ControlStore, now: float) -> tuple[bool, frozenset[int], float | None]:
    """(a running server reports presence, online node ids, when it last wrote it)."""
    p = store.presence()
    if p is None:
        return False, frozenset(), None
    at, interval, ids = p
    # Three missed heartbeats: the server is gone (or stopped without saying so, e.g. killed).
    return now - at < 3 * interval + 1, ids, at


@nodes.command("ls")
@_db_option
@_json_option
def nodes_ls(db_path: str, as_json: bool) -> None:
    """List nodes: ONLINE (connected to a running control server now), LAST SEEN (now while online),
    and STATE (active, expired, logged-out; ephemeral nodes are marked)."""
    store = _open(db_path)
    now, domain = time.time(), store.domain()
    live, online_ids, at = _presence(store, now)
    from .lock import locked_out  # Tailnet Lock: nodes whose key no trusted key signed
    locked = locked_out(store)
    items = []
    for n in store.list_nodes():
        item = _node_json(n, domain, now)
        item["locked_out"] = locked.get(n.node_key)  # why, or null
        online = live and n.id in online_ids
        item["online"] = online if live else None  # None: no running server to ask
        if online and at is not None:
            item["last_seen"] = max(at, n.last_seen or 0)
        items.append(item)
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    _table(["id", "name", "user", "addresses", "tags", "os", "online", "last seen", "state"],
           [(n["id"], n["name"], n["user"], " ".join(n["addresses"]), ",".join(n["tags"]), n["os"],
             "yes" if n["online"] else "?" if n["online"] is None else "no",
             "now" if n["online"] else _when(n["last_seen"]),
             n["state"] + (", ephemeral" if n["ephemeral"] else "")
             + (", locked out" if n["locked_out"] else "")) for n in items])
    if not live:
        click.echo("# ONLINE unknown: no control server has reported presence lately (is it running?)")


@nodes.command("rename")
@click.argument("node")
@click.argument("new_name")
@_db_option
def nodes_rename(node: str, new_name: str, db_path: str) -> None:
    """Rename NODE (name, id or address) to NEW_NAME."""
    n = _run(lambda: _open(db_path).rename_node(node, new_name))
    click.echo(f"renamed node {n.id} to {n.name}")


@nodes.command("rm")
@click.argument("node")
@_db_option
def nodes_rm(node: str, db_path: str) -> None:
    """Delete NODE; its name is free at once."""
    n = _run(lambda: _open(db_path).delete_node(node))
    click.echo(f"deleted node {n.id} ({n.name})")


@nodes.command("tag")
@click.argument("node")
@click.argument("tags", nargs=-1)
@_db_option
def nodes_tag(node: str, tags: tuple[str, ...], db_path: str) -> None:
    """Set NODE's tags (tag:a tag:b or tag:a,tag:b; none clears them)."""
    n = _run(lambda: _open(db_path).set_tags(node, _split_or_none(tags, "tags")))
    click.echo(f"{n.name}: tags {','.join(n.tags) or '(none)'}")


@nodes.command("expire")
@click.argument("node")
@_db_option
def nodes_expire(node: str, db_path: str) -> None:
    """Expire NODE's login now: it leaves every map until it logs in again with an auth key."""
    n = _run(lambda: _open(db_path).expire_node(node))
    click.echo(f"expired node {n.id} ({n.name})")


# -- routes -------------------------------------------------------------------------------------

@control.group()
def routes() -> None:
    """Subnet routes and exit nodes."""


@routes.command("ls")
@_db_option
@_json_option
def routes_ls(db_path: str, as_json: bool) -> None:
    """List advertised and approved routes."""
    items = [n for n in _open(db_path).list_nodes() if n.advertised_routes or n.advertises_exit_node]
    data = [{"node": n.name, "advertised": list(n.advertised_routes), "approved": list(n.approved_routes),
             "exit_node_advertised": n.advertises_exit_node, "exit_node_approved": n.exit_node_approved}
            for n in items]
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _table(["node", "advertised", "approved", "exit node"],
               [(d["node"], ",".join(d["advertised"]), ",".join(d["approved"]),
                 ("approved" if d["exit_node_approved"] else "advertised") if d["exit_node_advertised"] else "")
                for d in data])


@routes.command("approve")
@click.argument("node")
@click.argument("routes_", metavar="ROUTES", nargs=-1)
@_db_option
def routes_approve(node: str, routes_: tuple[str, ...], db_path: str) -> None:
    """Set NODE's approved routes (CIDRs it advertises; 0.0.0.0/0 or ::/0 approve it as exit node).
    Routes not listed lose their approval; none withdraws them all."""
    n = _run(lambda: _open(db_path).approve_routes(node, _split_or_none(routes_, "approved routes")))
    click.echo(f"{n.name}: approved {','.join(n.approved_routes) or '(no subnets)'}"
               + ("; exit node" if n.exit_node_approved else ""))


# -- policy -------------------------------------------------------------------------------------

@control.group()
def policy() -> None:
    """The ACL policy (Tailscale HuJSON format)."""


def _read(path: str) -> str:
    try:
        return Path(path).read_text() if path != "-" else click.get_text_stream("stdin").read()
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror}", param_hint="FILE") from None


@policy.command("get")
@_db_option
def policy_get(db_path: str) -> None:
    """Print the policy in force (the allow-all default if none was set)."""
    from ..policy import DEFAULT_POLICY_TEXT
    click.echo(_open(db_path).policy_text() or DEFAULT_POLICY_TEXT, nl=False)


@policy.command("set")
@click.argument("file")
@_db_option
def policy_set(file: str, db_path: str) -> None:
    """Replace the policy with FILE after it parses and its `tests` pass (else the old one stays)."""
    from .access import set_policy
    text = _read(file)
    change = _run(lambda: set_policy(_open(db_path), text))
    click.echo("policy updated")
    for name, tags in change.tags_removed:
        click.echo(safe(f"{name}: lost {','.join(tags)} (no longer owned under tagOwners)"))


@policy.command("check")
@click.argument("file")
@_db_option
def policy_check(file: str, db_path: str) -> None:
    """Check FILE (syntax and `tests`, against the current nodes) without changing anything."""
    from ..policy import check_policy
    from .mapbuilder import node_info
    text = _read(file)
    store = _open(db_path)
    now = time.time()
    _run(lambda: check_policy(text, [node_info(n) for n in store.list_nodes() if n.active(now)]))
    click.echo("policy OK")


# -- DNS ----------------------------------------------------------------------------------------

@control.group()
def dns() -> None:
    """Tailnet DNS settings (records: `magicdns records --db THIS_DB ...`)."""


@dns.command("show")
@_db_option
@_json_option
def dns_show(db_path: str, as_json: bool) -> None:
    """Show the DNS settings and records."""
    store = _open(db_path)
    s = store.dns_settings()
    records = store.records.list()
    data = {"domain": store.domain(), "nameservers": list(s.nameservers),
            "routes": {d: list(u) for d, u in s.routes}, "search_domains": list(s.search_domains),
            "upgrade_public_dns": s.upgrade_public_dns, "records": [r.to_json() for r in records]}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"domain:          {data['domain']}")
    click.echo(f"nameservers:     {' '.join(s.nameservers) or '(system resolvers)'}")
    click.echo(f"search domains:  {' '.join(s.search_domains) or '-'}")
    click.echo(f"public DNS:      {'upgraded to DoH (plain DNS behind)' if s.upgrade_public_dns else 'as configured'}")
    for d, ups in s.routes:
        click.echo(f"route:           {d} -> {' '.join(ups) or '(answered locally)'}")
    click.echo(f"records:         {len(records)}")
    rows = [(r["name"], r["ttl"], r["type"], r["value"] + ("  (override)" if r.get("override") else ""))
            for r in data["records"]]
    if rows:
        width = [max(len(str(r[i])) for r in rows) for i in range(3)]
        for r in rows:
            click.echo(f"  {r[0].ljust(width[0])}  {str(r[1]).rjust(width[1])}  IN  {r[2].ljust(width[2])}  {r[3]}")


@dns.group("nameservers")
def dns_nameservers() -> None:
    """Global nameservers."""


@dns_nameservers.command("set")
@click.argument("servers", nargs=-1)
@_db_option
def dns_nameservers_set(servers: tuple[str, ...], db_path: str) -> None:
    """Set the global nameservers (IP[:PORT] ...); none clears them."""
    _run(lambda: _open(db_path).set_nameservers(_split_or_none(servers, "nameservers")))
    click.echo("nameservers updated")


@dns.group("routes")
def dns_routes() -> None:
    """Split DNS routes."""


@dns_routes.command("add")
@click.argument("domain")
@click.argument("servers", nargs=-1)
@_db_option
def dns_routes_add(domain: str, servers: tuple[str, ...], db_path: str) -> None:
    """Send DOMAIN to SERVERS (none: answer DOMAIN locally, NXDOMAIN for unknown names)."""
    _run(lambda: _open(db_path).add_route(domain, _split_or_none(servers, "servers")))
    click.echo(f"route {domain} set")


@dns_routes.command("rm")
@click.argument("domain")
@_db_option
def dns_routes_rm(domain: str, db_path: str) -> None:
    """Remove the route for DOMAIN."""
    _run(lambda: _open(db_path).remove_route(domain))
    click.echo(f"route {domain} removed")


@dns.command("upgrade-public-dns")
@click.argument("state", type=click.Choice(["on", "off"]))
@_db_option
def dns_upgrade_public_dns(state: str, db_path: str) -> None:
    """Nodes send queries for well-known public resolvers (1.1.1.1, 8.8.8.8, 9.9.9.9, Mullvad) over
    their DNS-over-HTTPS endpoint, with plain DNS raced behind it (off by default)."""
    _run(lambda: _open(db_path).set_upgrade_public_dns(state == "on"))
    click.echo(f"public DNS upgrade {state}")


@dns.group("search-domains")
def dns_search() -> None:
    """Search domains pushed to nodes."""


@dns_search.command("set")
@click.argument("domains", nargs=-1)
@_db_option
def dns_search_set(domains: tuple[str, ...], db_path: str) -> None:
    """Set the search domains; none clears them."""
    _run(lambda: _open(db_path).set_search_domains(_split_or_none(domains, "search domains")))
    click.echo("search domains updated")


# -- audit log ----------------------------------------------------------------------------------

@control.group("audit")
def audit_group() -> None:
    """The tamper-evident audit log of configuration changes."""


def _since(text: str | None) -> float | None:
    """`--since`: a duration ago (30m, 7d) or a date/time (2026-01-31, 2026-01-31T12:00, unix seconds)."""
    if not text:
        return None
    try:
        return time.time() - authkeys.parse_duration(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    from datetime import datetime
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a duration (7d, 1h) or a date/time (2026-01-31T12:00)",
                                 param_hint="--since") from None


@audit_group.command("ls")
@click.option("--since", default=None, help="Only entries since a duration ago (7d) or a date/time.")
@click.option("--actor", default=None, help="Only this actor (e.g. admin-token, cli:root@host, node:web; 'node:' or"
              " 'cli:*' match a prefix).")
@click.option("--target", default=None, help="Only this target (e.g. node:web, policy, authkey:ID; prefixes as --actor).")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Only the newest N entries.")
@_db_option
@_json_option
def audit_ls(since: str | None, actor: str | None, target: str | None, limit: int | None, db_path: str,
             as_json: bool) -> None:
    """List audit entries, oldest first."""
    store = _open(db_path)
    items = _run(lambda: store.audit_entries(_since(since), actor, target, limit))
    if as_json:
        click.echo(json.dumps([e.to_json() for e in items], indent=2))
        return

    def change(e: audit.Entry) -> str:
        if e.action == "policy.set":
            return "(diff: audit ls --json)"
        old = "-" if e.old is None else json.dumps(e.old, sort_keys=True)
        new = "-" if e.new is None else json.dumps(e.new, sort_keys=True)
        text = f"{old} -> {new}"
        return text if len(text) <= 100 else text[:97] + "..."
    _table(["id", "time", "actor", "action", "target", "change"],
           [(e.id, _when(e.time), e.actor, e.action, e.target, change(e)) for e in items])


@audit_group.command("verify")
@_db_option
def audit_verify(db_path: str) -> None:
    """Check the hash chain: exit 0 when intact, 1 naming the first entry that was altered or removed."""
    result = _run(lambda: _open(db_path).verify_audit())
    if not result.ok:
        raise click.ClickException(f"audit log verification FAILED: {result.problem}")
    span = f" (entries {result.first_id}..{result.last_id})" if result.entries else ""
    click.echo(f"audit log OK: {result.entries} entries{span}")
    if result.head:
        # Kept somewhere else, this pins today's log: even a rewrite of the whole chain shows later.
        click.echo(f"head: {result.head}")


@audit_group.command("retention")
@click.argument("days", required=False, type=float)
@_db_option
def audit_retention(days: float | None, db_path: str) -> None:
    """Show or set how many days entries are kept (default 90); the server prunes older ones hourly."""
    store = _open(db_path)
    if days is not None:
        _run(lambda: store.set_audit_retention(days))
    click.echo(f"audit retention: {store.audit_retention_days():g} days")


@audit_group.command("prune")
@_db_option
def audit_prune(db_path: str) -> None:
    """Remove entries older than the retention now (recorded in the log itself)."""
    removed = _run(lambda: _open(db_path).prune_audit())
    click.echo(f"removed {removed} entries older than the retention")


# -- connection (flow) logs (control/flows.py) ------------------------------------------------------

@control.group("settings")
def settings_group() -> None:
    """Tailnet-wide settings."""


@settings_group.command("flow-logs")
@click.argument("state", type=click.Choice(["on", "off", "show"]), default="show")
@click.option("--retention", type=float, default=None, help="Keep flow logs this many days (default 30).")
@_db_option
def settings_flow_logs(state: str, retention: float | None, db_path: str) -> None:
    """Turn connection (flow) logs on or off on every node (off by default)."""
    store = _open(db_path)
    if state != "show":
        _run(lambda: store.set_flow_logs(state == "on"))
    if retention is not None:
        _run(lambda: store.set_flow_retention(retention))
    click.echo(f"flow logs: {'on' if store.flow_logs_enabled() else 'off'}, kept {store.flow_retention_days():g} days")


@control.group("flows")
def flows_group() -> None:
    """Connection (flow) logs uploaded by the nodes."""


_PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}


@flows_group.command("ls")
@click.option("--node", default=None, help="Only flows logged by this node (name).")
@click.option("--peer", default=None, help="Only flows with this peer (name).")
@click.option("--since", default=None, help="Only flows since a duration ago (10m) or a date/time.")
@click.option("--dropped", is_flag=True, help="Only packets the packet filter dropped.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(min=1))
@_db_option
@_json_option
def flows_ls(node: str | None, peer: str | None, since: str | None, dropped: bool, limit: int, db_path: str,
             as_json: bool) -> None:
    """List flow records, oldest first: per window and connection, packets and bytes each way."""
    store = _open(db_path)
    items = _run(lambda: store.flows(node, peer, _since(since), dropped, limit))
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return

    def ep(addr: str, port: int) -> str:
        return (f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}") if port else addr

    _table(["start", "node", "peer", "kind", "proto", "src", "dst", "tx pkts", "tx bytes", "rx pkts",
            "rx bytes", "dropped"],
           [(time.strftime("%H:%M:%S", time.localtime(f["start"])), f["node"], f["peer"], f["kind"],
             _PROTOS.get(f["proto"], str(f["proto"])), ep(f["src"], f["sport"]), ep(f["dst"], f["dport"]),
             f["tx_packets"], f["tx_bytes"], f["rx_packets"], f["rx_bytes"],
             f["rule"] if f["dropped"] else "") for f in items])
