"""The DoT and DoH listeners of one server and the certificate they serve.

The certificate comes from files (`magicdns serve --tls-cert/--tls-key`, or the node's certificate
from the tailnet CA) and is re-read when they change. Listeners bind once a usable certificate is
loaded, so a node whose certificate arrives after start gains them then; a certificate that expires
(a node offline past its renewal) is never served: handshakes are refused and `status` says why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .dispatch import Dispatch, ListenerLimits
from .dohserver import DohConnection, DohStats
from .dot import GatedListener, TlsAdmission, start_dot
from .tcp import TcpSlots
from .tlsconf import ALPN_DOH, ALPN_DOT, CertificateFiles, TlsConfigError

log = logging.getLogger("magicdns.encrypted")

RELOAD_POLL = 1.0  # seconds between checks of the certificate files


class EncryptedListenError(RuntimeError):
    """A DoT/DoH listener cannot start; the message says which and why."""


@dataclass(frozen=True)
class EncryptedConfig:
    """Where DoT and DoH listen and which certificate they serve."""

    dot: tuple[tuple[str, int], ...] = ()
    doh: tuple[tuple[str, int], ...] = ()
    cert_file: str | None = None
    key_file: str | None = None
    handshake_timeout: float = 5.0

    @property
    def wanted(self) -> bool:
        return bool(self.dot or self.doh)


class EncryptedListeners:
    """Binds, reloads and reports the DoT/DoH listeners around a shared Dispatch."""

    def __init__(self, dispatch: Dispatch, limits: ListenerLimits, config: EncryptedConfig) -> None:
        self.dispatch = dispatch
        self.config = config
        self.slots = TcpSlots(limits)  # DoT and DoH share slots of their own (see dot.py)
        self.stats = DohStats()
        self.admission = TlsAdmission(dispatch, self.slots, config.handshake_timeout)
        self.certs: CertificateFiles | None = None
        self.servers: list[GatedListener] = []
        self.bound: list[tuple[str, str, int]] = []  # (kind, host, port)
        self.bind_error: str | None = None
        self._poll: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the configured certificate (if any) and bind; raises on a bad certificate or port."""
        if not self.config.wanted:
            return
        if self.config.cert_file and self.config.key_file:
            await self.set_certificate(self.config.cert_file, self.config.key_file, strict=True)

    async def set_certificate(self, cert_file: str, key_file: str, strict: bool = False) -> None:
        """Serve this certificate (re-read when the files change); binds the listeners on first use."""
        if self.certs is not None and self.servers and (self.certs.cert_file, self.certs.key_file) == (cert_file, key_file):
            self.certs.maybe_reload()  # same files, listeners up: only the contents may have changed
            return
        certs = CertificateFiles(cert_file, key_file, time.time)
        try:
            certs.load()
        except TlsConfigError as exc:
            if strict:
                raise EncryptedListenError(f"TLS certificate: {exc}") from None
            log.error("tls: %s", exc)
            certs.error = str(exc)
        self.certs = certs
        await self._close_servers()
        if certs.summary is None:
            return
        try:
            await self._bind()
        except EncryptedListenError as exc:
            self.bind_error = str(exc)
            await self._close_servers()
            if strict:
                raise
            log.error("%s", exc)
            return
        self.bind_error = None
        if self._poll is None:
            self._poll = asyncio.get_running_loop().create_task(self._watch())

    async def _bind(self) -> None:
        assert self.certs is not None
        for host, port in self.config.dot:
            try:
                srv = await start_dot(self.admission, host, port, self.certs.front_context(ALPN_DOT))
            except OSError as exc:
                raise EncryptedListenError(f"cannot listen for DoT on {_fmt(host, port)}: {exc.strerror}") from None
            self.servers.append(srv)
            self.bound.append(("dot", host, srv.sockets[0].getsockname()[1]))
        for host, port in self.config.doh:
            try:
                srv = await self.admission.listen(host, port, self.certs.front_context(ALPN_DOH),
                                                  lambda: DohConnection(self.dispatch, self.slots, self.stats))
            except OSError as exc:
                raise EncryptedListenError(f"cannot listen for DoH on {_fmt(host, port)}: {exc.strerror}") from None
            self.servers.append(srv)
            self.bound.append(("doh", host, srv.sockets[0].getsockname()[1]))
        log.info("encrypted DNS on %s", ", ".join(f"{k} {_fmt(h, p)}" for k, h, p in self.bound))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_POLL)  # a poll interval, not synchronisation
            if self.certs is not None:
                self.certs.maybe_reload()

    async def _close_servers(self) -> None:
        for s in self.servers:
            s.close()
        self.admission.abort_all()
        for conn in list(self.slots.conns):
            conn.transport.abort()
        for s in self.servers:
            await s.wait_closed()
        self.servers.clear()
        self.bound.clear()

    async def stop(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            try:
                await self._poll
            except asyncio.CancelledError:
                pass
            self._poll = None
        await self._close_servers()

    def status(self) -> dict[str, object]:
        return {"listeners": [f"{k} {_fmt(h, p)}" for k, h, p in self.bound],
                "wanted": [f"dot {_fmt(h, p)}" for h, p in self.config.dot]
                + [f"doh {_fmt(h, p)}" for h, p in self.config.doh],
                "certificate": self.certs.status() if self.certs else None,
                "bind_error": self.bind_error,
                "connections": len(self.slots.conns),
                "handshaking": len(self.admission.handshakes),
                "handshake_failures": self.admission.handshake_failures,
                "doh": {"queries": self.stats.queries, "http2_connections": self.stats.http2,
                        "http11_connections": self.stats.http11, "http_errors": self.stats.errors,
                        "protocol_errors": self.stats.protocol_errors}}


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
