"""Node commands: daemon, up, down, logout, status, ip, ping, netcheck, dns.

Flags follow the `tailscale` CLI (`--accept-dns=false`, comma-separated `--advertise-routes`), so
users' habits carry over. Exit codes: 2 for bad usage (checked here, before the daemon is asked),
1 for a failure (daemon not running, control server refused, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import click

from magicdns.upstream import UpstreamError, parse_upstream

from ..safetext import safe
from .apitypes import QUERY_TYPES
from .localclient import DaemonNotRunning, LocalApiRefused, LocalClient
from .prefs import SETTABLE, Prefs, PrefsError, check_login_server, check_route, check_tag, flag_name, flag_text

DEFAULT_SOCKET = "/run/meshnode/meshnode.sock"


def _root_obj(ctx: click.Context) -> dict[str, Any]:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {}
    return root.obj


def _client(ctx: click.Context, timeout: float = 60.0) -> LocalClient:
    path = _root_obj(ctx).get("socket") or DEFAULT_SOCKET
    return LocalClient(path, timeout=timeout)


def _set_socket(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # `meshnode status --socket S` as well as `meshnode --socket S status`: the later one wins.
    if value is not None:
        _root_obj(ctx)["socket"] = value


def _set_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    if value:
        _root_obj(ctx)["verbose"] = _root_obj(ctx).get("verbose", 0) + value


SOCKET_HELP = (f"LocalAPI unix socket of the daemon (env MESHNODE_SOCKET) [default: {DEFAULT_SOCKET}]."
               " Accepted before or after the command.")


def socket_options(cmd: click.Command) -> click.Command:
    """Give `cmd` (and its subcommands) `--socket` and `-v`, as the top-level group has them."""
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            socket_options(sub)
        return cmd
    names = {o for p in cmd.params for o in p.opts}
    if "--socket" not in names:
        cmd.params.append(click.Option(["--socket"], default=None, expose_value=False, is_eager=True,
                                       callback=_set_socket, metavar="PATH", help=SOCKET_HELP))
    if "-v" not in names:
        cmd.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False,
                                       callback=_set_verbose, help="Show technical details of failures."))
    return cmd


class CliFailure(click.ClickException):
    """A failure with the technical detail shown only under `-v`."""

    def __init__(self, message: str, detail: str = "", verbose: bool = False) -> None:
        super().__init__(message + (f"\n  detail: {detail}" if verbose and detail else ""))


@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    """LocalAPI failures as CLI errors: a 400 is bad usage (exit 2), the rest exit 1."""
    try:
        yield
    except DaemonNotRunning as exc:
        raise click.ClickException(str(exc)) from None
    except LocalApiRefused as exc:
        if exc.status == 400:
            raise click.UsageError(exc.message) from None
        ctx = click.get_current_context(silent=True)
        verbose = bool(ctx and _root_obj(ctx).get("verbose"))
        raise CliFailure(exc.message, exc.detail, verbose) from None


def _call(ctx: click.Context, method: str, path: str, body: Any = None,
          params: dict[str, str] | None = None, timeout: float = 60.0) -> Any:
    with _api_errors():
        return _client(ctx, timeout).request(method, path, body, params)


def _bool_option(name: str, help_text: str) -> Any:
    # `--accept-dns` alone means true; `--accept-dns=false` as in tailscale; absent means "keep".
    return click.option(name, type=click.BOOL, is_flag=False, flag_value=True, default=None, help=help_text)


def _split_csv(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


# -- the daemon ---------------------------------------------------------------------------------

def _listen_addr(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    out = []
    for v in values:
        try:
            up = parse_upstream(v)
        except UpstreamError as exc:
            raise click.BadParameter(str(exc)) from None
        if up.encrypted:  # tls://NAME parses as an upstream; a listen address is IP[:PORT] only
            raise click.BadParameter(f"{v!r}: expected an IP address with an optional :PORT")
        out.append((up.host, up.port))
    return tuple(out)


@click.command("daemon")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/var/lib/meshnode"), show_default=True, help="Keys, prefs and the last map.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"LocalAPI unix socket [default: {DEFAULT_SOCKET}].")
@click.option("--tun", default=None, help="Run the WireGuard tunnel on this TUN interface (DNS addresses go on it).")
@click.option("--port", type=click.IntRange(0, 65535), default=41641, show_default=True,
              help="WireGuard UDP port (with --tun; 0: any).")
@click.option("--userspace", is_flag=True, help="No tunnel: DNS-only mode (addresses on a dummy/loopback).")
@click.option("--dns-listen", multiple=True, callback=_listen_addr, metavar="HOST[:PORT]",
              help="Listen here instead of 100.100.100.100:53 and fd7a:115c:a1e0::53 (repeatable).")
@click.option("--resolv-conf", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The resolv.conf to manage [default: /etc/resolv.conf, or systemd-resolved].")
@click.option("--dot-listen", multiple=True, callback=_listen_addr, metavar="HOST[:PORT]",
              help="Serve DNS over TLS here [default: the service addresses, port 853, without --dns-listen].")
@click.option("--doh-listen", multiple=True, callback=_listen_addr, metavar="HOST[:PORT]",
              help="Serve DNS over HTTPS here [default: the service addresses, port 443, without --dns-listen].")
@click.option("--os", "os_name", default=None, help="OS name reported to the control server.")
@click.option("--metrics", default=None, metavar="HOST:PORT", help="Serve the resolver's Prometheus metrics here.")
@click.option("--query-log", default=None, metavar="FILE", help="Log every DNS query to FILE ('-': stderr).")
@click.option("-v", "--verbose", count=True, help="Debug logging.")
@click.pass_context
def daemon_cmd(ctx: click.Context, state_dir: Path, socket_path: Path | None, tun: str | None,
               port: int, userspace: bool, dns_listen: tuple[tuple[str, int], ...], resolv_conf: Path | None,
               os_name: str | None, metrics: str | None, query_log: str | None, verbose: int,
               dot_listen: tuple[tuple[str, int], ...] = (), doh_listen: tuple[tuple[str, int], ...] = ()) -> None:
    """Run the node daemon in the foreground."""
    from .daemon import DaemonConfig
    from .dnsthread import DnsThreadError
    from .errors import NodeError
    from .localapi import LocalApiError
    from .state import StateError
    from .wiring import run_daemon

    if tun and userspace:
        raise click.UsageError("--tun and --userspace exclude each other")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        # Debug for our own code only: pyroute2 and asyncio at debug level drown everything else.
        for name in ("meshnode", "magicdns"):
            logging.getLogger(name).setLevel(logging.DEBUG)
    metrics_addr = None
    if metrics is not None:
        try:
            m = parse_upstream(metrics)
        except UpstreamError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics") from None
        metrics_addr = (m.host, m.port)
    sock = socket_path or Path((ctx.find_root().obj or {}).get("socket") or DEFAULT_SOCKET)
    config = DaemonConfig(state_dir=state_dir, socket_path=sock, tun=None if userspace else tun,
                          dns_listen=dns_listen, resolv_conf=resolv_conf, os_name=os_name,
                          metrics=metrics_addr, query_log=query_log, port=port,
                          dot_listen=dot_listen, doh_listen=doh_listen)
    try:
        asyncio.run(run_daemon(config))
    except (StateError, LocalApiError, DnsThreadError) as exc:
        raise click.ClickException(str(exc)) from None
    except NodeError as exc:
        raise click.ClickException(exc.message) from None


# -- up / down / logout --------------------------------------------------------------------------

AUTHKEY_ENV = "MESHNODE_AUTHKEY"


def resolve_authkey(value: str | None, env: str | None) -> str | None:
    """The auth key from `--authkey` (KEY, file:PATH or - for standard input) or MESHNODE_AUTHKEY.

    An inline key is accepted with a warning: any local user can read a command line from /proc.
    The key itself never appears in a message.
    """
    if value is None:
        return env.strip() or None if env else None
    if value == "-":
        key = click.get_text_stream("stdin").readline().strip()
        if not key:
            raise click.UsageError("--authkey -: nothing on standard input")
        return key
    if value.startswith("file:"):
        path = Path(value[5:]).expanduser()
        try:
            key = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not text"
            raise click.UsageError(f"--authkey file:{path}: cannot read: {reason}") from None
        if not key or "\n" in key:
            raise click.UsageError(f"--authkey file:{path}: expected one key on one line")
        return key
    click.echo("warning: an auth key on the command line can be read by every local user (ps, /proc);"
               f" prefer --authkey file:PATH, --authkey - or {AUTHKEY_ENV}", err=True)
    return value


_PREF_HELP = {
    "hostname": "Name to register with [default: the OS hostname].",
    "accept_dns": "Point the system resolver at MagicDNS [default: true].",
    "accept_routes": "Accept subnet routes advertised by other nodes [default: false].",
    "advertise_routes": "Subnets to offer to the tailnet (CIDR,...; empty: none).",
    "advertise_exit_node": "Offer this node as an exit node [default: false].",
    "exit_node": "Send internet traffic through this peer (NAME|IP; empty: none).",
    "exit_node_allow_lan_access": "With --exit-node: still reach the local networks directly"
                                  " (by default they are blocked, as Tailscale's) [default: false].",
    "advertise_tags": "Tags to request for this node (tag:a,tag:b; empty: none).",
    "shields_up": "Refuse every connection arriving from the tailnet (replies to ours pass) [default: false].",
}


def _pref_options(f: Any) -> Any:
    """The preference flags `up` and `set` share, named as tailscale's."""
    for field in reversed(SETTABLE):
        flag = "--" + field.replace("_", "-")
        if field in ("advertise_routes", "advertise_tags"):
            opt = click.option(flag, field, multiple=True, metavar="A,B", help=_PREF_HELP[field])
        elif field in ("hostname", "exit_node"):
            opt = click.option(flag, field, default=None, metavar="NAME", help=_PREF_HELP[field])
        else:
            opt = _bool_option(flag, _PREF_HELP[field])
        f = opt(f)
    return f


def _given_prefs(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The preference flags given on the command line, checked and normalised (JSON values)."""
    from click.core import ParameterSource
    given: dict[str, Any] = {}
    try:
        for field in SETTABLE:
            if ctx.get_parameter_source(field) not in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
                continue
            value = values[field]
            if field == "advertise_routes":
                value = [check_route(r) for r in _split_csv(value)]
            elif field == "advertise_tags":
                value = [check_tag(t) for t in _split_csv(value)]
            elif field == "hostname":
                if not value.strip():
                    raise click.UsageError("--hostname must not be empty")
                value = value.strip()
            elif field == "exit_node":
                value = value.strip()
            given[field] = value
    except PrefsError as exc:
        raise click.UsageError(str(exc)) from None
    return given


def _pending_approval(st: dict[str, Any]) -> str | None:
    """What `up` says when advertised routes or the exit node wait for an admin's approval."""
    me = st.get("self") or {}
    prefs = st.get("prefs") or {}
    approved = list(me.get("approved_routes") or [])
    pending = [r for r in prefs.get("advertise_routes") or [] if r not in approved]
    exit_pending = bool(prefs.get("advertise_exit_node")) and not me.get("exit_node")
    if not pending and not exit_pending:
        return None
    what = []
    if pending:
        what.append(("route " if len(pending) == 1 else "routes ") + ", ".join(pending))
    if exit_pending:
        what.append("the exit node")
    want = approved + pending + (["0.0.0.0/0", "::/0"] if exit_pending else [])
    want = list(dict.fromkeys(want))
    return (f"{' and '.join(what).capitalize()} wait for approval on the control server; an admin runs:\n"
            f"  meshnode control routes approve {me.get('name', 'NODE')} {','.join(want)}")


def _changes_text(cur: dict[str, Any], new: dict[str, Any], fields: list[str]) -> str:
    def show(v: Any) -> str:
        if isinstance(v, list):
            return ",".join(v) or "none"
        if isinstance(v, bool):
            return "true" if v else "false"
        return v or "none"
    return "\n".join(f"  {flag_name(f)}: {show(cur[f])} -> {show(new[f])}" for f in fields)


@click.command("up")
@click.option("--login-server", default=None,
              help="Control server URL (needed the first time); several replicas as URL1,URL2 (tried in order).")
@click.option("--authkey", "--auth-key", "authkey", default=None, metavar="KEY|file:PATH|-",
              help="Pre-auth key (needed to register a new node): file:PATH reads it from a file, - from"
              " standard input; env MESHNODE_AUTHKEY. Inline keys are visible to every local user."
              " Without one, a new machine logs in through the browser.")
@_pref_options
@click.option("--reset", is_flag=True, help="Reset the settings not given here to their defaults.")
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True,
              help="Seconds to wait for the first network map.")
@click.option("--force-reauth", is_flag=True,
              help="Start over: new node key, re-pin the server key (needs --authkey).")
@click.option("--json", "as_json", is_flag=True, help="Print the resulting status as JSON.")
@click.pass_context
def up_cmd(ctx: click.Context, login_server: str | None, authkey: str | None, reset: bool, timeout: float,
           force_reauth: bool, as_json: bool, **values: Any) -> None:
    """Connect to the tailnet (registering with --authkey the first time, or in the browser without one).

    As with `tailscale up`, the settings are the flags given: a setting left out goes back to its
    default. When that would change something already set, `up` refuses and lists it; pass --reset
    to accept, or use `meshnode set --FLAG` to change one setting. A bare `meshnode up` reconnects
    with the saved settings (after `down`, `logout` or a refusal as well)."""
    authkey = resolve_authkey(authkey, os.environ.get(AUTHKEY_ENV))
    body: dict[str, Any] = {"timeout": timeout}
    if force_reauth:
        if not authkey:
            raise click.UsageError("--force-reauth needs --authkey")
        body["force_reauth"] = True
    if login_server is not None:
        try:
            body["login_server"] = check_login_server(login_server)
        except PrefsError as exc:
            raise click.UsageError(str(exc)) from None
    if authkey is not None:
        body["authkey"] = authkey
    given = _given_prefs(ctx, values)
    st = _call(ctx, "GET", "/status")
    cur = st.get("prefs") or {}
    if cur.get("login_server") and (given or reset):
        defaults = Prefs().to_json()
        new = {f: given.get(f, defaults[f]) for f in SETTABLE}
        reverted = [f for f in SETTABLE if f not in given and cur.get(f) != defaults[f]]
        if reverted and not reset:
            keep = " ".join(flag_text(f, cur[f]) for f in SETTABLE if f not in given and f in reverted)
            mine = " ".join(flag_text(f, v) for f, v in given.items())
            raise click.ClickException(
                "`meshnode up` sets every setting: these are not given and would be reset:\n"
                + _changes_text(cur, new, reverted)
                + "\nRe-run with --reset to reset them, or keep them with:\n"
                f"  meshnode up {' '.join(x for x in (mine, keep) if x)}\n"
                "or change only what you mean with `meshnode set --FLAG=VALUE`.")
        body.update(new)
    else:
        body.update(given)
    if authkey:
        status = _call(ctx, "POST", "/up", body, timeout=timeout + 30)
    else:
        status = _up_in_browser(ctx, body, timeout, as_json)
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    me = status.get("self") or {}
    click.echo(safe(f"Connected as {me.get('fqdn', '?')} ({', '.join(me.get('addresses', []))})"))
    pending = _pending_approval(status)
    if pending:
        click.echo(pending)


def _up_in_browser(ctx: click.Context, body: dict[str, Any], timeout: float, as_json: bool) -> Any:
    """`up` without a key: a known machine just logs in; a new one prints the URL the control server
    gives (from `status`, while `/up` waits) and finishes once someone confirms it in the browser."""
    import threading

    from .daemon import BROWSER_LOGIN_WAIT
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["status"] = _call(ctx, "POST", "/up", dict(body, interactive=True),
                                     timeout=BROWSER_LOGIN_WAIT + timeout + 30)
        except BaseException as exc:  # re-raised in the main thread
            result["error"] = exc
    # A daemon thread: Ctrl-C ends the command at once instead of waiting for the login.
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    shown = ""
    while True:
        worker.join(0.2)
        if not worker.is_alive():
            if "error" in result:
                raise result["error"]
            return result["status"]
        url = (_call(ctx, "GET", "/status", timeout=10) or {}).get("auth_url") or ""
        if url and url != shown:
            shown = url
            click.echo(f"\nTo authenticate, visit:\n\n\t{url}\n", err=as_json)


@click.command("set")
@_pref_options
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True,
              help="Seconds to wait for the control server when the node is running.")
@click.option("--json", "as_json", is_flag=True, help="Print the resulting status as JSON.")
@click.pass_context
def set_cmd(ctx: click.Context, timeout: float, as_json: bool, **values: Any) -> None:
    """Change the given settings only (others stay as they are), running or not."""
    given = _given_prefs(ctx, values)
    if not given:
        raise click.UsageError("nothing to set: give at least one flag, e.g. --accept-routes or --shields-up")
    before = (_call(ctx, "GET", "/status").get("prefs") or {})
    status = _call(ctx, "POST", "/set", dict(given, timeout=timeout), timeout=timeout + 30)
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    after = status.get("prefs") or {}
    changed = [f for f in SETTABLE if before.get(f) != after.get(f)]
    click.echo(_changes_text(before, after, changed) if changed else "nothing changed")
    pending = _pending_approval(status) if status.get("self") else None
    if pending:
        click.echo(pending)


@click.command("down")
@click.pass_context
def down_cmd(ctx: click.Context) -> None:
    """Disconnect: stop serving, restore the system's DNS; keys and state are kept."""
    _call(ctx, "POST", "/down")


@click.command("logout")
@click.pass_context
def logout_cmd(ctx: click.Context) -> None:
    """Log out: deregister from the control server and forget the node key."""
    _call(ctx, "POST", "/logout")


# -- status / ip ---------------------------------------------------------------------------------

def _owner(node: dict[str, Any]) -> str:
    return ",".join(node.get("tags") or []) or node.get("user") or "-"


def _peer_state(peer: dict[str, Any]) -> str:
    """The last column of `status`, as tailscale's: activity, exit node, path."""
    if not peer.get("online"):
        parts = ["offline"]
    else:
        parts = []
        wg = peer.get("tunnel") or {}
        path = peer.get("path")
        if peer.get("active") or (path is not None and path.get("type") in ("direct", "relay")):
            parts.append("active")
        if peer.get("exit_node_in_use"):
            parts.append("exit node")
        elif peer.get("offers_exit_node"):
            parts.append("offers exit node")
        if path is not None:  # the path layer's word: a path that answers, not one configured
            if path["type"] == "direct" and path.get("endpoint"):
                parts.append(f"direct {path['endpoint']}")
            elif path["type"] == "relay":
                parts.append(f'relay "{path["relay_region"]}"')
        elif peer.get("active") and wg.get("endpoint"):
            parts.append(f"direct {wg['endpoint']}")
    if not peer.get("online") and peer.get("exit_node_in_use"):
        parts.append("exit node (offline: internet traffic is blocked)")
    return "; ".join(parts) or "-"


def format_filter(filt: dict[str, Any]) -> str:
    """One line on the ACL packet filter: what it dropped and let in from the tunnel."""
    dropped, accepted = filt.get("dropped") or {}, filt.get("accepted") or {}
    reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in dropped.items() if n)
    return (f"# Packet filter: {sum(dropped.values())} dropped" + (f" ({reasons})" if reasons else "")
            + f", {sum(accepted.values())} accepted; {filt.get('rules', 0)} rules,"
            f" {filt.get('flows', 0)} tracked connections")


def format_status(st: dict[str, Any], show_self: bool = True, show_peers: bool = True,
                  active_only: bool = False) -> str:
    """The human table of `meshnode status`: one line per node, self first, like tailscale's."""
    state = st.get("backend_state")
    me = st.get("self")
    lines: list[str] = []
    if state in ("NeedsLogin", "Stopped") or me is None:
        if st.get("auth_url"):
            lines.append(f"Waiting for the login to be confirmed at {st['auth_url']}")
        lines.append({"NeedsLogin": "Logged out: run `meshnode up --login-server URL` (and log in in the browser)"
                                    " or add `--authkey KEY`.",
                      "Stopped": "meshnode is stopped: run `meshnode up`."}.get(
                          state or "", f"State: {state}; no network map yet."))
    else:
        rows = [(me, "-")] if show_self else []
        if show_peers:
            rows += [(p, _peer_state(p)) for p in st.get("peers", []) if p.get("active") or not active_only]
        # Names, OS strings and users come from other nodes: escapes are shown, never obeyed.
        table = [tuple(safe(v) for v in ((n.get("addresses") or ["-"])[0], n.get("name", "?"), _owner(n),
                                         n.get("os") or "-", s)) for n, s in rows]
        widths = [max((len(r[i]) for r in table), default=0) for i in range(4)]
        for r in table:
            lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        if state != "Running":
            lines.append(f"# State: {state} (serving the map saved at the last run)")
        filt = (st.get("tunnel") or {}).get("filter")
        if filt:
            lines.append(format_filter(filt))
    health = st.get("health") or []
    if health:
        lines.append("")
        lines.append("# Health check:")
        lines += [f"#     - {safe(h)}" for h in health]
    return "\n".join(lines)


@click.command("status")
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable output (stable field names: README.md, 'status --json schema').")
@click.option("--active", is_flag=True, help="Only peers exchanging traffic now.")
@click.option("--self", "show_self", type=click.BOOL, default=True, show_default=True,
              help="Show this node (--self=false hides it).")
@click.option("--peers", "show_peers", type=click.BOOL, default=True, show_default=True,
              help="Show the peers (--peers=false hides them).")
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool, active: bool, show_self: bool, show_peers: bool) -> None:
    """Show this node and its peers: name, addresses, owner, OS, and activity.

    Exits 1 when logged out or stopped (as tailscale status does), after saying so."""
    st = _call(ctx, "GET", "/status")
    if as_json:
        if not show_self:
            st["self"] = None
        if not show_peers:
            st["peers"] = []
        elif active:
            st["peers"] = [p for p in st.get("peers", []) if p.get("active")]
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(format_status(st, show_self, show_peers, active))
    if st.get("backend_state") in ("NeedsLogin", "Stopped"):
        ctx.exit(1)


@click.command("ip")
@click.option("-4", "v4", is_flag=True, help="Only the IPv4 address.")
@click.option("-6", "v6", is_flag=True, help="Only the IPv6 address.")
@click.argument("peer", required=False)
@click.pass_context
def ip_cmd(ctx: click.Context, v4: bool, v6: bool, peer: str | None) -> None:
    """Show this node's (or PEER's) tailnet addresses."""
    if v4 and v6:
        raise click.UsageError("-4 and -6 exclude each other")
    params = {}
    if v4 or v6:
        params["family"] = "4" if v4 else "6"
    if peer:
        params["peer"] = peer
    for addr in _call(ctx, "GET", "/ip", params=params)["addresses"]:
        click.echo(addr)


@click.command("ping")
@click.argument("peer")
@click.option("-c", "--count", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--timeout", type=click.FloatRange(0.1, 30), default=2.0, show_default=True,
              help="Seconds to wait for each pong.")
@click.option("--until-direct", is_flag=True,
              help="Stop at the first pong over a direct path; fail if none comes within COUNT pings.")
@click.pass_context
def ping_cmd(ctx: click.Context, peer: str, count: int, timeout: float, until_direct: bool) -> None:
    """Ping PEER and say which path answered (disco pings, as `tailscale ping`; ICMP through the
    tunnel for a peer without a disco key)."""
    res = _call(ctx, "POST", "/ping", {"peer": peer, "count": count, "timeout": timeout,
                                       "until_direct": until_direct},
                timeout=count * (timeout + 1) + 30)
    name, addr = res["peer"].split(".")[0], res["address"]
    replies = res.get("replies") or [{"ms": r, "via": res.get("endpoint")} for r in res["replies_ms"]]
    for r in replies:
        via = f" via {r['via']}" if r.get("via") else ""
        click.echo(f"pong from {name} ({addr}){via} in {r['ms']:g}ms" if r["ms"] is not None
                   else f"timeout waiting for pong from {name} ({addr})")
    if all(r["ms"] is None for r in replies):
        raise click.ClickException(f"no reply from {name} ({addr})")
    if until_direct and not any(r.get("direct") for r in replies):
        raise click.ClickException(f"{name} ({addr}) answered, but not over a direct path")


@click.command("whois")
@click.argument("address", metavar="IP[:PORT]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def whois_cmd(ctx: click.Context, address: str, as_json: bool) -> None:
    """The node and user that own a tailnet address (the identity ACLs and `serve` use)."""
    res = _call(ctx, "GET", "/whois", params={"addr": address})
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    node = res["node"]
    # The OS string and user name come from the network: shown, never obeyed (safetext).
    click.echo(f"Machine:\n  Name:      {safe(node['fqdn'])}\n  ID:        {node['id']}\n"
               f"  Addresses: {', '.join(node['addresses'])}\n  OS:        {safe(node.get('os') or '-')}")
    if res.get("tags"):
        click.echo(f"  Tags:      {safe(', '.join(res['tags']))}")
    click.echo(f"User:\n  Name:      {safe(res['user'])}")


def _version_lines(cli: str, remote: dict[str, Any] | None, error: str | None) -> list[str]:
    lines = [f"CLI:            {cli}"]
    if remote is None:
        lines.append(f"daemon:         unknown ({error})")
        return lines
    lines.append(f"daemon:         {remote['daemon']}" + ("" if remote["daemon"] == cli else "  (differs from the CLI)"))
    c = remote.get("control") or {}
    if c.get("version"):
        lines.append(f"control server: {c['version']} at {c['url']}"
                     + ("" if c["version"] == remote["daemon"] else "  (differs from the daemon)"))
    elif c.get("url"):
        lines.append(f"control server: unknown ({c.get('error')})")
    else:
        lines.append("control server: none yet (no --login-server)")
    return lines


def _version_report(ctx: click.Context) -> dict[str, Any]:
    from ..version import version
    cli = version()
    try:
        remote = _client(ctx, 10).request("GET", "/version")
        error = None
    except (DaemonNotRunning, LocalApiRefused) as exc:
        remote, error = None, str(exc)
    versions = [cli] + ([remote["daemon"]] if remote else []) + (
        [remote["control"]["version"]] if remote and (remote.get("control") or {}).get("version") else [])
    return {"cli": cli, "daemon": remote["daemon"] if remote else None,
            "control": (remote or {}).get("control"), "error": error,
            "match": len(set(versions)) == 1, "_lines": _version_lines(cli, remote, error)}


@click.command("version")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def version_cmd(ctx: click.Context, as_json: bool) -> None:
    """The versions of this CLI, the daemon and the control server, and whether they match."""
    report = _version_report(ctx)
    lines = report.pop("_lines")
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo("\n".join(lines))
    if report["daemon"] is not None and report["match"]:
        click.echo("All versions match.")


# -- serve ---------------------------------------------------------------------------------------

def format_serve(st: dict[str, Any]) -> str:
    entries = st.get("entries") or []
    if not entries:
        return "Nothing is served (`meshnode serve --http 80 http://127.0.0.1:8080` shares a local web server)."
    lines = []
    for e in entries:
        where = ", ".join(e.get("listening") or []) or "-"
        lines.append(f"{e['kind']:<5} port {e['port']:<5} -> {e['target']}   listening on {where}"
                     + (f"   ({e['error']})" if e.get("error") else ""))
    return "\n".join(lines)


@click.command("serve", context_settings={"ignore_unknown_options": False})
@click.option("--tcp", "tcp_port", type=click.IntRange(1, 65535), default=None, metavar="PORT",
              help="Forward this TCP port of the node's tailnet addresses to TARGET (tcp://127.0.0.1:PORT).")
@click.option("--http", "http_port", type=click.IntRange(1, 65535), default=None, metavar="PORT",
              help="Reverse-proxy HTTP on this port to TARGET (http://127.0.0.1:PORT), adding the caller's"
                   " Tailscale-User-Login and Tailscale-User-Name.")
@click.option("--https", "https_port", type=click.IntRange(1, 65535), default=None, metavar="PORT",
              help="As --http, over TLS with the node's certificate from the tailnet CA (clients trust"
                   " `meshnode cert --ca`).")
@click.option("--off", is_flag=True, help="Stop serving the given port.")
@click.option("--bg", is_flag=True, help="Return at once and keep serving (saved across restarts).")
@click.option("--json", "as_json", is_flag=True, help="With `status`: machine-readable output.")
@click.argument("args", nargs=-1, metavar="[TARGET | status | reset]")
@click.pass_context
def serve_cmd(ctx: click.Context, tcp_port: int | None, http_port: int | None, https_port: int | None,
              off: bool, bg: bool, as_json: bool, args: tuple[str, ...]) -> None:
    """Share a local service with the tailnet, as Tailscale Serve does.

    \b
      meshnode serve --http 80 http://127.0.0.1:8080 --bg
      meshnode serve --https 443 http://127.0.0.1:8080 --bg
      meshnode serve --tcp 2222 tcp://127.0.0.1:22 --bg
      meshnode serve status [--json]
      meshnode serve --http 80 --off
      meshnode serve reset

    Without --bg it serves until interrupted (Ctrl+C), then stops serving that port. The ACL policy
    still decides who can connect: the listener is on the tailnet addresses, behind the packet filter."""
    if args and args[0] in ("status", "reset"):
        if len(args) > 1 or any(v is not None for v in (tcp_port, http_port, https_port)) or off or bg:
            raise click.UsageError(f"`meshnode serve {args[0]}` takes no other arguments"
                                   + ("" if args[0] == "reset" else " (but --json)"))
        if args[0] == "reset":
            _call(ctx, "POST", "/serve/reset")
            click.echo("Nothing is served any more.")
            return
        st = _call(ctx, "GET", "/serve")
        click.echo(json.dumps(st, indent=2) if as_json else format_serve(st))
        return
    ports = [(k, p) for k, p in (("tcp", tcp_port), ("http", http_port), ("https", https_port)) if p is not None]
    if len(ports) != 1:
        raise click.UsageError("give one of --tcp PORT, --http PORT or --https PORT (or `serve status`)")
    kind, port = ports[0]
    if off:
        if args:
            raise click.UsageError("--off takes no TARGET")
        _call(ctx, "POST", "/serve/off", {"port": port})
        click.echo(f"Port {port} is no longer served.")
        return
    if len(args) != 1:
        raise click.UsageError(f"give one TARGET, e.g. {'http' if kind == 'https' else kind}://127.0.0.1:8080")
    st = _call(ctx, "POST", "/serve", {"kind": kind, "port": port, "target": args[0]})
    entry = next((e for e in st.get("entries", []) if e["port"] == port), {})
    where = ", ".join(entry.get("listening") or []) or "(waiting for the tunnel)"
    click.echo(f"Serving {entry.get('target')} on {kind} port {port}: {where}")
    if entry.get("error"):
        click.echo(f"  note: {entry['error']}")
    if bg:
        click.echo(f"In the background; `meshnode serve --{kind} {port} --off` stops it.")
        return
    import signal
    sigs = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)  # taken by sigwait below, never lost in between
    click.echo("Press Ctrl+C to stop.")
    signal.sigwait(sigs)
    _call(ctx, "POST", "/serve/off", {"port": port})
    click.echo(f"Port {port} is no longer served.")


# -- netcheck ------------------------------------------------------------------------------------

def _ago(when: float | None) -> str:
    if not when:
        return "never"
    secs = max(0, int(time.time() - when))
    return f"{secs}s ago" if secs < 120 else f"{secs // 60}m ago"


def format_netcheck(r: dict[str, Any]) -> str:
    """The human report of `meshnode netcheck`, in the shape of tailscale's."""
    lines = ["Report:"]
    if r.get("udp_port") is not None:
        lines.append(f"\t* UDP: port {r['udp_port']} on {r.get('interface') or '-'}")
    elif r.get("mode") == "dns-only":
        lines.append("\t* UDP: none (DNS-only mode: the daemon runs without --tun)")
    else:
        lines.append(f"\t* UDP: none (the tunnel is not running; state {r.get('backend_state')})")
    ep = r.get("endpoints") or {}
    local = ", ".join(ep.get("local") or []) or "-"
    at_control = ", ".join(ep.get("at_control") or []) or "-"
    lines.append(f"\t* Endpoints: {local} (the control server has: {at_control})")
    if ep.get("error"):
        lines.append(f"\t  ({ep['error']})")
    c = r.get("control") or {}
    if c.get("reachable"):
        pin = "; WARNING: its key differs from the pinned one" if c.get("key_matches_pin") is False else ""
        lines.append(f"\t* Control server: {c['url']} reachable in {c['latency_ms']:g}ms{pin}")
    else:
        lines.append(f"\t* Control server: {c.get('url') or '-'} NOT reachable: {c.get('error')}")
    peers = r.get("peers") or []
    lines.append("\t* Peers:" + ("" if peers else " none"))
    width = max((len(p["fqdn"]) for p in peers), default=0)
    for p in peers:
        known = ", ".join(p.get("endpoints_at_control") or []) or "no endpoint"
        if p.get("handshake") is None:
            state = f"handshake unknown (no tunnel); control has {known}"
        elif p["handshake"]:
            state = f"{p.get('path') or 'direct'} {p.get('endpoint') or '-'}, handshake {_ago(p['last_handshake'])}"
        else:
            state = f"no handshake yet; control has {known}"
        lines.append(f"\t    {p['fqdn'].ljust(width)}  {state}")
    from .netcheckrun import format_report  # STUN, relays, NAT and port mapping
    lines += format_report(r)
    return "\n".join(lines)


@click.command("netcheck")
@click.option("--timeout", type=click.FloatRange(0.1, 10), default=2.0, show_default=True,
              help="Seconds to wait for the control server to answer.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def netcheck_cmd(ctx: click.Context, timeout: float, as_json: bool) -> None:
    """Connectivity: the WireGuard UDP port, this node's endpoints, the control server, handshakes,
    and as Tailscale's netcheck: UDP, global addresses, the NAT's kind, port mapping, relay latency."""
    with _api_errors():
        report = _client(ctx, timeout + 30).netcheck(timeout)
    click.echo(json.dumps(report, indent=2) if as_json else format_netcheck(report))


# -- dns -----------------------------------------------------------------------------------------

@click.group("dns")
def dns_group() -> None:
    """The node's MagicDNS resolver."""


@dns_group.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def dns_status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Resolver listeners, map version, routes, and the system resolver's configuration."""
    st = _call(ctx, "GET", "/dns/status")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    r, o = st["resolver"], st["os"]
    server = r.get("server") or {}
    view = server.get("view") or {}
    click.echo(f"MagicDNS: {'running' if r['running'] else 'stopped'}"
               f" on {', '.join(server.get('listeners') or r['addresses']) or '-'}")
    click.echo(f"  tailnet: {view.get('domain') or '-'}  map version: {view.get('version', '-')}"
               f"  hosts: {view.get('hosts', 0)}  records: {view.get('records', 0)}")
    for suffix, target in (server.get("routes") or {}).items():
        click.echo(f"  route {suffix}: {target if isinstance(target, str) else ', '.join(target) or '-'}")
    click.echo(f"  forwarding to: {', '.join(r['forwarding_to']) or '-'}")
    _echo_encrypted(server.get("encrypted"), st.get("tls") or {})
    click.echo(f"System DNS: accept-dns={'true' if st['accept_dns'] else 'false'}, {o['mode']} {o['target']}:"
               f" {'configured' if o['active'] else 'not configured'}")
    if o["drift"] != "intact":
        click.echo(f"  WARNING: {o['target']} was {o['drift']} by another program")
    click.echo(f"  original nameservers: {', '.join(o['original_nameservers']) or '-'}")


def _echo_encrypted(enc: dict[str, Any] | None, tls: dict[str, Any]) -> None:
    """The DoT/DoH lines of `dns status`: listeners, certificate names and expiry, or why not serving."""
    if not enc and not tls.get("certificate"):
        return
    enc = enc or {}
    served = (enc.get("certificate") or {})
    listening = ", ".join(enc.get("listeners") or [])
    if served.get("state") and served["state"] != "valid":
        listening = f"not serving ({served['state']})"
    click.echo(f"Encrypted DNS: {listening or 'not listening (waiting for a certificate)'}")
    cert = tls.get("certificate")
    if cert:
        click.echo(f"  certificate: {', '.join(cert['dns_names'] + cert['ip_addresses'])}")
        click.echo(f"  expires: {cert['not_after']}" + ("" if tls.get("serving") else "  (EXPIRED: not served)"))
    if tls.get("error"):
        click.echo(f"  WARNING: {tls['error']}")
    if enc.get("bind_error"):
        click.echo(f"  WARNING: {enc['bind_error']}")


def format_answer(ans: dict[str, Any]) -> str:
    flags = [f for f, on in (ans.get("flags") or {}).items() if on]
    lines = [f"status: {ans.get('rcode', '?')}" + (f"  flags: {' '.join(flags)}" if flags else "")]
    for section in ("answer", "authority", "additional"):
        for rr in ans.get(section) or []:
            lines.append(f"{rr.get('name')}\t{rr.get('ttl')}\tIN\t{rr.get('type')}\t{rr.get('value')}")
    return "\n".join(lines)


@dns_group.command("query")
@click.argument("name")
@click.argument("qtype", required=False)
@click.option("-x", "reverse", is_flag=True, help="NAME is an IP address: ask for its PTR name.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def dns_query_cmd(ctx: click.Context, name: str, qtype: str | None, reverse: bool, as_json: bool) -> None:
    """Resolve NAME (type A by default) through the node's resolver; an IP address (or -x IP) asks
    for its PTR name."""
    from magicdns.cli import question_for

    name, qtype = question_for(name, qtype, reverse)
    if qtype.upper() not in QUERY_TYPES:
        raise click.UsageError(f"TYPE must be one of {', '.join(sorted(QUERY_TYPES))}")
    ans = _call(ctx, "POST", "/dns/query", {"name": name, "type": qtype.upper()})
    click.echo(json.dumps(ans, indent=2) if as_json else format_answer(ans))


@click.command("cert")
@click.argument("name", required=False)
@click.option("--ca", "show_ca", is_flag=True, help="Print the tailnet CA certificate (PEM).")
@click.option("--install-ca", is_flag=True, help="Add the tailnet CA to the system trust store (Debian).")
@click.option("--uninstall-ca", is_flag=True, help="Remove the tailnet CA from the system trust store.")
@click.option("--cert-file", type=click.Path(dir_okay=False), default=None, help="Where to write the certificate [NAME.crt].")
@click.option("--key-file", type=click.Path(dir_okay=False), default=None, help="Where to write the key [NAME.key].")
@click.option("--trust-dir", type=click.Path(file_okay=False, path_type=Path), default=None, hidden=True)
@click.option("--update-command", default=None, hidden=True, help="Trust store rebuild command (tests).")
@click.pass_context
def cert_cmd(ctx: click.Context, name: str | None, show_ca: bool, install_ca: bool, uninstall_ca: bool,
             cert_file: str | None, key_file: str | None, trust_dir: Path | None, update_command: str | None) -> None:
    """Certificates from the tailnet CA: NAME.crt/NAME.key for this node's name, or the CA itself."""
    import shlex

    from ..control import ca as tailnet_ca
    from ..node.atomicfile import atomic_write
    from .cert import DEBIAN_TRUST_DIR, TrustStore, TrustStoreError

    if sum([show_ca, install_ca, uninstall_ca, name is not None]) != 1:
        raise click.UsageError("give exactly one of NAME, --ca, --install-ca, --uninstall-ca")
    store = TrustStore(trust_dir or DEBIAN_TRUST_DIR,
                       tuple(shlex.split(update_command)) if update_command else ("update-ca-certificates",))
    if name is not None:
        key = tailnet_ca.new_key_pem()  # made here: the key never passes through the daemon
        ans = _call(ctx, "POST", "/cert", {"csr": tailnet_ca.make_csr(key, name), "name": name})
        crt_path, key_path = cert_file or f"{name}.crt", key_file or f"{name}.key"
        try:
            atomic_write(key_path, key, 0o600)
            atomic_write(crt_path, ans["cert"], 0o644)
        except OSError as exc:
            raise click.ClickException(f"cannot write {exc.filename}: {exc.strerror}") from None
        info = tailnet_ca.cert_info(ans["cert"])
        click.echo(f"Wrote certificate to {crt_path}\nWrote private key to {key_path}\n"
                   f"  names: {', '.join(info.dns_names + info.ip_addresses)}\n  expires: {info.to_json()['not_after']}")
        return
    ans = _call(ctx, "GET", "/cert/ca")
    if show_ca:
        click.echo(ans["ca"], nl=False)
        return
    domain = ans.get("domain") or "tailnet"
    try:
        if install_ca:
            path = store.install(ans["ca"], domain)
            click.echo(f"Installed the tailnet CA for {domain} as {path}")
        else:
            gone = store.uninstall(domain)
            click.echo(f"Removed {gone}" if gone else f"The tailnet CA for {domain} was not installed")
    except (TrustStoreError, tailnet_ca.CertError) as exc:
        raise click.ClickException(str(exc)) from None


def register_node_commands(group: click.Group) -> None:
    """Attach the node's commands to the top-level `meshnode` group."""
    for cmd in (daemon_cmd, up_cmd, set_cmd, down_cmd, logout_cmd, status_cmd, ip_cmd, ping_cmd, netcheck_cmd,
                whois_cmd, version_cmd, serve_cmd, dns_group, cert_cmd):
        group.add_command(cmd if cmd is daemon_cmd else socket_options(cmd))
