"""TLS server settings for DoT and DoH: TLS 1.2+, ALPN, a certificate reloaded when its files change,
and an expired certificate never served.

How reloading works without restarting listeners: each listener's SSLContext is a fixed "front"
context whose SNI callback (OpenSSL's servername callback, run for every ClientHello, with or
without SNI) switches the connection to the context of the certificate currently loaded. Swapping
that inner context is one assignment; connections already open keep theirs.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from typing import Callable

from cryptography import x509

log = logging.getLogger("magicdns.tls")

ALPN_DOT = ("dot",)
ALPN_DOH = ("h2", "http/1.1")


class TlsConfigError(ValueError):
    """A certificate or key that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class CertSummary:
    """The facts an operator asks about the served certificate."""

    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: float
    not_after: float
    issuer: str

    def servable(self, now: float) -> bool:
        return self.not_before <= now < self.not_after


def summarize(pem: bytes) -> CertSummary:
    """Names, validity and issuer of the first certificate in `pem`."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise TlsConfigError(f"not a PEM certificate ({exc})") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    return CertSummary(dns, ips, cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(),
                       cert.issuer.rfc4514_string())


def _base_context(alpn: tuple[str, ...]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8310/8484 deployments: nothing older
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # forward secrecy and AEAD only (TLS 1.2 list)
    ctx.set_alpn_protocols(list(alpn))
    return ctx


class CertificateFiles:
    """A certificate and key read from files, re-read when either file changes (`maybe_reload`)."""

    def __init__(self, cert_file: str, key_file: str, clock: Callable[[], float]) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.clock = clock
        self.summary: CertSummary | None = None
        self.error: str | None = None
        self._stamp: tuple = ()
        self._inner: dict[tuple[str, ...], ssl.SSLContext] = {}
        self.reloads = 0
        self.refused_handshakes = 0

    def _file_stamp(self) -> tuple:
        stamps = []
        for path in (self.cert_file, self.key_file):
            try:
                st = os.stat(path)
                stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def load(self) -> None:
        """Read both files now; raises `TlsConfigError` (and keeps serving the previous pair)."""
        stamp = self._file_stamp()
        try:
            with open(self.cert_file, "rb") as f:
                pem = f.read()
        except OSError as exc:
            raise TlsConfigError(f"{self.cert_file}: {exc.strerror}") from None
        summary = summarize(pem)
        inner: dict[tuple[str, ...], ssl.SSLContext] = {}
        for alpn in (ALPN_DOT, ALPN_DOH):
            ctx = _base_context(alpn)
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            except FileNotFoundError as exc:
                raise TlsConfigError(f"{exc.filename}: no such file") from None
            except (ssl.SSLError, OSError) as exc:
                raise TlsConfigError(f"{self.cert_file} / {self.key_file}: the certificate and key do not"
                                     f" load together ({exc})") from None
            inner[alpn] = ctx
        self._inner, self.summary, self._stamp, self.error = inner, summary, stamp, None
        self.reloads += 1

    def maybe_reload(self) -> bool:
        """Reload if either file changed since the last load; True when a new pair is in use. A pair
        that does not load is logged once and the previous one stays."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        try:
            self.load()
        except TlsConfigError as exc:
            if self.error != str(exc):
                log.error("tls: keeping the previous certificate: %s", exc)
            self.error = str(exc)
            self._stamp = stamp  # do not retry (and log) every poll until the files change again
            return False
        log.info("tls: loaded certificate for %s, valid until %s", ", ".join(
            self.summary.dns_names + self.summary.ip_addresses), self.summary.not_after)  # type: ignore[union-attr]
        return True

    def servable(self) -> bool:
        return self.summary is not None and self.summary.servable(self.clock())

    def front_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        """The context a listener is created with; each handshake is moved to the current pair."""
        front = _base_context(alpn)
        if alpn in self._inner:
            # Not used for handshakes (the callback switches), but OpenSSL wants a server certificate.
            front.load_cert_chain(self.cert_file, self.key_file)

        def pick(sslobj: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
            inner = self._inner.get(alpn)
            if inner is None or not self.servable():
                self.refused_handshakes += 1  # an expired certificate is never served
                return ssl.ALERTDESCRIPTION_HANDSHAKE_FAILURE
            sslobj.context = inner
            return None

        front.sni_callback = pick  # type: ignore[assignment]
        return front

    def status(self) -> dict[str, object]:
        s = self.summary
        now = self.clock()
        return {"cert_file": self.cert_file, "key_file": self.key_file,
                "names": list(s.dns_names + s.ip_addresses) if s else [],
                "not_after": s.not_after if s else None,
                "expires_in_s": round(s.not_after - now) if s else None,
                "serving": self.servable(), "error": self.error,
                "state": ("no certificate" if s is None else "expired: not serving" if now >= s.not_after
                          else "not yet valid" if now < s.not_before else "valid"),
                "reloads": self.reloads, "refused_handshakes": self.refused_handshakes}
