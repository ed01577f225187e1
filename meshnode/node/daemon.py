"""The node daemon: ties the state directory, the control client, the resolver, the OS DNS
configurator and the LocalAPI together, and owns the node's lifecycle (up, down, logout).

One asyncio loop (this module's) runs the control client, the LocalAPI and the state writes; the
resolver runs on its own loop thread (dnsthread.py) and only receives finished views. The data plane
(WireGuard, router) is not here yet: `--userspace` (or no `--tun`) is the DNS-only mode, and a tunnel
will plug in where `_go_up`/`_go_down` place and remove the service addresses.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import enum
import ipaddress
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from magicdns.encrypted import EncryptedConfig
from magicdns.server import DnsServer, ServerConfig
from magicdns.upstream import Upstream
from magicdns.view import DnsView

from ..control import ca as tailnet_ca
from ..control.client import ControlClient, ControlError
from ..control.protocol import ErrorCode
from ..words import control_failure, control_unreachable, in_words
from ..netmap import JsonBuilder, MapNode, NetMap, NetMapError, ViewBuilder
from .errors import (ControlFailed, ControlRefused, InvalidRequest, NotFound, NotReady, SystemFailure,
                     TimedOut)
from .flowlog import FlowLogger
from .lock import LockService
from .apitypes import (IpRequest, NetcheckRequest, PingRequest, QueryRequest, ServeRequest,
                       UpRequest, WhoisRequest)
from .cert import RECHECK as CERT_RECHECK, NodeCertificates, renewal_delay
from .dnsthread import DnsThread, DnsThreadError
from .iface import DNS_V4, DNS_V6, DUMMY_NAME, LOOPBACK, InterfaceError, ServiceAddresses
from .osdns import (OsDnsConfigurator, OsDnsError, ResolvConfConfigurator, ResolvedConfigurator,
                    resolved_in_use)
from .prefs import SETTABLE, Prefs, PrefsError
from .resolvconf import Drift, OsDnsConfig, forwarding_upstreams
from .serve import (Caller, Kind, NoCertificate, ServeConfig, ServeEntry, ServeError, ServeRunner,
                    certificate_problem, load_config, save_config)
from .state import IdentityDamaged, StateDir
from .netcheckrun import NodeConnectivity, probe_control
from .router import Router, RouterError, control_addresses, local_networks, plan_routing
from .tunnel import DEFAULT_PORT, Tunnel, TunnelError, TunnelStatus

log = logging.getLogger("meshnode.node.daemon")

DEFAULT_STATE_DIR = Path("/var/lib/meshnode")
DEFAULT_SOCKET = Path("/run/meshnode/meshnode.sock")
SYSTEM_RESOLV_CONF = Path("/etc/resolv.conf")
ENDPOINT_POLL = 1.0  # seconds between looks at this node's endpoints (a change is reported within)
BROWSER_LOGIN_WAIT = 600.0  # `meshnode up` without a key waits this long for someone to confirm the URL


class BackendState(enum.Enum):
    """Where the node is in its lifecycle; names follow Tailscale's so habits carry over."""

    NEEDS_LOGIN = "NeedsLogin"  # no node key (never registered, or logged out), or refused by control
    STOPPED = "Stopped"         # `down`: keys and map kept, nothing served
    STARTING = "Starting"       # serving the saved map (if any), waiting for the control server
    RUNNING = "Running"         # a map from the control server is being served


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """How `meshnode daemon` was started."""

    state_dir: Path = DEFAULT_STATE_DIR
    socket_path: Path = DEFAULT_SOCKET
    tun: str | None = None                             # None: DNS-only (userspace) mode
    dns_listen: tuple[tuple[str, int], ...] = ()       # empty: the service addresses, port 53
    resolv_conf: Path | None = None                    # None: /etc/resolv.conf or systemd-resolved
    drift_interval: float = 1.0                        # seconds between resolv.conf checks
    os_name: str | None = None                         # reported to control; None: platform's
    metrics: tuple[str, int] | None = None             # Prometheus /metrics of the resolver
    query_log: str | None = None                       # the resolver's query log ("-": stderr)
    port: int = DEFAULT_PORT                           # WireGuard UDP port (with --tun)
    # DoT/DoH (cert.py): empty with no --dns-listen: the service addresses on 853 and 443.
    dot_listen: tuple[tuple[str, int], ...] = ()
    doh_listen: tuple[tuple[str, int], ...] = ()


# `status --json` field names are stable within a schema number (README.md, "status --json schema"):
# fields may be added; a rename or removal bumps it.
STATUS_SCHEMA = 1
ACTIVE_SECONDS = 180  # a handshake younger than this: the peer is exchanging traffic


def node_json(node: MapNode) -> dict[str, Any]:
    """The part of a node `meshnode status` shows."""
    return {"id": node.id, "name": node.name, "fqdn": node.fqdn, "user": node.user,
            "addresses": list(node.addresses), "online": node.online, "tags": list(node.tags),
            "os": node.os, "last_seen": node.last_seen, "exit_node": node.exit_node,
            "offers_exit_node": node.exit_node, "advertises_exit_node": node.advertises_exit_node,
            "ephemeral": node.ephemeral,
            "advertised_routes": list(node.advertised_routes),
            "approved_routes": list(node.approved_routes), "home_region": node.home_region}


def _b64(key: Any) -> str:
    return base64.b64encode(bytes(key)).decode()


class Daemon:
    """One node. Public coroutines are what the LocalAPI calls; each raises a `NodeError` (errors.py) on refusal,
    which the LocalAPI turns into an HTTP status."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.state = StateDir(config.state_dir)
        self.prefs = Prefs()
        self.backend = BackendState.NEEDS_LOGIN
        self.netmap: NetMap | None = None
        self.map_source = ""            # "saved" or "control"
        self.map_received_at: float | None = None
        self.control_error: str | None = None
        self.identity_error: str | None = None   # damaged pin or lost machine key (state.IdentityDamaged)
        self.auth_url: str | None = None  # where to confirm this machine while a browser login waits
        self.saved_version: int | None = None  # the map version on disk (what a restart would serve)
        self.dns = DnsThread(self._make_server, metrics=config.metrics, metrics_extra=self._paths_metrics)
        # The resolver's view of each map, converting only the peers a map changed (a policy change
        # or a record reaches every node: each converted all its peers' addresses again before).
        self._views = ViewBuilder()
        self._map_json = JsonBuilder()   # the same for the map saved after each apply
        self.osdns: OsDnsConfigurator = self._make_osdns()
        self._iface: ServiceAddresses | None = None
        self._tunnel = Tunnel(config.tun, config.port) if config.tun else None
        self._router = (Router(config.tun, config.state_dir / "forwarding.pre-meshnode.json")
                        if config.tun else None)
        self.router_error: str | None = None
        self.serve_config = ServeConfig()
        self._serve = ServeRunner(self._caller, self._serve_tls_files)
        self._reported_endpoints: list[str] | None = None
        self._reported_disco = ""  # the disco key the control server has from us
        self._reported_home: int | None = None  # the home relay region the control server has from us
        self._conn = NodeConnectivity()  # port mapping and netcheck (netcheckrun.py)
        self._dns_hosts: tuple[str, ...] = ()
        self._upstreams: tuple[Upstream, ...] = ()
        self._applied_osdns: OsDnsConfig | None = None
        self._client: ControlClient | None = None
        self._map_task: asyncio.Task[None] | None = None
        self._endpoint_task: asyncio.Task[None] | None = None
        self._drift_task: asyncio.Task[None] | None = None
        self._first_map = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._pending_save: tuple[NetMap, float] | None = None
        self._saver: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.tka = LockService(config.state_dir)  # Tailnet Lock: sync and peer filtering (node/lock.py)
        self.flowlog = FlowLogger(self._tunnel, lambda: self._client,   # connection logs (node/flowlog.py)
                                  state_file=config.state_dir / "flows-pending.json")
        # One writer thread keeps saves in order and off the loop (a big map is megabytes).
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        self.certs = NodeCertificates(config.state_dir / "tls")
        self.cert_error: str | None = None
        self._cert_task: asyncio.Task[None] | None = None

    # -- construction helpers -----------------------------------------------------------------

    def _make_osdns(self) -> OsDnsConfigurator:
        backup = self.config.state_dir / "resolv.pre-meshnode.conf"
        if self.config.resolv_conf is not None:
            return ResolvConfConfigurator(self.config.resolv_conf, backup)
        if resolved_in_use(SYSTEM_RESOLV_CONF):
            return ResolvedConfigurator(self.config.tun or DUMMY_NAME)
        return ResolvConfConfigurator(SYSTEM_RESOLV_CONF, backup)

    def _make_server(self) -> DnsServer:
        listen = self.config.dns_listen or tuple((h, 53) for h in self._dns_hosts)
        return DnsServer(ServerConfig(listen=listen, fallback_upstreams=self._upstreams,
                                      query_log=self.config.query_log, encrypted=self._encrypted_config(),
                                      # tls:// and https:// upstreams inside the tailnet verify against its CA
                                      upstream_ca=(str(self.certs.ca_path),) if self.certs.ca_path.exists() else (),
                                      # names in tls://NAME upstreams: asked of the original resolvers
                                      bootstrap_dns=self._upstreams))

    def _encrypted_config(self) -> EncryptedConfig:
        c = self.config
        if c.dot_listen or c.doh_listen:
            return EncryptedConfig(dot=c.dot_listen, doh=c.doh_listen)
        if c.dns_listen:
            return EncryptedConfig()  # a custom --dns-listen: no implicit ports 853/443
        return EncryptedConfig(dot=tuple((h, 853) for h in self._dns_hosts),
                               doh=tuple((h, 443) for h in self._dns_hosts))

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the state, undo a crashed run's leftovers, and resume what the prefs say."""
        self.state.open()
        try:
            self.state.machine_key()  # fails loudly on a damaged key before anything else happens
        except IdentityDamaged as exc:
            # Not a new machine behind the user's back: `up --force-reauth` decides (health says so).
            log.error("state: %s", exc)
            self.identity_error = str(exc)
        self.prefs = self.state.prefs()
        try:
            self.osdns.recover()
        except OsDnsError as exc:
            log.error("osdns: recovery failed: %s", exc)
        saved = self.state.saved_map()
        if saved is not None:
            try:
                self.netmap = NetMap.from_json(saved.netmap)
                self.map_source, self.map_received_at = "saved", saved.saved_at
                self.saved_version = self.netmap.version
            except NetMapError as exc:
                self.state.reject_saved_map(f"unusable map: {exc}")
        has_key = self.state.node_key() is not None
        if not has_key or (self.identity_error and "machine.key" in self.identity_error):
            self.backend = BackendState.NEEDS_LOGIN
        elif not self.prefs.want_running:
            self.backend = BackendState.STOPPED
        else:
            await self._go_up()
        self._drift_task = asyncio.create_task(self._watch_osdns())
        self.serve_config = load_config(self._serve_path)
        await self._sync_serve()
        log.info("daemon: started in state %s (state dir %s)", self.backend.value, self.state.path)

    async def close(self) -> None:
        """Stop serving and put the system's DNS back; state on disk stays as it is."""
        if self._drift_task is not None:
            self._drift_task.cancel()
        for task in list(self._background):
            task.cancel()
        self.flowlog.cancel()
        await self._go_down(BackendState.STOPPED)
        await self._serve.close()
        await self._flush_saves()
        self._writer.shutdown(wait=True)
        self.state.close()

    async def _go_up(self) -> None:
        """Serve the map we have at once, point the system at us, then follow the control server."""
        await self._start_tunnel()
        await self._place_addresses()
        self._upstreams = self._forwarding_upstreams()
        view = self._view_of(self.netmap) if self.netmap else DnsView()
        if not self.dns.running:
            try:
                await asyncio.to_thread(self.dns.start, view)  # binding waits on the resolver's thread
            except DnsThreadError:
                await self._remove_addresses()
                raise
        else:
            self.dns.set_view(view)
        self._sync_osdns(view)
        self.backend = BackendState.RUNNING if self.map_source == "control" else BackendState.STARTING
        await self._serve_cert()  # a certificate from an earlier run serves at once, until it expires
        self._start_map_stream()

    async def _go_down(self, new_state: BackendState) -> None:
        await self._stop_map_stream()
        if self._applied_osdns is not None:
            try:
                self.osdns.restore()
            except OsDnsError as exc:
                log.error("osdns: restore failed: %s", exc)
            self._applied_osdns = None
        await asyncio.to_thread(self.dns.stop)
        await self._serve.apply(self.serve_config, ())
        await self._remove_addresses()
        if self._router is not None:
            await self._router.close()
        await self._conn.stop_portmap()  # deletes the mapping at the gateway
        if self._tunnel is not None:
            await self._tunnel.close()
            self._reported_endpoints = None
        if self.map_source == "control":
            self.map_source = "saved"  # no longer live: what we hold is the saved map
        self.backend = new_state

    async def _start_tunnel(self) -> None:
        if self._tunnel is None:
            return
        node_key = self.state.node_key()
        if node_key is None:
            return
        try:
            await self._tunnel.start(bytes(node_key))
            await self._tunnel.set_shields(self.prefs.shields_up)
            if self.netmap is not None:
                await self._tunnel.apply(self.netmap, self.prefs.exit_node, self.prefs.accept_routes,
                                         self.prefs.login_server)
        except TunnelError as exc:
            raise SystemFailure(str(exc)) from None
        self._conn.start_portmap(self._tunnel.status().listen_port)
        await self._route(self.netmap)
        await self._sync_serve()

    async def _route(self, netmap: NetMap | None) -> None:
        """Forwarding, masquerading and exit node routing for `netmap` and the prefs (router.py)."""
        if self._router is None:
            return
        control: tuple[str, ...] = ()
        lan: tuple[str, ...] = ()
        if self.prefs.exit_node:
            # Through the control client's resolver: the original resolvers, never ourselves, and
            # every address of every URL in a `URL1,URL2` list.
            control = (await self._client.server_addresses() if self._client is not None
                       else await asyncio.to_thread(control_addresses, self.prefs.login_server))
            if not self.prefs.exit_node_allow_lan_access:
                try:
                    lan = await asyncio.to_thread(local_networks, self._router.tun)
                except OSError as exc:
                    log.error("router: cannot list the local networks to block: %s", exc)
        try:
            await self._router.apply(plan_routing(netmap, self.prefs.exit_node, control, lan))
            self.router_error = None
        except (RouterError, OSError) as exc:  # the tunnel and DNS keep working without it
            self.router_error = f"routing: {exc}"
            log.error("router: %s", exc)

    async def _report_endpoints(self, client: ControlClient) -> None:
        # Peers find us at these addresses; WireGuard also learns them from handshakes, so a
        # failure here only delays the first contact (and the next poll retries).
        if self._tunnel is None or not self._tunnel.running:
            return
        try:
            endpoints = self._conn.mapped_first(await self._tunnel.endpoints())
        except OSError as exc:
            log.warning("endpoints: cannot list local addresses: %s", exc)
            return
        disco, home = self._tunnel.disco_key, self._tunnel.home_region
        if (endpoints, disco, home) == (self._reported_endpoints, self._reported_disco, self._reported_home):
            return
        try:
            await client.update_endpoints(endpoints, disco_key=disco, home_region=home)
            self._reported_endpoints, self._reported_disco, self._reported_home = endpoints, disco, home
            log.info("control: reported endpoints %s", ", ".join(endpoints) or "(none)")
        except ControlError as exc:
            log.warning("control: reporting endpoints %s failed: %s", endpoints, exc)

    async def _watch_endpoints(self, client: ControlClient) -> None:
        """Report this node's endpoints again within ENDPOINT_POLL of any change (an address
        added or removed, an interface set down, a NAT address learned from peers)."""
        while True:
            await asyncio.sleep(ENDPOINT_POLL)
            try:
                await self._report_endpoints(client)
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception:  # never end the watch on a bug: say so and keep polling
                log.exception("endpoints: report failed")

    async def _current_endpoints(self) -> tuple[list[str], str]:
        """(endpoints, disco key) of the running tunnel, for a registration; empty without one."""
        if self._tunnel is None or not self._tunnel.running:
            return [], ""
        try:
            return self._conn.mapped_first(await self._tunnel.endpoints()), self._tunnel.disco_key
        except OSError as exc:
            log.warning("endpoints: cannot list local addresses: %s", exc)
            return [], self._tunnel.disco_key

    async def _place_addresses(self) -> None:
        if self.config.dns_listen:
            self._dns_hosts = tuple(dict.fromkeys(h for h, _ in self.config.dns_listen))
            if self.prefs.accept_dns and any(port != 53 for _, port in self.config.dns_listen):
                log.warning("osdns: resolv.conf cannot name a port; the system resolver will ask port 53"
                            " of %s, not the --dns-listen port", ", ".join(self._dns_hosts))
            return
        if self._iface is None:
            self._iface = ServiceAddresses(self.config.tun or DUMMY_NAME, create=self.config.tun is None)
        try:
            # pyroute2's synchronous API runs its own event loop: keep it off ours.
            placed = await asyncio.to_thread(self._iface.install)
            self._dns_hosts = placed.addresses
        except InterfaceError as exc:
            raise SystemFailure(f"cannot place the DNS service addresses: {exc}") from None
        if isinstance(self.osdns, ResolvedConfigurator) and self._applied_osdns is None:
            if placed.ifname == LOOPBACK:
                # resolved ignores per-link DNS on loopback: fall back to managing the file.
                log.warning("osdns: the service addresses are on %s, which systemd-resolved does not"
                            " configure per link; managing %s instead", LOOPBACK, SYSTEM_RESOLV_CONF)
                self.osdns = ResolvConfConfigurator(SYSTEM_RESOLV_CONF,
                                                    self.config.state_dir / "resolv.pre-meshnode.conf")
                self.osdns.recover()
            else:
                self.osdns.link = placed.ifname

    async def _remove_addresses(self) -> None:
        if self._iface is not None:
            await asyncio.to_thread(self._iface.remove)

    def _forwarding_upstreams(self) -> tuple[Upstream, ...]:
        own = frozenset(self._dns_hosts) | {DNS_V4, DNS_V6}
        try:
            original = self.osdns.original()
        except OsDnsError as exc:
            log.error("osdns: cannot read the original resolvers: %s", exc)
            return ()
        return tuple(Upstream(ns) for ns in forwarding_upstreams(original, own))

    # -- the network map ----------------------------------------------------------------------

    def _view_of(self, netmap: NetMap) -> DnsView:
        try:
            return self._views.build(netmap)
        except NetMapError as exc:
            log.error("netmap: version %d cannot be served: %s", netmap.version, exc)
            return DnsView()

    def _start_map_stream(self) -> None:
        if self._map_task is not None and not self._map_task.done():
            return
        try:
            client = self._control_client()
        except IdentityDamaged as exc:
            # Keep serving the saved map, but never talk to a server we can no longer authenticate.
            log.error("state: %s", exc)
            self.identity_error = str(exc)
            return
        if client is None:
            return
        self._map_task = asyncio.create_task(self._follow_map(client))
        if self._endpoint_task is None or self._endpoint_task.done():
            self._endpoint_task = asyncio.create_task(self._watch_endpoints(client))

    async def _stop_map_stream(self) -> None:
        await self._stop_cert_task()
        watcher, self._endpoint_task = self._endpoint_task, None
        if watcher is not None:
            watcher.cancel()
            try:
                await watcher
            except asyncio.CancelledError:
                pass
        task, self._map_task = self._map_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _control_client(self) -> ControlClient | None:
        if self._client is not None:
            return self._client
        node_key = self.state.node_key()
        if node_key is None or not self.prefs.login_server:
            return None
        url = self.prefs.login_server
        self._client = ControlClient(url, _b64(self.state.machine_key()), _b64(node_key),
                                     server_public_key=self.state.server_key(url))
        return self._client

    async def _follow_map(self, client: ControlClient) -> None:
        while True:
            try:
                async for netmap in client.stream_map():
                    self.control_error = None
                    await self.tka.apply(netmap, client, self._apply_map)  # filters locked-out peers
                    await self._report_endpoints(client)
                    self._start_cert_task(client)
                return
            except ControlError as exc:
                if not exc.logs_out:
                    # Only a refusal sealed by the pinned server key changes the login state; anything
                    # else (a captive portal, an impostor) is transient: keep serving what we have.
                    log.warning("control: %s (not a sealed refusal); retrying in 1s", exc)
                    self.control_error = None
                    await asyncio.sleep(1.0)
                    continue
                await self._refused_by_control(client, exc)
                return
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:
                # A bug or a full disk must not silently end map updates: say so, then retry.
                log.exception("netmap: following the map failed; retrying in 1s")
                self.control_error = f"following the map failed: {in_words(exc)} (see the daemon's log)"
                await asyncio.sleep(1.0)

    # -- the node's certificate (cert.py) -------------------------------------------------------

    def _start_cert_task(self, client: ControlClient) -> None:
        wanted = self._encrypted_config().wanted or any(e.kind is Kind.HTTPS for e in self.serve_config.entries)
        if wanted and (self._cert_task is None or self._cert_task.done()):
            self._cert_task = asyncio.create_task(self._cert_loop(client))

    async def _stop_cert_task(self) -> None:
        task, self._cert_task = self._cert_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def _wanted_names(self) -> tailnet_ca.LeafNames | None:
        nm = self.netmap
        if nm is None:
            return None
        return tailnet_ca.node_names(nm.self_node.name, nm.domain, tuple(nm.self_node.addresses))

    async def _cert_loop(self, client: ControlClient) -> None:
        """Keep a certificate from the tailnet CA and hand it to the resolver: renewed at two thirds
        of its life (or when the node's names change) while the control server answers; retried
        with backoff when it does not. An expired one is never served (magicdns/tlsconf.py)."""
        backoff = 5.0
        while True:
            info = await asyncio.to_thread(self.certs.current)
            if info is not None:
                await self._serve_cert()
            wanted = self._wanted_names()
            delay = renewal_delay(info, wanted, time.time())
            if delay > 0 or wanted is None:
                await asyncio.sleep(min(delay, CERT_RECHECK) if delay > 0 else CERT_RECHECK)
                continue
            try:
                key = await asyncio.to_thread(self.certs.key_pem)
                cert_pem, ca_pem = await client.request_cert(tailnet_ca.make_csr(key, wanted.dns_names[0]))
                info = await asyncio.to_thread(self.certs.save, cert_pem, ca_pem)
            except (ControlError, tailnet_ca.CertError, OSError) as exc:
                self.cert_error = f"cannot get a certificate: {exc}"
                log.warning("tls: %s; retrying in %.0fs", self.cert_error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 600.0)
                continue
            backoff, self.cert_error = 5.0, None
            log.info("tls: certificate for %s valid until %s", ", ".join(info.dns_names + info.ip_addresses),
                     info.to_json()["not_after"])
            if any(e.kind is Kind.HTTPS for e in self.serve_config.entries):
                async with self._lock:  # a saved `serve --https` that waited for its first certificate
                    await self._sync_serve()

    async def _serve_cert(self) -> None:
        if not self.dns.running or not self._encrypted_config().wanted or not self.certs.cert_path.exists():
            return
        cert, key = str(self.certs.cert_path), str(self.certs.key_path)
        await self.dns.call(lambda server: server.encrypted.set_certificate(cert, key))

    async def sign_cert(self, csr_pem: str, name: str) -> dict[str, Any]:
        """`meshnode cert NAME`: have the tailnet CA sign the CLI's CSR for this node's names."""
        nm = self.netmap
        client = self._control_client()
        if nm is None or client is None:
            raise NotReady("not connected to a tailnet: run `meshnode up` first")
        short = name.lower().rstrip(".")
        if short not in (nm.self_node.name, nm.self_node.fqdn.rstrip(".")):
            raise InvalidRequest(f"{name}: a certificate can only be for this node's name, {nm.self_node.fqdn.rstrip('.')}")
        try:
            cert, ca_pem = await client.request_cert(csr_pem)
        except ControlError as exc:
            raise ControlFailed(f"the control server did not issue a certificate: {exc}") from None
        return {"cert": cert, "ca": ca_pem}

    def ca_cert(self) -> dict[str, Any]:
        """The tailnet CA certificate (from the map, else the copy saved with the node's certificate)."""
        pem = (self.netmap.tailnet_ca if self.netmap is not None else "") or self.certs.ca_pem()
        if not pem:
            raise NotReady("no tailnet CA known yet: run `meshnode up` (the control server may predate it)")
        return {"ca": pem, "domain": self.netmap.domain if self.netmap is not None else None}

    async def _refused_by_control(self, client: ControlClient, exc: ControlError) -> None:
        # Transient failures are retried inside stream_map; this is a refusal sealed by the pinned
        # server key (deleted, expired, logged out elsewhere): the map we hold describes a tailnet we
        # are no longer part of.
        log.error("control: %s refused this node: %s", client.server_url, exc)
        self.control_error = control_failure(client.server_url, exc)
        self.netmap, self.map_source = None, ""
        await self._forget_map()
        self._first_map.set()  # wakes an `up` waiting for its first map: the answer is no
        # A separate task: going down cancels and awaits the map task, which is this one.
        task = asyncio.create_task(self._refused())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refused(self) -> None:
        async with self._lock:
            await self._go_down(BackendState.NEEDS_LOGIN)

    async def _apply_map(self, netmap: NetMap) -> None:
        now = time.time()
        view = self._view_of(netmap)
        self.netmap, self.map_source, self.map_received_at = netmap, "control", now
        # Wait until it is served: `up` returning means names answer, and maps apply in order.
        await asyncio.wrap_future(self.dns.set_view(view))
        if self._tunnel is not None:
            try:
                await self._tunnel.apply(netmap, self.prefs.exit_node, self.prefs.accept_routes,
                                         self.prefs.login_server)
                await self._tunnel.set_shields(self.prefs.shields_up)
            except OSError as exc:  # netlink refused an address or route: DNS keeps working
                log.error("tunnel: applying map version %d: %s", netmap.version, exc)
            await self._route(netmap)
            await self._sync_serve()
            await self.flowlog.on_map(netmap)
        self._sync_osdns(view)
        if self.backend is BackendState.STARTING:
            self.backend = BackendState.RUNNING
        self._first_map.set()
        self._schedule_save(netmap, now)
        log.debug("netmap: version %d applied (%d peers)", netmap.version, len(netmap.peers))

    def _schedule_save(self, netmap: NetMap, now: float) -> None:
        # fsync can take long on a busy disk; the next map must not wait for it. Only the newest
        # pending map is worth writing, so a burst of maps costs one or two writes, in order.
        self._pending_save = (netmap, now)
        if self._saver is None or self._saver.done():
            self._saver = asyncio.create_task(self._save_pending())

    async def _save_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending_save is not None:
            netmap, now = self._pending_save
            self._pending_save = None
            try:
                await loop.run_in_executor(self._writer, self.state.save_map, self._map_json.build(netmap), now)
                self.saved_version = netmap.version
            except OSError as exc:
                log.error("state: cannot save network map version %d: %s", netmap.version, exc)

    async def _forget_map(self) -> None:
        self._pending_save = None
        await self._flush_saves()  # a save in flight must not bring the map back afterwards
        self.state.forget_map()
        self.saved_version = None

    async def _flush_saves(self) -> None:
        if self._saver is not None:
            await self._saver

    # -- OS DNS -------------------------------------------------------------------------------

    def _wanted_osdns(self, view: DnsView) -> OsDnsConfig | None:
        if not self.prefs.accept_dns or not self._dns_hosts:
            return None
        search = tuple(dict.fromkeys((view.domain,) + view.dns.search_domains))
        return OsDnsConfig(self._dns_hosts, search)

    def _sync_osdns(self, view: DnsView) -> None:
        wanted = self._wanted_osdns(view)
        if wanted == self._applied_osdns:
            return
        try:
            if wanted is None:
                self.osdns.restore()
            else:
                self.osdns.apply(wanted)
            self._applied_osdns = wanted
        except OsDnsError as exc:
            log.error("osdns: %s", exc)

    async def _watch_osdns(self) -> None:
        # Another program (DHCP client, NetworkManager) may rewrite resolv.conf at any time; we
        # report it rather than fight it.
        while True:
            await asyncio.sleep(self.config.drift_interval)
            try:
                self.osdns.check()
            except OSError as exc:
                log.warning("osdns: cannot check %s", exc)

    # -- LocalAPI operations ------------------------------------------------------------------

    async def up(self, req: UpRequest) -> dict[str, Any]:
        async with self._lock:
            prefs = self._merge_prefs(req)
            if not prefs.login_server:
                raise InvalidRequest("no login server: pass --login-server URL")
            if not req.force_reauth:
                try:
                    self.state.machine_key()
                    self.state.server_key(prefs.login_server)
                except IdentityDamaged as exc:
                    self.identity_error = str(exc)
                    raise NotReady(str(exc)) from None
            if req.exit_node and self.netmap is not None:
                self._check_exit_node(self.netmap, req.exit_node)
            if req.force_reauth or (prefs.login_server != self.prefs.login_server and self.prefs.login_server):
                # A different control server is a different tailnet, and --force-reauth starts over
                # (e.g. after the server's key changed): a new identity, a new pin.
                await self._go_down(BackendState.NEEDS_LOGIN)
                self.state.forget_node_key()
                self.state.forget_server_key()
                await self._forget_map()
                self.netmap, self.map_source = None, ""
                self.state.machine_key()   # a lost machine key is replaced only here, on request
            await self._stop_map_stream()
            fresh_key = self.state.node_key() is None
            if fresh_key:
                self.state.new_node_key()
            old_prefs, self.prefs = self.prefs, prefs
            client = self._control_client()
            assert client is not None
            try:
                endpoints, disco = await self._current_endpoints()
                register_kw = dict(hostname=prefs.hostname or None, os=self.config.os_name,
                                   advertise_routes=prefs.advertise_routes, advertise_tags=prefs.advertise_tags,
                                   advertise_exit_node=prefs.advertise_exit_node,
                                   endpoints=endpoints, disco_key=disco)
                if fresh_key:   # Tailnet Lock: a rotation signature, so no `lock sign` is needed again
                    rotated = await self.tka.rotation_signature(client.node_key_public)
                    if rotated is not None:
                        register_kw["key_signature"] = rotated
                if req.authkey is None and req.interactive:
                    await self._login_in_browser(client, register_kw)
                else:
                    await client.register(authkey=req.authkey, **register_kw)
                # Whatever was reported before, report again now: the server has what we just sent.
                self._reported_endpoints = None
            except ControlError as exc:
                await self._stop_map_stream()
                if fresh_key:
                    self.state.forget_node_key()  # never registered: not an identity worth keeping
                self.prefs = old_prefs
                if self.backend in (BackendState.RUNNING, BackendState.STARTING):
                    self._start_map_stream()  # keep following the map we had
                failure = ControlFailed if exc.retryable else ControlRefused
                hint = ""
                if exc.code is ErrorCode.BAD_SEAL:
                    hint = (" (if the control server was reinstalled, start over with"
                            " `meshnode up --force-reauth --authkey KEY`)")
                if exc.code in (ErrorCode.AUTHKEY_UNKNOWN, ErrorCode.AUTHKEY_EXPIRED, ErrorCode.AUTHKEY_USED,
                                ErrorCode.AUTHKEY_REVOKED, ErrorCode.AUTHKEY_REQUIRED):
                    hint = (" (pass a valid --authkey; `meshnode control authkey create` on the control"
                            " server makes one)")
                if exc.code is ErrorCode.TAG_NOT_ALLOWED and prefs.advertise_tags:
                    hint = (f" (this node asks for {', '.join(prefs.advertise_tags)}; drop them with"
                            " `meshnode up --advertise-tags=` or `meshnode set --advertise-tags=`)")
                raise failure(control_failure(prefs.login_server, exc) + hint, detail=exc.detail) from None
            if client.server_public_key:
                self.state.save_server_key(prefs.login_server, client.server_public_key)
            self.identity_error = None
            self.prefs = replace(prefs, want_running=True)
            self.state.save_prefs(self.prefs)
            self.control_error = None
            self._first_map.clear()
            try:
                await self._go_up()
            except DnsThreadError as exc:
                raise SystemFailure(str(exc)) from None
        try:
            await asyncio.wait_for(self._first_map.wait(), req.timeout)
        except asyncio.TimeoutError:
            raise TimedOut(f"registered, but no network map arrived within {req.timeout:g}s") from None
        if self.netmap is None and self.control_error:
            raise ControlRefused(self.control_error)
        return self.status()

    async def _login_in_browser(self, client: ControlClient, register_kw: dict[str, Any]) -> None:
        """No auth key: the control server gives a URL where a signed-in user confirms this machine
        (`status` shows it as `auth_url` for the CLI to print); returns once they did."""
        def show(url: str) -> None:
            self.auth_url = url
            log.info("to add this machine to the tailnet, open %s", url)
        try:
            await client.login_interactive(show, timeout=BROWSER_LOGIN_WAIT, **register_kw)
        finally:
            self.auth_url = None

    def _merge_prefs(self, req: UpRequest) -> Prefs:
        changes = {k: getattr(req, k) for k in ("login_server", *SETTABLE) if getattr(req, k) is not None}
        try:
            return self.prefs.updated(**changes)
        except PrefsError as exc:
            raise InvalidRequest(str(exc)) from None

    async def set_prefs(self, req: UpRequest) -> dict[str, Any]:
        """`meshnode set`: change the given prefs only. A running node applies them at once (through
        `up`, which re-registers: advertised routes, tags and the hostname live on the control
        server); a stopped or logged-out one keeps them for the next `up`."""
        if self.backend in (BackendState.RUNNING, BackendState.STARTING) and self.state.node_key() is not None:
            return await self.up(req)
        async with self._lock:
            prefs = self._merge_prefs(req)
            if req.exit_node and self.netmap is not None:
                self._check_exit_node(self.netmap, req.exit_node)
            self.prefs = prefs
            self.state.save_prefs(prefs)
        return self.status()

    def whois(self, req: WhoisRequest) -> dict[str, Any]:
        """The node and user owning a tailnet address (the identity ACLs and `serve` use)."""
        node = self.node_of(req.address)
        if node is None:
            raise NotFound(f"{req.address} is not the address of any node in the network map")
        return {"address": req.address, "node": node_json(node), "user": node.user,
                "tags": list(node.tags), "self": self.netmap is not None and node is self.netmap.self_node}

    def node_of(self, address: str) -> MapNode | None:
        """The map node (self or a peer) that owns tailnet `address`, or None."""
        nm = self.netmap
        if nm is None:
            return None
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        text = str(ip)
        for node in (nm.self_node, *nm.peers):
            if text in node.addresses:
                return node
        return None

    async def version(self) -> dict[str, Any]:
        """This daemon's version and the control server's (from its GET /key), and whether they match."""
        from ..version import version
        import aiohttp
        mine = version()
        url = self.prefs.login_server or None
        control: dict[str, Any] = {"url": url, "version": None, "error": None}
        if url:
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
                    # Several replicas ("URL1,URL2"): the one the node uses now, else the first.
                    here = self._client.server_url if self._client is not None else url.split(",")[0]
                    async with http.get(here.rstrip("/") + "/key") as resp:
                        body = await resp.json(content_type=None)
                control["version"] = body.get("version") if isinstance(body, dict) else None
                if control["version"] is None:
                    control["error"] = "the control server does not report its version (older than 0.1.0?)"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                control["error"] = control_unreachable(url, exc)
        return {"daemon": mine, "control": control}

    # -- serve ----------------------------------------------------------------------------------

    @property
    def _serve_path(self) -> Path:
        return self.config.state_dir / "serve.json"

    def _serve_addresses(self) -> tuple[str, ...]:
        if (self._tunnel is None or not self._tunnel.running or self.netmap is None
                or self.backend not in (BackendState.RUNNING, BackendState.STARTING)):
            return ()
        return tuple(self.netmap.self_node.addresses)

    async def _sync_serve(self, strict_port: int | None = None) -> None:
        await self._serve.apply(self.serve_config, self._serve_addresses(), strict_port)

    def _serve_tls_files(self) -> tuple[str, str]:
        """The node's certificate and key for `serve --https`, or `NoCertificate` saying why not."""
        info = self.certs.current()
        nm = self.netmap
        problem = certificate_problem(info, nm is not None, bool(nm and nm.tailnet_ca), self.cert_error, time.time())
        if problem is not None:
            client = self._client  # only while connected: never starts talking to control when down
            if nm is not None and client is not None:
                self._start_cert_task(client)  # with DoT/DoH off nothing asked for one until now
            raise NoCertificate(problem)
        return str(self.certs.cert_path), str(self.certs.key_path)

    def _caller(self, address: str) -> Caller | None:
        node = self.node_of(address)
        if node is None:
            return None
        return Caller(address, node.fqdn, node.user, tuple(node.tags))

    def serve_status(self) -> dict[str, Any]:
        return {"entries": self._serve.status(self.serve_config),
                "addresses": list(self._serve_addresses()),
                "tunnel": self._tunnel is not None}

    async def serve_set(self, req: ServeRequest) -> dict[str, Any]:
        """Serve a port: it listens at once (or the request is refused, nothing changed), and is
        saved so a restarted daemon serves it again."""
        if self._tunnel is None:
            raise NotReady("serve shares a port on the node's tailnet addresses, which need the tunnel:"
                                " run the daemon with --tun NAME")
        async with self._lock:
            old = self.serve_config
            try:
                new = old.with_entry(ServeEntry(req.port, Kind(req.kind), req.target))
            except ServeError as exc:
                raise InvalidRequest(str(exc)) from None
            self.serve_config = new
            try:
                await self._sync_serve(strict_port=req.port)
            except ServeError as exc:
                self.serve_config = old
                await self._sync_serve()
                raise NotReady(str(exc)) from None
            save_config(self._serve_path, new)
        return self.serve_status()

    async def serve_off(self, port: int) -> dict[str, Any]:
        async with self._lock:
            try:
                self.serve_config = self.serve_config.without(port)
            except ServeError as exc:
                raise NotFound(str(exc)) from None
            save_config(self._serve_path, self.serve_config)
            await self._sync_serve()
        return self.serve_status()

    async def serve_reset(self) -> dict[str, Any]:
        async with self._lock:
            self.serve_config = ServeConfig()
            save_config(self._serve_path, self.serve_config)
            await self._sync_serve()
        return self.serve_status()

    async def down(self) -> dict[str, Any]:
        async with self._lock:
            self.prefs = replace(self.prefs, want_running=False)
            self.state.save_prefs(self.prefs)
            has_key = self.state.node_key() is not None
            await self._go_down(BackendState.STOPPED if has_key else BackendState.NEEDS_LOGIN)
        return self.status()

    async def logout(self) -> dict[str, Any]:
        async with self._lock:
            client = self._control_client()
            if client is not None:
                try:
                    await client.logout()
                except ControlError as exc:
                    if exc.retryable or not exc.sealed:
                        # Forgetting the key without the server's word (it answered not at all, or
                        # something else answered on its URL) would leave a ghost node.
                        raise ControlFailed(f"cannot log out: {control_failure(client.server_url, exc)}"
                                       " (`meshnode up --force-reauth` starts over without it)",
                                       detail=exc.detail) from None
                    log.warning("control: logout refused (%s); forgetting the node key anyway", exc)
            await self._go_down(BackendState.NEEDS_LOGIN)
            self.state.forget_node_key()
            await self._forget_map()
            self.netmap, self.map_source, self.map_received_at = None, "", None
            self.prefs = replace(self.prefs, want_running=False)
            self.state.save_prefs(self.prefs)
        return self.status()

    def status(self) -> dict[str, Any]:
        nm = self.netmap
        health = []
        drift = self.osdns.status().drift
        if drift != Drift.INTACT.value:
            health.append(f"resolv.conf was {drift} by another program; MagicDNS may not be used")
        if self.control_error:
            health.append(self.control_error)
        if self.identity_error:
            health.append(self.identity_error)
        health += [f"state: {d}" for d in self.state.damage]
        control = self._client.stream_state if self._client is not None else None
        if control is not None and control.error and not self.control_error:
            since = time.strftime('%H:%M:%S', time.localtime(control.since))
            health.append(f"control server unreachable since {since}: {control.error}; serving the last map")
        if self.router_error:
            health.append(self.router_error)
        routing = self._router.applied if self._router is not None else None
        if routing is not None and routing.use_exit and routing.exit_peer is None:
            health.append(f"exit node {self.prefs.exit_node!r} is not an approved exit node in the map:"
                          " internet traffic is blocked (`meshnode set --exit-node=` goes direct)")
        tunnel = self._tunnel.status() if self._tunnel is not None else None
        if (tunnel is not None and self.backend in (BackendState.RUNNING, BackendState.STARTING)
                and not tunnel.running):
            health.append(f"tunnel {self.config.tun} is not running"
                          + (f": {tunnel.failure}" if tunnel.failure else ""))
        if tunnel is not None and tunnel.filter is not None and tunnel.filter.error:
            health.append(tunnel.filter.error)
        from ..version import version
        return {
            "schema": STATUS_SCHEMA,
            "version": version(),
            "backend_state": self.backend.value,
            "auth_url": self.auth_url,
            "login_server": self.prefs.login_server or None,
            "tailnet": nm.domain if nm else None,
            "self": node_json(nm.self_node) if nm else None,
            "peers": self._peers_json(nm) if nm else [],
            "map": {"version": nm.version if nm else None, "source": self.map_source or None,
                    "received_at": self.map_received_at, "saved_version": self.saved_version},
            "prefs": self.prefs.to_json(),
            "control": control.to_json() if control is not None else None,
            "tunnel": tunnel.to_json() if tunnel is not None else None,
            "health": health,
            "tailnet_lock": self._tka_status(health),
            "flow_logs": self.flowlog.on,
        }

    def _tka_status(self, health: list[str]) -> dict[str, Any]:
        lock = self.tka.status()
        if lock["locked_out"]:
            health.append("Tailnet Lock: locked out (no valid signature): "
                          + ", ".join(p["name"] for p in lock["locked_out"]))
        if lock["last_refusal"]:
            health.append(f"Tailnet Lock: {lock['last_refusal']}")
        if lock["error"]:
            health.append(lock["error"])
        return lock

    async def lock_command(self, body: Any) -> dict[str, Any]:
        """`meshnode lock ...` through the LocalAPI (node/lockcli.py, node/lock.py)."""
        if not isinstance(body, dict) or not isinstance(body.get("command"), str) \
                or not isinstance(body.get("params", {}), dict):
            raise InvalidRequest("expected {command, params}")
        return await self.tka.command(body["command"], body.get("params") or {}, self._control_client(),
                                      self._apply_map)

    def _peers_json(self, nm: NetMap) -> list[dict[str, Any]]:
        tunnel = self._tunnel.status() if self._tunnel is not None else None
        by_key = {p.public_key: p for p in tunnel.peers} if tunnel is not None else {}
        ref = self.prefs.exit_node
        now = time.time()
        out = []
        for p in nm.peers:
            obj = node_json(p)
            obj["exit_node_in_use"] = bool(ref) and p.exit_node and ref in (p.name, p.fqdn, *p.addresses)
            wg = by_key.get(p.node_key)
            obj["tunnel"] = None
            obj["active"] = False
            if wg is not None:
                obj["tunnel"] = {"endpoint": wg.endpoint, "last_handshake": wg.last_handshake,
                                 "rx_bytes": wg.rx_bytes, "tx_bytes": wg.tx_bytes}
                if wg.path is not None:
                    obj["path"] = wg.path
                # WireGuard re-handshakes every 2 minutes while traffic flows: older means idle.
                shook = wg.last_handshake
                obj["active"] = bool(shook and now - shook < ACTIVE_SECONDS and wg.endpoint)
            out.append(obj)
        return out

    def ip(self, req: IpRequest) -> dict[str, Any]:
        nm = self.netmap
        if nm is None:
            raise NotReady("no network map yet: run `meshnode up`")
        node = nm.self_node if req.peer is None else self._find_peer(nm, req.peer)
        addrs = [a for a in node.addresses
                 if req.family is None or ipaddress.ip_address(a).version == req.family]
        return {"name": node.fqdn, "addresses": addrs}

    async def ping(self, req: PingRequest) -> dict[str, Any]:
        """Ping a peer as `tailscale ping` does: disco pings on every path it may take, each reply
        saying which path answered (ICMP through the tunnel for a peer without a disco key)."""
        nm = self.netmap
        if nm is None:
            raise NotReady("no network map yet: run `meshnode up`")
        if self._tunnel is None or not self._tunnel.running:
            raise NotReady("ping goes through the tunnel: run the daemon with --tun NAME")
        node = self._find_peer(nm, req.peer)
        if node is nm.self_node:
            raise InvalidRequest(f"{node.fqdn} is this node")
        v4 = next((a for a in node.addresses if ":" not in a), None)
        paths = self._tunnel.paths
        if paths is not None and node.disco_key:
            return await self._disco_ping(paths, node, v4 or node.addresses[0], req)
        if v4 is None:
            raise NotReady(f"{node.fqdn} has no IPv4 address to ping")
        from .icmp import ping_once
        replies: list[float | None] = []
        for seq in range(1, req.count + 1):
            pong = await asyncio.to_thread(ping_once, v4, seq, req.timeout)
            replies.append(round(pong.rtt * 1000, 3) if pong else None)
        wg = self._tunnel.status().peer(node.node_key)
        via = wg.endpoint if wg is not None else None
        return {"peer": node.fqdn, "address": v4, "endpoint": via, "replies_ms": replies,
                "replies": [{"ms": r, "via": via if r is not None else None} for r in replies]}

    def _paths_metrics(self) -> str:
        """Prometheus families of paths and relay; called on the resolver's thread (snapshots only)."""
        from .pathmetrics import paths_text
        tunnel = self._tunnel
        return paths_text(tunnel.paths if tunnel is not None else None)

    async def _disco_ping(self, paths: Any, node: MapNode, addr: str, req: PingRequest) -> dict[str, Any]:
        from .pathrunner import b64_key
        key = b64_key(node.node_key)
        if key is None:
            raise NotReady(f"{node.fqdn} has an unusable node key")
        replies: list[dict[str, Any]] = []
        for _ in range(req.count):
            res = await paths.ping(key, req.timeout)
            if res is None:
                replies.append({"ms": None, "via": None})
                continue
            via = (f"{res.endpoint[0]}:{res.endpoint[1]}" if res.endpoint and ":" not in res.endpoint[0]
                   else f"[{res.endpoint[0]}]:{res.endpoint[1]}" if res.endpoint
                   else f"DERP({res.relay_region})")
            replies.append({"ms": round(res.latency_ms, 3), "via": via, "direct": res.endpoint is not None})
            if req.until_direct and res.endpoint is not None:
                break
            if req.count > 1:
                await asyncio.sleep(min(1.0, req.timeout))  # tailscale pings once a second
        last = next((r["via"] for r in reversed(replies) if r["via"]), None)
        return {"peer": node.fqdn, "address": addr, "endpoint": last,
                "replies_ms": [r["ms"] for r in replies], "replies": replies}

    async def netcheck(self, req: NetcheckRequest) -> dict[str, Any]:
        """What this node knows of its connectivity: the WireGuard UDP port, the endpoints peers
        can reach it at (here and as the control server has them), whether the control server
        answers, and which peers completed a handshake. Without a tunnel (DNS-only mode) the
        tunnel's parts are null and the rest is still answered."""
        nm = self.netmap
        tunnel = self._tunnel.status() if self._tunnel is not None else None
        running = bool(tunnel and tunnel.running)
        local: list[str] | None = None
        local_error: str | None = None
        if self._tunnel is not None and running:
            try:
                local = await self._tunnel.endpoints()
            except OSError as exc:
                local_error = f"cannot list local addresses: {exc}"
                log.warning("netcheck: %s", local_error)
        return {  # the STUN, relay latency, NAT and port-mapping report: netcheckrun.py
            **await self._conn.netcheck(nm, self.prefs.login_server, req.timeout, local),
            "mode": "tunnel" if self._tunnel is not None else "dns-only",
            "backend_state": self.backend.value,
            "udp_port": tunnel.listen_port if running and tunnel else None,
            "interface": tunnel.interface if running and tunnel else None,
            "endpoints": {"local": local, "reported": self._reported_endpoints,
                          "at_control": list(nm.self_node.endpoints) if nm else None,
                          "error": local_error},
            "control": await self._probe_control(req.timeout),
            "peers": self._netcheck_peers(nm, tunnel if running else None) if nm else [],
        }

    async def _probe_control(self, timeout: float) -> dict[str, Any]:
        """GET /key of the login server (the replica in use, else the first), bounded by `timeout`."""
        url = self.prefs.login_server
        try:
            pinned = self.state.server_key(url) if url else None
        except IdentityDamaged:
            pinned = None
        here = self._client.server_url if self._client is not None else (url or "").split(",")[0]
        return (await probe_control(url or None, here, pinned, timeout)).to_json()

    @staticmethod
    def _netcheck_peers(nm: NetMap, tunnel: TunnelStatus | None) -> list[dict[str, Any]]:
        """Per map peer: its endpoints at control and, with a running tunnel, the handshake."""
        by_key = {p.public_key: p for p in tunnel.peers} if tunnel else {}
        out = []
        for p in nm.peers:
            wg = by_key.get(p.node_key)
            shook = wg.last_handshake if wg else None
            endpoint = wg.endpoint if wg else None
            out.append({"name": p.name, "fqdn": p.fqdn, "addresses": list(p.addresses),
                        "online": p.online, "endpoints_at_control": list(p.endpoints),
                        "handshake": None if tunnel is None else shook is not None,
                        "last_handshake": shook, "endpoint": endpoint,
                        # No relays yet: a handshake is always over a direct path.
                        "path": "direct" if shook is not None and endpoint else None})
        return out

    @staticmethod
    def _check_exit_node(nm: NetMap, ref: str) -> None:
        """Like tailscale: refuse an exit node that is not a visible, approved exit node."""
        node = nm.peer_by_name(ref) or next((p for p in nm.peers if ref in p.addresses), None)
        if node is None:
            raise InvalidRequest(f"exit node {ref!r} is not a peer in the network map")
        if not node.exit_node:
            raise InvalidRequest(f"{node.fqdn} is not an approved exit node")

    @staticmethod
    def _find_peer(nm: NetMap, key: str) -> MapNode:
        if key.lower().rstrip(".") in (nm.self_node.name, nm.self_node.fqdn):
            return nm.self_node
        found = nm.peer_by_name(key)
        if found is not None:
            return found
        for p in nm.peers:
            if key in p.addresses:
                return p
        raise NotFound(f"no peer {key!r} in the network map")

    async def dns_status(self) -> dict[str, Any]:
        os_status = self.osdns.status()
        server = await self.dns.status() if self.dns.running else None
        return {"accept_dns": self.prefs.accept_dns,
                "resolver": {"running": self.dns.running,
                             "addresses": list(self._dns_hosts),
                             "forwarding_to": [u.spec for u in self._upstreams],
                             "server": server},
                "tls": self._tls_status(),
                "os": {"mode": os_status.mode, "target": os_status.target, "active": os_status.active,
                       "drift": os_status.drift, "drift_since": os_status.drift_since,
                       "original_nameservers": list(os_status.original_nameservers)}}

    def _tls_status(self) -> dict[str, Any]:
        info = self.certs.current()
        return {"certificate": info.to_json() if info else None, "error": self.cert_error,
                "serving": bool(info and tailnet_ca.servable(info, time.time()))}

    async def dns_query(self, req: QueryRequest) -> dict[str, Any]:
        if not self.dns.running:
            raise NotReady("the resolver is not running: run `meshnode up`")
        try:
            return await self.dns.query(req.name, req.qtype)
        except asyncio.TimeoutError:
            raise TimedOut(f"no answer for {req.name} {req.qtype} in time") from None

