"""`meshnode derp serve` (a standalone relay with STUN) and `meshnode derp meshkey` (a new mesh key)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from pathlib import Path

import click
from aiohttp import web

log = logging.getLogger("meshnode.derp")


def parse_hostport(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"{text!r}: expected HOST:PORT", param_hint=option)
    return host.strip("[]") or "0.0.0.0", int(port)


@click.group()
def derp() -> None:
    """The DERP relay (Tailscale's relay protocol) and its STUN server."""


@derp.command()
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="HOST:PORT for HTTP(S).")
@click.option("--stun-port", type=click.IntRange(-1, 65535), default=3478, show_default=True,
              help="UDP port of the STUN server on the same host; -1 turns STUN off, 0 picks a free port.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM certificate chain.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM private key.")
@click.option("--mesh-with", default="", help="URLs of the other servers of this region, comma separated.")
@click.option("--mesh-key-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the region's mesh key (64 hex digits; `meshnode derp meshkey` makes one).")
@click.option("--control-db", type=click.Path(dir_okay=False), default=None,
              help="Admit exactly the active node keys of this control server database (re-read on every change).")
@click.option("--admit-any", is_flag=True, help="Admit any node key (an open relay: tests and labs only).")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None,
              help="Write 'HTTP_PORT STUN_PORT' here once listening (for scripts using port 0).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def serve(listen: str, stun_port: int, tls_cert: str | None, tls_key: str | None, mesh_with: str,
          mesh_key_file: str | None, control_db: str | None, admit_any: bool, ready_file: str | None,
          verbose: bool) -> None:
    """Run a standalone relay server."""
    from .mesh import read_mesh_key
    from .server import RelayServer
    host, port = parse_hostport(listen, "--listen")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if not control_db and not admit_any:
        raise click.UsageError("say which nodes may use the relay: --control-db FILE (the tailnet's nodes) "
                               "or --admit-any (an open relay)")
    peers = tuple(u.strip() for u in mesh_with.split(",") if u.strip())
    if peers and not mesh_key_file:
        raise click.UsageError("--mesh-with needs --mesh-key-file")
    mesh_key = None
    if mesh_key_file:
        try:
            mesh_key = read_mesh_key(mesh_key_file)
        except (OSError, ValueError) as exc:
            raise click.UsageError(str(exc)) from None
    ctx = None
    if tls_cert and tls_key:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise click.UsageError(f"cannot load the TLS certificate: {exc}") from None
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        from .admission import TailnetKeys
        admit = TailnetKeys() if control_db else None
        relay = RelayServer(os.urandom(32), admit=admit, mesh_key=mesh_key, mesh_with=peers)
        tasks = []
        if admit is not None:
            assert control_db is not None
            tasks.append(asyncio.create_task(_follow_store(control_db, admit, relay)))
        app = web.Application()
        relay.attach(app)
        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(text="\n".join(relay.metrics_lines()) + "\n", content_type="text/plain")
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ctx, backlog=4096)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        stun_transport = None
        bound_stun = -1
        if stun_port >= 0:
            from ..stun.server import start_stun_server
            stun_transport, stun = await start_stun_server("" if host in ("0.0.0.0", "::") else host, stun_port)
            bound_stun = stun.port
        await relay.start()
        click.echo(f"relay listening on {'https' if ctx else 'http'}://{host}:{bound}/derp"
                   + (f", STUN on udp/{bound_stun}" if bound_stun >= 0 else "")
                   + (f", meshed with {', '.join(peers)}" if peers else ""), err=True)
        if ready_file:
            tmp = Path(ready_file + ".tmp")
            tmp.write_text(f"{bound} {bound_stun}\n")
            tmp.replace(ready_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for t in tasks:
            t.cancel()
        if stun_transport is not None:
            stun_transport.close()
        await runner.cleanup()

    try:
        asyncio.run(main())
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc.strerror or exc}") from None


async def _follow_store(db: str, admit: object, relay: object) -> None:
    """Re-read the tailnet's node keys when the control store changes (and every second, for expiry)."""
    from ..control.store import ControlStore
    from .admission import node_keys
    store = ControlStore(db)
    seen = None
    last = 0.0
    try:
        while True:
            try:
                counter = store.change_counter()
                now = time.time()
                if counter != seen or now - last >= 1.0:
                    seen, last = counter, now
                    if admit.update(node_keys(store.list_nodes(), now)):  # type: ignore[attr-defined]
                        n = relay.recheck()  # type: ignore[attr-defined]
                        if n:
                            log.info("derp: disconnected %d node(s) no longer in the tailnet", n)
            except Exception:
                log.exception("reading the control store failed; keeping the last node list")
            await asyncio.sleep(0.2)
    finally:
        store.close()


@derp.command()
@click.argument("path", type=click.Path(dir_okay=False))
def meshkey(path: str) -> None:
    """Write a new random mesh key to PATH (mode 0600); give the same file to every server of a region."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    click.echo(path)
