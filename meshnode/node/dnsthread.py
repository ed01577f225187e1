"""The MagicDNS server in its own thread and event loop, inside the daemon's process.

The daemon's main loop talks to the control server, writes state files and serves the LocalAPI; none
of that may delay an answer. So the resolver gets its own loop (uvloop when available: stock asyncio
UDP is ~4x slower, DESIGN.md section 6) and the main loop only hands it new views.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Awaitable, Callable, TypeVar

from magicdns.view import DnsView

log = logging.getLogger("meshnode.node.dns")

T = TypeVar("T")


class DnsThreadError(RuntimeError):
    """The resolver could not start (e.g. an address is in use) or is not running."""


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:  # uvloop is optional on platforms without it
        return asyncio.new_event_loop()


class DnsThread:
    """Owns one `magicdns.server.DnsServer` running on a private event loop thread."""

    def __init__(self, server_factory: Callable[[], Any], metrics: tuple[str, int] | None = None,
                 metrics_extra: Callable[[], str] | None = None) -> None:
        self._factory = server_factory
        self._metrics_addr = metrics
        self._metrics_extra = metrics_extra  # more Prometheus families (the node's paths)
        self._metrics: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._pending: DnsView | None = None
        self._waiters: list[concurrent.futures.Future[None]] = []
        self._applier: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, view: DnsView, timeout: float = 10.0) -> None:
        """Start the thread and the server with `view`; raises `DnsThreadError` if it cannot bind."""
        if self._server is not None:
            raise DnsThreadError("the resolver is already running")
        loop = _new_loop()
        ready = threading.Event()
        thread = threading.Thread(target=self._run_loop, args=(loop, ready), name="magicdns", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread = loop, thread
        server = self._factory()
        try:
            asyncio.run_coroutine_threadsafe(self._startup(server, view), loop).result(timeout)
        except BaseException as exc:
            self._stop_loop()
            if isinstance(exc, concurrent.futures.TimeoutError):
                raise DnsThreadError(f"the resolver did not start within {timeout}s") from None
            if isinstance(exc, DnsThreadError):
                raise
            if isinstance(exc, Exception):
                raise DnsThreadError(f"the resolver cannot start: {exc}") from exc
            raise
        self._server = server

    async def _startup(self, server: Any, view: DnsView) -> None:
        await server.start(view)
        if self._metrics_addr is not None:
            from .metrics import start_metrics
            try:
                self._metrics = await start_metrics(server, *self._metrics_addr, extra=self._metrics_extra)
            except OSError as exc:
                await server.stop()
                raise DnsThreadError(f"cannot serve metrics on {self._metrics_addr[0]}:"
                                     f"{self._metrics_addr[1]}: {exc.strerror}") from None

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()
        loop.close()

    def set_view(self, view: DnsView) -> "concurrent.futures.Future[None]":
        """Hand the resolver a new snapshot; it swaps it in atomically on its own loop.

        Views are applied in the order given, and a burst collapses to its newest view: the snapshot
        of a large map is built off the resolver's loop (`set_view_async`), and while one is being
        built, older pending views are skipped rather than queued. The returned future completes
        once this view, or a newer one, is being served.
        """
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._server is None or self._loop is None:
            done.set_result(None)
            return done
        self._loop.call_soon_threadsafe(self._offer, self._server, view, done)
        return done

    def _offer(self, server: Any, view: DnsView, done: concurrent.futures.Future[None]) -> None:
        # Runs on the resolver's loop, so `_pending`, `_waiters` and `_applier` need no lock.
        self._pending = view
        self._waiters.append(done)
        if self._applier is None or self._applier.done():
            self._applier = asyncio.get_running_loop().create_task(self._apply_pending(server))

    async def _apply_pending(self, server: Any) -> None:
        while self._pending is not None:
            view, self._pending = self._pending, None
            waiters, self._waiters = self._waiters, []
            try:
                await server.set_view_async(view)
            except Exception:
                log.exception("dns: view version %d could not be applied; keeping the previous one",
                              view.version)
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run `fn(server)` on the resolver's loop and await its result from the caller's loop."""
        if self._server is None or self._loop is None:
            raise DnsThreadError("the resolver is not running")
        server = self._server
        fut = asyncio.run_coroutine_threadsafe(fn(server), self._loop)
        return await asyncio.wrap_future(fut)

    async def status(self) -> dict[str, Any]:
        async def get(server: Any) -> dict[str, Any]:
            return server.status()
        return await self.call(get)

    async def query(self, name: str, qtype: str) -> dict[str, Any]:
        return await self.call(lambda server: server.query(name, qtype))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and its loop; safe to call when not running."""
        server, self._server = self._server, None
        if server is not None and self._loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(server), self._loop).result(timeout)
            except Exception as exc:  # stopping must go on: the loop and thread still need to end
                log.error("dns: stopping the resolver: %r", exc)
        self._stop_loop()

    async def _shutdown(self, server: Any) -> None:
        self._pending = None
        for w in self._waiters:
            if not w.done():
                w.set_result(None)  # nobody waits forever on a resolver that is going away
        self._waiters = []
        if self._applier is not None:
            self._applier.cancel()
            try:
                await self._applier
            except asyncio.CancelledError:
                pass
            self._applier = None
        if self._metrics is not None:
            await self._metrics.cleanup()
            self._metrics = None
        await server.stop()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(10)
