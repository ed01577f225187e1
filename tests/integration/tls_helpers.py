"""Test certificate authorities and leaves, made with `cryptography` in the test (no shared fixtures on disk)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CaForTests:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def write(self, path: Path) -> Path:
        path.write_text(self.pem)
        return path


def _t(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def make_ca(name: str = "test CA") -> CaForTests:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = time.time()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_t(now - 3600))
            .not_valid_after(_t(now + 86400))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return CaForTests(key, cert)


def make_leaf(ca: CaForTests, dns_names: tuple[str, ...] = ("dns.test",), ips: tuple[str, ...] = ("127.0.0.1",),
              not_before: float | None = None, not_after: float | None = None) -> tuple[str, str]:
    """(certificate PEM, key PEM) signed by `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = time.time()
    sans = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns_names or ips)[0])]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_t(now - 60 if not_before is None else not_before))
            .not_valid_after(_t(now + 3600 if not_after is None else not_after))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def write_pair(dir_: Path, pair: tuple[str, str], stem: str = "server") -> tuple[Path, Path]:
    cert, key = dir_ / f"{stem}.crt", dir_ / f"{stem}.key"
    key.write_text(pair[1])
    key.chmod(0o600)
    cert.write_text(pair[0])
    return cert, key
