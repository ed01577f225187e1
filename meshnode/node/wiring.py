"""The node's composition root: builds the backend (`Daemon`) and the LocalAPI in front of it,
and runs them until a signal. Nothing imports this but the CLI, so the dependencies point one way:
wiring -> localapi -> daemon (the backend knows nothing of HTTP or sockets of the API)."""

from __future__ import annotations

import asyncio
import logging
import signal

from .daemon import Daemon, DaemonConfig
from .localapi import LocalApiServer, claim_socket_path

log = logging.getLogger("meshnode.node.daemon")


async def run_daemon(config: DaemonConfig) -> None:
    """Run until SIGTERM or SIGINT; always puts the system's DNS back on the way out."""
    # Before touching DNS or addresses: a second daemon on the same socket must change nothing.
    claim_socket_path(config.socket_path)
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    api = LocalApiServer(daemon, config.socket_path)
    try:
        await daemon.start()
        await api.start()
        log.info("daemon: LocalAPI on %s", config.socket_path)
        await stop.wait()
        log.info("daemon: shutting down")
    finally:
        await api.stop()
        await daemon.close()
