"""`meshnode wg --config FILE [--tun NAME]`: the WireGuard engine alone, in the foreground."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # the engine's modules load only when the command runs (fast `meshnode --help`)
    from .config import WgConfig
    from .peer import PeerConfig

log = logging.getLogger(__name__)


def resolve_peers(cfg: WgConfig, source: str) -> list[PeerConfig]:
    """The config's peers with endpoints resolved for our dual-stack socket."""
    from .config import ConfigError
    from .device import dual_stack_endpoint
    from .peer import PeerConfig

    peers = []
    for p in cfg.peers:
        endpoint = None
        if p.endpoint is not None:
            host, port = p.endpoint
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except socket.gaierror as exc:
                raise ConfigError(f"{source}:{p.line}: Endpoint {host}: {exc.strerror}") from None
            endpoint = dual_stack_endpoint(infos[0][4][0], port)
        peers.append(PeerConfig(p.public_key, p.preshared_key, endpoint, p.allowed_ips,
                                p.persistent_keepalive))
    return peers


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--tun", default="wg0", show_default=True)
def wg(config_path: str, tun: str) -> None:
    """Run the WireGuard engine in the foreground from a wg-quick style file."""
    from .config import ConfigError, load_config
    from .crypto import encode_key, public_key
    from .device import create_device
    from .netconf import NetconfError
    from .tun import TunError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(config_path)
        peers = resolve_peers(cfg, config_path)
    except ConfigError as exc:
        click.echo(f"meshnode wg: {exc}", err=True)
        sys.exit(2)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Offloads: "gro" (default) writes coalesced TCP super-packets, "tso" also reads them (costs a
    # Python checksum per segment: slower here), "none" moves one packet per syscall. A knob for
    # benchmarks and for kernels without vnet headers on TUN.
    offload = os.environ.get("MESHNODE_WG_OFFLOAD", "gro")
    if offload not in ("gro", "tso", "none"):
        click.echo(f"meshnode wg: MESHNODE_WG_OFFLOAD={offload!r}: use gro, tso or none", err=True)
        sys.exit(2)
    try:
        device = create_device(cfg.private_key, tun, addresses=cfg.addresses,
                               listen_port=cfg.listen_port, mtu=cfg.mtu, peers=peers,
                               offload=offload,
                               io_threads=int(os.environ.get("MESHNODE_WG_IO_THREADS", "1")))
    except (TunError, NetconfError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on UDP port {cfg.listen_port}: {exc}") from None
    ifname = device.ifname
    click.echo(f"meshnode wg: {ifname} up, public key {encode_key(public_key(cfg.private_key))}, "
               f"listening on UDP port {device.listen_port}", err=True)
    try:
        # Wake twice a second to notice a device that stopped by itself (interface deleted).
        while not stop.wait(0.5) and device.running:
            pass
    finally:
        # Closing the TUN fd deletes the (non-persistent) interface and its routes.
        device.close()
        click.echo(f"meshnode wg: {ifname} down; drops: {device.drops()}; "
                   f"errors: {device.errors()}", err=True)
    if device.failure is not None:
        raise click.ClickException(str(device.failure))
