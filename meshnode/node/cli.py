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
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import click

from magicdns.upstream import UpstreamError, parse_upstream

from .apitypes import QUERY_TYPES
from .localclient import DaemonNotRunning, LocalApiRefused, LocalClient
from .prefs import PrefsError, check_login_server, check_route, check_tag

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
    from .daemon import DaemonConfig, run_daemon
    from .dnsthread import DnsThreadError
    from .localapi import LocalApiError
    from .state import StateError
    from .apitypes import ApiError

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
    except ApiError as exc:
        raise click.ClickException(exc.message) from None


# -- up / down / logout --------------------------------------------------------------------------

@click.command("up")
@click.option("--login-server", default=None, help="Control server URL (needed the first time).")
@click.option("--authkey", default=None, help="Pre-auth key (needed to register a new node).")
@click.option("--hostname", default=None, help="Name to register with [default: the OS hostname].")
@_bool_option("--accept-dns", "Point the system resolver at MagicDNS [default: true].")
@_bool_option("--accept-routes", "Accept subnet routes advertised by other nodes.")
@click.option("--advertise-routes", multiple=True, metavar="CIDR,...", help="Subnets to offer to the tailnet.")
@_bool_option("--advertise-exit-node", "Offer this node as an exit node.")
@click.option("--exit-node", default=None, metavar="NAME|IP", help="Send internet traffic through this peer.")
@click.option("--advertise-tags", multiple=True, metavar="tag:a,tag:b", help="Tags to request for this node.")
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True,
              help="Seconds to wait for the first network map.")
@click.option("--force-reauth", is_flag=True,
              help="Start over: new node key, re-pin the server key (needs --authkey).")
@click.option("--json", "as_json", is_flag=True, help="Print the resulting status as JSON.")
@click.pass_context
def up_cmd(ctx: click.Context, login_server: str | None, authkey: str | None, hostname: str | None,
           accept_dns: bool | None, accept_routes: bool | None, advertise_routes: tuple[str, ...],
           advertise_exit_node: bool | None, exit_node: str | None, advertise_tags: tuple[str, ...],
           timeout: float, force_reauth: bool, as_json: bool) -> None:
    """Connect to the tailnet (the first time with --authkey, or without one: log in in the browser)."""
    body: dict[str, Any] = {"timeout": timeout}
    if force_reauth:
        if not authkey:
            raise click.UsageError("--force-reauth needs --authkey")
        body["force_reauth"] = True
    try:
        if login_server is not None:
            body["login_server"] = check_login_server(login_server)
        if advertise_routes:
            body["advertise_routes"] = [check_route(r) for r in _split_csv(advertise_routes)]
        if advertise_tags:
            body["advertise_tags"] = [check_tag(t) for t in _split_csv(advertise_tags)]
    except PrefsError as exc:
        raise click.UsageError(str(exc)) from None
    if hostname is not None and not hostname.strip():
        raise click.UsageError("--hostname must not be empty")
    for key, value in (("authkey", authkey), ("hostname", hostname), ("accept_dns", accept_dns),
                       ("accept_routes", accept_routes), ("advertise_exit_node", advertise_exit_node),
                       ("exit_node", exit_node)):
        if value is not None:
            body[key] = value
    if authkey:
        status = _call(ctx, "POST", "/up", body, timeout=timeout + 30)
    else:
        status = _up_in_browser(ctx, body, timeout, as_json)
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        me = status.get("self") or {}
        click.echo(f"Connected as {me.get('fqdn', '?')} ({', '.join(me.get('addresses', []))})")


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
    if not peer.get("online"):
        return "offline"
    wg = peer.get("tunnel") or {}
    shook = wg.get("last_handshake")
    # WireGuard re-handshakes every 2 minutes while traffic flows: older means idle.
    if shook and time.time() - shook < 180 and wg.get("endpoint"):
        return f"active; direct {wg['endpoint']}"
    return "-"


def format_filter(filt: dict[str, Any]) -> str:
    """One line on the ACL packet filter: what it dropped and let in from the tunnel."""
    dropped, accepted = filt.get("dropped") or {}, filt.get("accepted") or {}
    reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in dropped.items() if n)
    return (f"# Packet filter: {sum(dropped.values())} dropped" + (f" ({reasons})" if reasons else "")
            + f", {sum(accepted.values())} accepted; {filt.get('rules', 0)} rules,"
            f" {filt.get('flows', 0)} tracked connections")


def format_status(st: dict[str, Any]) -> str:
    """The human table of `meshnode status`: one line per node, self first, like tailscale's."""
    state = st.get("backend_state")
    me = st.get("self")
    lines: list[str] = []
    if state in ("NeedsLogin", "Stopped") or me is None:
        lines.append({"NeedsLogin": "Logged out: run `meshnode up --login-server URL --authkey KEY`.",
                      "Stopped": "meshnode is stopped: run `meshnode up`."}.get(
                          state or "", f"State: {state}; no network map yet."))
    else:
        rows = [(me, "-")]
        rows += [(p, _peer_state(p)) for p in st.get("peers", [])]
        table = [((n.get("addresses") or ["-"])[0], n.get("name", "?"), _owner(n), n.get("os") or "-", s)
                 for n, s in rows]
        widths = [max(len(r[i]) for r in table) for i in range(4)]
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
        lines += [f"#     - {h}" for h in health]
    return "\n".join(lines)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Show this node and its peers: name, addresses, online, tags, OS."""
    st = _call(ctx, "GET", "/status")
    click.echo(json.dumps(st, indent=2) if as_json else format_status(st))


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
@click.pass_context
def ping_cmd(ctx: click.Context, peer: str, count: int, timeout: float) -> None:
    """Ping PEER over the tunnel (ICMP echo to its tailnet address)."""
    res = _call(ctx, "POST", "/ping", {"peer": peer, "count": count, "timeout": timeout},
                timeout=count * timeout + 30)
    name, addr = res["peer"].split(".")[0], res["address"]
    via = f" via {res['endpoint']}" if res.get("endpoint") else ""
    for rtt in res["replies_ms"]:
        click.echo(f"pong from {name} ({addr}){via} in {rtt:g}ms" if rtt is not None
                   else f"timeout waiting for pong from {name} ({addr})")
    if all(r is None for r in res["replies_ms"]):
        raise click.ClickException(f"no reply from {name} ({addr})")


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
    return "\n".join(lines)


@click.command("netcheck")
@click.option("--timeout", type=click.FloatRange(0.1, 10), default=2.0, show_default=True,
              help="Seconds to wait for the control server to answer.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def netcheck_cmd(ctx: click.Context, timeout: float, as_json: bool) -> None:
    """Connectivity: the WireGuard UDP port, this node's endpoints, the control server, handshakes."""
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
@click.argument("qtype", required=False, default="A")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def dns_query_cmd(ctx: click.Context, name: str, qtype: str, as_json: bool) -> None:
    """Resolve NAME (type A by default) through the node's resolver."""
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
    for cmd in (daemon_cmd, up_cmd, down_cmd, logout_cmd, status_cmd, ip_cmd, ping_cmd, netcheck_cmd,
                dns_group, cert_cmd):
        group.add_command(cmd if cmd is daemon_cmd else socket_options(cmd))
