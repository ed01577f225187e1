"""The `magicdns` command: serve, records, query, status (DESIGN.md section 2).

Exit codes: 0 success, 1 failure (a server not running, a store that cannot be opened), 2 bad usage
or bad input (a bad name, type, value or TTL) — and on exit code 2 nothing has been written.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from .forward import ForwardingLoopError, reject_self
from .names import NameError_, normalize_domain
from .records import Record, RecordError, parse_record
from .store import (CnameConflict, DuplicateRecord, RecordNotFound, RecordStore, RRsetTooLarge, ShadowsNode,
                    StoreError)
from .sysresolv import read_original_resolvers
from .upstream import Upstream, UpstreamError, parse_upstream
from .view import DEFAULT_DOMAIN, DnsSettings, DnsView, ViewError

DEFAULT_DB = os.environ.get("MAGICDNS_DB", "/var/lib/magicdns/records.db")
DEFAULT_SOCKET = os.environ.get("MAGICDNS_CONTROL_SOCKET", "/run/magicdns/magicdns.sock")


def fail_usage(message: str) -> NoReturn:
    click.echo(f"magicdns: {message}", err=True)
    sys.exit(2)


def fail(message: str) -> NoReturn:
    click.echo(f"magicdns: {message}", err=True)
    sys.exit(1)


def parse_hostport(text: str, default_port: int = 53) -> tuple[str, int]:
    """'127.0.0.1:53', '[::1]:5353', '::1' or '127.0.0.1' -> (host, port)."""
    try:
        up = parse_upstream(text)
    except UpstreamError as exc:
        raise click.BadParameter(str(exc)) from None
    if up.encrypted:
        raise click.BadParameter(f"{text!r}: expected an IP address with an optional :PORT")
    explicit = "]:" in text or text.count(":") == 1
    return up.host, up.port if explicit else default_port


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """magicdns: the tailnet's authoritative resolver and forwarder."""


# -- serve ---------------------------------------------------------------------------------------

@main.command()
@click.option("--listen", "listens", multiple=True, default=["127.0.0.1:53"], show_default=True,
              help="HOST:PORT to answer on (UDP and TCP); repeat for more.")
@click.option("--view", "view_path", type=click.Path(dir_okay=False), help="JSON network view, reloaded on change.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False), help="Records store (SQLite).")
@click.option("--upstream", "upstreams", multiple=True,
              help="Global nameserver HOST[:PORT]; repeat for more. A host name is resolved at start "
                   "through the system's original resolvers, never through us.")
@click.option("--route", "routes", multiple=True, help="Split route DOMAIN=HOST[:PORT][,HOST...]; DOMAIN= is local-only.")
@click.option("--domain", default=None, help=f"Tailnet domain (default: the view's, else {DEFAULT_DOMAIN}).")
@click.option("--allow", "allows", multiple=True,
              help="CIDR allowed to query; repeat for more. Default: loopback and the tailnet ranges.")
@click.option("--tcp-idle-timeout", default=10.0, show_default=True, help="Seconds before an idle TCP client is closed.")
@click.option("--max-tcp-connections", default=512, show_default=True, help="TCP clients served at once.")
@click.option("--max-forward-qps", default=0, show_default=True, type=click.IntRange(0),
              help="New upstream queries a second (0: no limit); over it, SERVFAIL (or a stale answer) at once.")
@click.option("--control-socket", default=DEFAULT_SOCKET, show_default=True, help="Unix socket for `magicdns status`.")
@click.option("--metrics", default=None, help="HOST:PORT to serve Prometheus metrics on.")
@click.option("--query-log", default=None, help="Log every query to FILE ('-' for stderr).")
@click.option("--resolv-conf", default="/etc/resolv.conf", show_default=True,
              help="Where the system's resolvers are read from when no upstream is given.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Processes sharing the listeners (SO_REUSEPORT); status shows the first one's counters.")
@click.option("--udp-batch/--no-udp-batch", default=True, show_default=True,
              help="Move UDP datagrams in batches (recvmmsg/sendmmsg) where the platform allows.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--dot", "dots", multiple=True, help="HOST[:PORT] to serve DNS over TLS on (default port 853); repeat for more.")
@click.option("--doh", "dohs", multiple=True,
              help="HOST[:PORT] to serve DNS over HTTPS (/dns-query, HTTP/2 and 1.1) on (default port 443).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="PEM certificate (chain) for --dot/--doh; re-read on change.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key for --tls-cert.")
@click.option("--upstream-ca", "upstream_cas", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="CA file trusted for tls:// and https:// upstreams besides the system store; repeatable.")
@click.option("--upgrade-public-dns/--no-upgrade-public-dns", default=False, show_default=True,
              help="Send queries for well-known public resolvers (1.1.1.1, 8.8.8.8, 9.9.9.9, Mullvad) over "
                   "their DNS-over-HTTPS endpoint, with plain DNS raced behind it.")
@click.option("--bootstrap-dns", "bootstraps", multiple=True,
              help="Resolver IP[:PORT] for the names in tls://NAME and https://NAME/ upstreams; repeatable. "
                   "Default: the system's original resolvers (never us).")
def serve(listens: tuple[str, ...], view_path: str | None, db_path: str | None, upstreams: tuple[str, ...],
          routes: tuple[str, ...], domain: str | None, allows: tuple[str, ...], tcp_idle_timeout: float,
          max_tcp_connections: int, max_forward_qps: int, control_socket: str,
          metrics: str | None, query_log: str | None, resolv_conf: str, workers: int, udp_batch: bool, log_level: str,
          dots: tuple[str, ...] = (), dohs: tuple[str, ...] = (), tls_cert: str | None = None,
          tls_key: str | None = None, upstream_cas: tuple[str, ...] = (), bootstraps: tuple[str, ...] = (),
          upgrade_public_dns: bool = False) -> None:
    """Run the resolver standalone."""
    logging.basicConfig(level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server import DEFAULT_ALLOW, ServerConfig
    from .stub import StubError, resolve_upstreams_sync
    from .watch import ViewSource

    listen = tuple(parse_hostport(item) for item in listens)
    own = tuple(Upstream(h, p) for h, p in listen)
    try:
        # A name is resolved by the stub resolver against the system's original resolvers: /etc/resolv.conf
        # may already point at us, and we do not answer yet.
        ups = reject_self(resolve_upstreams_sync(upstreams, resolv_conf=resolv_conf, own_addresses=own), own)
        route_map = _parse_routes(routes, own)
        bootstrap = reject_self((_plain_upstream(b, "--bootstrap-dns") for b in bootstraps), own)
        dom = normalize_domain(domain) if domain else None
        allow = tuple(ipaddress.ip_network(a, strict=False) for a in allows) or DEFAULT_ALLOW
    except (UpstreamError, ForwardingLoopError, NameError_) as exc:
        fail_usage(str(exc))
    except StubError as exc:
        fail(f"--upstream: {exc}")
    except ValueError as exc:
        fail_usage(f"--allow: {exc}")
    fallback = read_original_resolvers(resolv_conf, own_addresses=own) if not ups else ()
    try:
        store = RecordStore(db_path, dom or DEFAULT_DOMAIN) if db_path else None
        if store is not None:  # so `records add` knows this view's node names without --view
            store.set_served_view(os.path.abspath(view_path) if view_path else None)
        source = ViewSource(view_path, store, dom)
        view = _with_overrides(source.load(), ups, route_map)
    except (ViewError, StoreError) as exc:
        fail_usage(str(exc))
    metrics_addr = parse_hostport(metrics, 9153) if metrics else None
    encrypted = _encrypted_config(dots, dohs, tls_cert, tls_key)
    config = ServerConfig(listen=listen, allow=allow, fallback_upstreams=fallback, query_log=query_log,
                          reuse_port=workers > 1, tcp_idle_timeout=tcp_idle_timeout,
                          max_tcp_connections=max_tcp_connections, batch_udp=udp_batch,
                          max_forward_qps=max_forward_qps, encrypted=encrypted, upstream_ca=upstream_cas,
                          bootstrap_dns=bootstrap, resolv_conf=resolv_conf, upgrade_public_dns=upgrade_public_dns)
    if workers > 1 and any(p == 0 for _, p in listen):
        fail_usage("--workers needs fixed ports (port 0 would give each worker its own)")
    if _fork_workers(workers - 1):
        control_socket, metrics_addr = None, None  # a worker: the first process answers operators
    try:
        _run(_serve(config, view, source, ups, route_map, control_socket, metrics_addr))
    except KeyboardInterrupt:
        pass


def _plain_upstream(text: str, option: str) -> Upstream:
    up = parse_upstream(text)
    if up.encrypted:
        raise UpstreamError(f"{option} {text!r}: a plain resolver IP[:PORT] (it resolves the names of the encrypted ones)")
    return up


def _encrypted_config(dots: tuple[str, ...], dohs: tuple[str, ...], cert: str | None, key: str | None):  # type: ignore[no-untyped-def]
    """--dot/--doh/--tls-cert/--tls-key as an EncryptedConfig (usage errors exit 2)."""
    from .encrypted import EncryptedConfig
    if (dots or dohs) and not (cert and key):
        fail_usage("--dot and --doh need --tls-cert and --tls-key")
    if (cert or key) and not (dots or dohs):
        fail_usage("--tls-cert/--tls-key are for --dot or --doh; give one of them")
    return EncryptedConfig(dot=tuple(_listen_addr(d, 853) for d in dots),
                           doh=tuple(_listen_addr(d, 443) for d in dohs), cert_file=cert, key_file=key)


def _listen_addr(text: str, default_port: int) -> tuple[str, int]:
    """HOST, HOST:PORT, [V6] or [V6]:PORT; port 0 picks a free port (shown by `magicdns status`)."""
    host, port = text, str(default_port)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
        value = int(port)
        if not 0 <= value <= 65535:
            raise ValueError(port)
    except ValueError:
        fail_usage(f"{text!r}: expected an IP address with an optional :PORT")
    return host, value


def _fork_workers(count: int) -> bool:
    """Fork `count` worker processes; returns True in a worker. Workers die with their parent."""
    import ctypes

    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            except (OSError, AttributeError):
                pass
            return True
    return False


def _parse_routes(routes: tuple[str, ...], own: tuple[Upstream, ...]) -> dict[str, tuple[Upstream, ...]]:
    out: dict[str, tuple[Upstream, ...]] = {}
    for item in routes:
        if "=" not in item:
            raise UpstreamError(f"--route {item!r}: expected DOMAIN=HOST[:PORT][,HOST...]")
        dom, _, hosts = item.partition("=")
        out[normalize_domain(dom)] = reject_self(
            (parse_upstream(h) for h in hosts.split(",") if h.strip()), own)
    return out


def _with_overrides(view: DnsView, ups: tuple[Upstream, ...],
                    routes: dict[str, tuple[Upstream, ...]]) -> DnsView:
    """Command-line upstreams replace the view's nameservers; command-line routes add to its routes."""
    if not ups and not routes:
        return view
    dns = DnsSettings(nameservers=ups or view.dns.nameservers, routes={**view.dns.routes, **routes},
                      search_domains=view.dns.search_domains, records=view.dns.records,
                      upgrade_public_dns=view.dns.upgrade_public_dns)
    return DnsView(view.domain, view.self_host, view.peers, dns, view.version)


def _run(coro: Any) -> None:
    try:
        import uvloop
        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


async def _serve(config: Any, view: DnsView, source: Any, ups: tuple[Upstream, ...],
                 routes: dict[str, tuple[Upstream, ...]], control_socket: str | None,
                 metrics: tuple[str, int] | None) -> None:
    from .metrics import make_app, start_api
    from .server import DnsServer, ServerError
    from .watch import watch

    server = DnsServer(config)
    try:
        await server.start(view)
    except ServerError as exc:
        fail(str(exc))
    runner = None
    try:
        runner = await start_api(make_app(server), control_socket, metrics)
    except OSError as exc:
        logging.getLogger("magicdns").warning("control socket/metrics not available: %s", exc)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def apply(new: DnsView) -> None:
        await server.set_view_async(_with_overrides(new, ups, routes))

    watcher = asyncio.create_task(watch(source, apply))
    click.echo(f"magicdns: serving {view.domain} (view {view.version}) on "
               + ", ".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in server.bound), err=True)
    await stop.wait()
    watcher.cancel()
    if runner is not None:
        await runner.cleanup()
    await server.stop()


# -- records -------------------------------------------------------------------------------------

@main.group()
@click.option("--db", "db_path", default=DEFAULT_DB, show_default=True, type=click.Path(dir_okay=False),
              help="Records store (the standalone resolver's, or the control server's database).")
@click.option("--domain", default=os.environ.get("MAGICDNS_DOMAIN", DEFAULT_DOMAIN), show_default=True,
              help="Tailnet domain that relative names are completed with.")
@click.option("--view", "view_path", default=os.environ.get("MAGICDNS_VIEW"), type=click.Path(dir_okay=False),
              help="A network view whose node names are taken (default: the view of the server using --db).")
@click.pass_context
def records(ctx: click.Context, db_path: str, domain: str, view_path: str | None) -> None:
    """Manage admin-defined records."""
    try:
        dom = normalize_domain(domain)
    except NameError_ as exc:
        fail_usage(f"--domain: {exc}")
    ctx.obj = {"db": db_path, "domain": dom, "view": view_path}


def _view_node_names(ctx: click.Context, store: RecordStore) -> set[str]:
    """Names of the nodes of the view given by --view, else of the view the server using this store
    loads (the store knows a control database's nodes itself)."""
    names: set[str] = set()
    path = ctx.obj.get("view") or store.served_view()
    if path:
        from .view import load_view
        try:
            view = load_view(path)
        except ViewError as exc:
            if ctx.obj.get("view"):
                fail_usage(f"--view: {exc}")
            # the server's view moved or broke since it started: its names are unknown, say so
            click.echo(f"magicdns: cannot read the served view to check node names: {exc}", err=True)
            return names
        names |= {f"{h.name}.{view.domain}" for h in view.hosts}
    return names



def _store(ctx: click.Context) -> RecordStore:
    try:
        return RecordStore(ctx.obj["db"], ctx.obj["domain"])
    except StoreError as exc:
        fail(str(exc))


@records.command("add")
@click.argument("name")
@click.argument("rtype", metavar="TYPE")
@click.argument("value", nargs=-1, required=True)
@click.option("--ttl", default=None, help="Seconds (default 300).")
@click.option("--override", is_flag=True, help="Let this record shadow a node of the same name.")
@click.pass_context
def records_add(ctx: click.Context, name: str, rtype: str, value: tuple[str, ...], ttl: str | None,
                override: bool) -> None:
    """Add a record: NAME TYPE VALUE (VALUE in zone-file presentation format)."""
    try:
        rec = parse_record(name, rtype, " ".join(value), ttl, ctx.obj["domain"], override)
    except RecordError as exc:
        fail_usage(str(exc))
    store = _store(ctx)
    try:
        store.add(rec, _view_node_names(ctx, store))
    except (DuplicateRecord, CnameConflict, RRsetTooLarge, ShadowsNode) as exc:
        fail_usage(str(exc))
    except StoreError as exc:
        fail(str(exc))
    click.echo(f"added {rec.name} {rec.ttl} {rec.rtype} {rec.value}")


@records.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def records_ls(ctx: click.Context, as_json: bool) -> None:
    """List records."""
    recs = _store(ctx).list()
    if as_json:
        click.echo(json.dumps([r.to_json() for r in recs], indent=2))
        return
    if not recs:
        click.echo("no records")
        return
    width = max(len(r.name) for r in recs)
    click.echo(f"{'NAME':<{width}}  {'TTL':>6}  {'TYPE':<5}  VALUE")
    for r in recs:
        click.echo(f"{r.name:<{width}}  {r.ttl:>6}  {r.rtype:<5}  {r.value}" + ("  (override)" if r.override else ""))


@records.command("rm")
@click.argument("name")
@click.argument("rtype", metavar="[TYPE]", required=False)
@click.argument("value", nargs=-1)
@click.pass_context
def records_rm(ctx: click.Context, name: str, rtype: str | None, value: tuple[str, ...]) -> None:
    """Remove records: all of NAME, those of one TYPE, or one VALUE."""
    store = _store(ctx)
    try:
        count = store.remove(name, rtype, " ".join(value) if value else None)
    except RecordError as exc:
        fail_usage(str(exc))
    except RecordNotFound as exc:
        fail(str(exc))
    click.echo(f"removed {count} record{'s' if count != 1 else ''}")


def read_records_file(text: str, domain: str, source: str) -> list[Record]:
    """Records from JSON (a list, or {"records": [...]}) or zone-style lines `NAME [TTL] [IN] TYPE VALUE`.

    Every record is checked before any is returned; the first bad one raises RecordError naming its line.
    """
    stripped = text.lstrip()
    out: list[Record] = []
    if stripped.startswith("[") or stripped.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{source}: not valid JSON: {exc}") from None
        items = data.get("records") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise RecordError(f"{source}: expected a list of records")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise RecordError(f"{source}: record {i + 1}: expected an object")
            try:
                out.append(parse_record(str(item.get("name", "")), str(item.get("type", "")),
                                        str(item.get("value", "")), item.get("ttl"), domain,
                                        bool(item.get("override", False))))
            except RecordError as exc:
                raise RecordError(f"{source}: record {i + 1}: {exc}") from None
        return out
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        body, comment = split_comment(line)
        if not body:
            continue
        override = comment.strip() == OVERRIDE_COMMENT[1:].strip()
        fields = body.split(None, 1)
        if len(fields) < 2:
            raise RecordError(f"{source}:{lineno}: expected NAME [TTL] [IN] TYPE VALUE")
        name, rest = fields
        ttl = None
        parts = rest.split(None, 1)
        if parts and parts[0].isdigit():
            ttl, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            parts = rest.split(None, 1)
        if parts and parts[0].upper() == "IN":
            rest = parts[1] if len(parts) > 1 else ""
            parts = rest.split(None, 1)
        if len(parts) < 2:
            raise RecordError(f"{source}:{lineno}: expected NAME [TTL] [IN] TYPE VALUE")
        try:
            out.append(parse_record(name, parts[0], parts[1], ttl, domain, override))
        except RecordError as exc:
            raise RecordError(f"{source}:{lineno}: {exc}") from None
    return out


OVERRIDE_COMMENT = "; override"


def split_comment(line: str) -> tuple[str, str]:
    """A zone-file line split at its first `;` outside quotes and escapes: (body, comment)."""
    quoted = escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            return line[:i].strip(), line[i + 1:]
    return line.strip(), ""


@records.command("import")
@click.argument("path", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--replace", is_flag=True, help="Replace every stored record with the file's.")
@click.pass_context
def records_import(ctx: click.Context, path: str, replace: bool) -> None:
    """Import records from a JSON or zone-style file ('-' for stdin), all or nothing."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        fail_usage(f"{path}: {exc.strerror}")
    try:
        recs = read_records_file(text, ctx.obj["domain"], path)
    except RecordError as exc:
        fail_usage(str(exc))
    store = _store(ctx)
    try:
        added = store.import_records(recs, replace=replace, node_names=_view_node_names(ctx, store))
    except (CnameConflict, RRsetTooLarge, ShadowsNode) as exc:
        fail_usage(f"{path}: {exc}; nothing was imported")
    except StoreError as exc:
        fail(str(exc))
    click.echo(f"imported {added} record{'s' if added != 1 else ''}"
               + (f" ({len(recs) - added} already present)" if len(recs) != added else ""))


@records.command("export")
@click.option("--format", "fmt", type=click.Choice(["json", "zone"]), default="json", show_default=True)
@click.pass_context
def records_export(ctx: click.Context, fmt: str) -> None:
    """Print every record, in a form `records import` reads back."""
    recs = _store(ctx).list()
    if fmt == "json":
        click.echo(json.dumps([r.to_json() for r in recs], indent=2))
    else:
        for r in recs:  # the override flag has no zone-file field: a comment that import reads back
            click.echo(f"{r.name}. {r.ttl} IN {r.rtype} {r.value}" + (f" {OVERRIDE_COMMENT}" if r.override else ""))


# -- query and status ----------------------------------------------------------------------------

def question_for(name: str, qtype: str | None, reverse: bool) -> tuple[str, str]:
    """What to ask for NAME [TYPE]: an IP address (or -x) means its PTR name, as `dig -x` does;
    otherwise the name as given, type A by default. Raises click.UsageError for -x without an IP."""
    try:
        addr = ipaddress.ip_address(name.strip().strip("[]"))
    except ValueError:
        if reverse:
            raise click.UsageError(f"-x needs an IP address, not {name!r}") from None
        return name, (qtype or "A")
    return addr.reverse_pointer, (qtype or "PTR")


@main.command()
@click.argument("name")
@click.argument("qtype", required=False, metavar="[TYPE]")
@click.option("-x", "reverse", is_flag=True, help="NAME is an IP address: ask for its PTR name.")
@click.option("--server", default="127.0.0.1:53", show_default=True, help="HOST[:PORT] to ask.")
@click.option("--tcp", is_flag=True, help="Ask over TCP.")
@click.option("--timeout", default=3.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def query(name: str, qtype: str | None, reverse: bool, server: str, tcp: bool, timeout: float,
          as_json: bool) -> None:
    """Ask a resolver (this one by default) a question and print the answer. An IP address (or -x IP)
    asks for its PTR name."""
    from dnslib import EDNS0, QTYPE, DNSRecord

    from .server import reply_to_json

    name, qtype = question_for(name, qtype, reverse)
    host, port = parse_hostport(server)
    try:
        getattr(QTYPE, qtype.upper())
        q = DNSRecord.question(name, qtype.upper())
    except Exception:
        fail_usage(f"unknown type {qtype!r}")
    q.add_ar(EDNS0(udp_len=1232))
    try:
        reply = q.send(host, port, tcp=tcp, timeout=timeout, ipv6=":" in host)
        result = reply_to_json(reply)
        if result["flags"]["tc"] and not tcp:
            result = reply_to_json(q.send(host, port, tcp=True, timeout=timeout, ipv6=":" in host))
    except OSError as exc:
        fail(f"no answer from {server}: {exc}")
    _print_answer(result, as_json)


def _print_answer(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    flags = " ".join(k for k, v in result["flags"].items() if v)
    click.echo(f"status: {result['rcode']}  flags: {flags}")
    for section in ("answer", "authority", "additional"):
        for rr in result[section]:
            click.echo(f"{section[:3].upper()}  {rr['name']}  {rr['ttl']}  {rr['type']}  {rr['value']}")


def _api_get(socket_path: str, path: str) -> dict[str, Any]:
    import http.client
    import socket as socketmod

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
            self.sock.settimeout(5)
            self.sock.connect(socket_path)

    try:
        conn = UnixConnection("localhost")
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        fail(f"cannot reach the server at {socket_path}: {exc.strerror or exc} (is `magicdns serve` running?)")
    data = json.loads(body)
    if resp.status != 200:
        fail(data.get("error", f"HTTP {resp.status}"))
    return data


@main.command()
@click.option("--control-socket", default=DEFAULT_SOCKET, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def status(control_socket: str, as_json: bool) -> None:
    """Show a running server's listeners, view, routes, upstream health and counters."""
    s = _api_get(control_socket, "/status")
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    v = s["view"]
    click.echo(f"listening   {', '.join(s['listeners'])}")
    click.echo(f"view        {v['domain']} version {v['version']}: {v['hosts']} hosts, {v['records']} records")
    for w in v.get("warnings", []):
        click.echo(f"  warning   {w}")
    click.echo("routes")
    for dom, target in s["routes"].items():
        click.echo(f"  {dom:<28} {'local (authoritative)' if target == 'local' else ', '.join(target) or '(none)'}")
    fwd = s["forwarder"]
    if fwd.get("upstreams"):
        click.echo("upstreams")
        for up, h in fwd["upstreams"].items():
            click.echo(f"  {up:<28} sent {h['sent']}  answered {h['answered']}  timeouts {h['timeouts']}  "
                       f"servfail {h['servfail']}  srtt {h['srtt_ms']} ms"
                       + (f"  last error: {h['last_error']}" if h.get("last_error") else ""))
    q = s["queries"]
    click.echo(f"queries     udp {q['udp']}  tcp {q['tcp']}  local {q['answered_fast'] + q['answered_slow']}  "
               f"forwarded {q['forwarded']}  cached {q['cache_answers']}  refused clients {q['refused_clients']}")
    enc = s.get("encrypted")
    if enc:
        click.echo(f"encrypted   {', '.join(enc['listeners']) or '(not listening: ' + ', '.join(enc['wanted']) + ')'}")
        cert = enc.get("certificate") or {}
        if cert:
            click.echo(f"  certificate {', '.join(cert['names'])}: {cert['state']}"
                       + (f", expires in {cert['expires_in_s'] // 3600} h" if cert.get("expires_in_s") is not None else "")
                       + (f"  error: {cert['error']}" if cert.get("error") else ""))
        if enc.get("listeners"):
            click.echo(f"  connections {enc['connections']}  in handshake {enc.get('handshaking', 0)}  "
                       f"failed handshakes {enc.get('handshake_failures', 0)}")
    eu = fwd.get("encrypted_upstreams") or {}
    for name, info in sorted((eu.get("names") or {}).get("names", {}).items()):
        click.echo(f"  upstream name {name}: {', '.join(info['addresses'])} (fresh for {info['fresh_for_s']} s)")
    if eu.get("upgraded_doh_answers") or eu.get("upgraded_plain_answers"):
        click.echo(f"  public DNS upgraded: answered over DoH {eu['upgraded_doh_answers']}, "
                   f"over plain DNS behind it {eu['upgraded_plain_answers']}")
    c = fwd.get("cache", {})
    if c:
        click.echo(f"cache       {c['entries']} entries, {c['bytes']} bytes, hits {c['hits']}, misses {c['misses']}, "
                   f"stale served {c['stale_served']}")


if __name__ == "__main__":
    main()
