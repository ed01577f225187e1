"""The node's TLS certificate from the tailnet CA (control/ca.py), and the system trust store.

The node makes its own P-256 key in `<state>/tls/node.key` (0600) and sends only a CSR; the control
server answers with a certificate for the node's names (its FQDN, `magicdns.<tailnet>`,
100.100.100.100, fd7a:115c:a1e0::53, its tailnet addresses). The resolver serves it for DoT and
DoH. `renewal_delay` is the pure decision the daemon's timer follows: renew at two thirds of the
life, or at once when the node's names changed (a rename, new addresses) or no usable pair exists.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..control import ca
from .atomicfile import atomic_write

log = logging.getLogger("meshnode.node.cert")

DEBIAN_TRUST_DIR = Path("/usr/local/share/ca-certificates")
RECHECK = 60.0  # seconds: how often the daemon re-decides (names may change without a new cert)


class TrustStoreError(RuntimeError):
    """The CA could not be added to or removed from the system trust store; the message says why."""


class NodeCertificates:
    """Key, certificate and CA certificate files of one node (all under `<state>/tls`)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.key_path = self.dir / "node.key"
        self.cert_path = self.dir / "node.crt"
        self.ca_path = self.dir / "tailnet-ca.crt"

    def key_pem(self) -> str:
        """The node's private key, made on first use; it never leaves this directory."""
        try:
            return self.key_path.read_text()
        except FileNotFoundError:
            pass
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = ca.new_key_pem()
        atomic_write(self.key_path, pem, 0o600)
        return pem

    def current(self) -> ca.CertInfo | None:
        """The stored certificate if it exists, parses and belongs to the stored key; else None."""
        try:
            pem = self.cert_path.read_text()
            key = self.key_path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            if not ca.key_matches(pem, key):
                log.warning("tls: %s does not belong to %s; a new one will be requested", self.cert_path,
                            self.key_path)
                return None
            return ca.cert_info(pem)
        except (ca.CertError, ValueError, TypeError) as exc:
            log.warning("tls: %s is unusable (%s); a new one will be requested", self.cert_path, exc)
            return None

    def ca_pem(self) -> str | None:
        try:
            return self.ca_path.read_text()
        except FileNotFoundError:
            return None

    def save(self, cert_pem: str, ca_pem: str) -> ca.CertInfo:
        """Store a certificate the control server issued (checked against our key first)."""
        if not ca.key_matches(cert_pem, self.key_pem()):
            raise ca.CertError("the control server returned a certificate for another key")
        info = ca.cert_info(cert_pem)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.ca_path, ca_pem, 0o644)
        atomic_write(self.cert_path, cert_pem, 0o644)
        return info


def renewal_delay(info: ca.CertInfo | None, wanted: ca.LeafNames | None, now: float) -> float:
    """Seconds until the daemon should ask for a new certificate (0.0: now).

    Now when there is none, when it lacks one of the names the node has today, or at two thirds of
    its life (`ca.renew_at`). Without a map (`wanted` None) nothing can be decided: the stored
    certificate is kept until `RECHECK`.
    """
    if info is None:
        return 0.0 if wanted is not None else RECHECK
    if wanted is not None and not (set(wanted.dns_names) <= set(info.dns_names)
                                   and set(wanted.ip_addresses) <= set(info.ip_addresses)):
        return 0.0
    return ca.renew_at(info, now)


@dataclass(frozen=True)
class TrustStore:
    """Debian's local CA directory and the command that rebuilds /etc/ssl/certs from it."""

    directory: Path = DEBIAN_TRUST_DIR
    update_command: tuple[str, ...] = ("update-ca-certificates",)

    def file_for(self, domain: str) -> Path:
        return self.directory / f"meshnode-{domain}.crt"  # the .crt suffix is what Debian's tool reads

    def install(self, ca_pem: str, domain: str) -> Path:
        ca.cert_info(ca_pem)  # refuse anything that is not a certificate before touching the store
        path = self.file_for(domain)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(path, ca_pem, 0o644)
        except OSError as exc:
            raise TrustStoreError(f"cannot write {path}: {exc.strerror} (run as root)") from None
        self._update()
        return path

    def uninstall(self, domain: str) -> Path | None:
        path = self.file_for(domain)
        try:
            path.unlink()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TrustStoreError(f"cannot remove {path}: {exc.strerror} (run as root)") from None
        self._update(fresh=True)
        return path

    def _update(self, fresh: bool = False) -> None:
        cmd = list(self.update_command) + (["--fresh"] if fresh else [])
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                                 env=dict(os.environ, LC_ALL="C"))
        except FileNotFoundError:
            raise TrustStoreError(f"{cmd[0]} not found (install the ca-certificates package)") from None
        except subprocess.TimeoutExpired:
            raise TrustStoreError(f"{cmd[0]} did not finish within 120 s") from None
        if out.returncode != 0:
            raise TrustStoreError(f"{cmd[0]} failed: {(out.stderr or out.stdout).strip()}")
