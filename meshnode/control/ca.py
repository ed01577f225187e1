"""The tailnet certificate authority: a CA key kept by the control server, short-lived leaf
certificates for nodes' resolvers (DoT/DoH at 100.100.100.100) and users' own services.

Sans-I/O: keys and certificates in, PEM out, `now` passed in. X.509 is `cryptography`'s; nothing
here writes ASN.1 by hand.

Why the CA carries name constraints: users are asked to install it in their trust store
(`meshnode cert --install-ca`). A CA without constraints would then vouch for *any* name, so a
stolen control database could impersonate every web site. Constrained to the tailnet domain and the
tailnet address ranges (RFC 5280 section 4.2.1.10), it can only vouch for names inside the tailnet.
The names a node's certificate carries are decided by the control server from the node's record,
never taken from the request: the request only proves possession of the node's key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from magicdns.ranges import RESOLVER_V4, RESOLVER_V6, TAILNET_V4, TAILNET_V6

CA_LIFETIME = 10 * 365 * 86400.0
LEAF_LIFETIME = 14 * 86400.0
RENEW_FRACTION = 2 / 3  # renew at two thirds of a certificate's life
BACKDATE = 300.0  # leaves start 5 minutes in the past: clients with slightly slow clocks accept them
MAX_CSR_BYTES = 8192


class CertError(ValueError):
    """A certificate request or certificate that cannot be used; the message says why."""


@dataclass(frozen=True)
class TailnetCa:
    """The CA's key and certificate (PEM). The key never leaves the control store."""

    key_pem: str
    cert_pem: str
    domain: str


@dataclass(frozen=True)
class CertInfo:
    """What a consumer needs to know about a certificate, read once from its PEM."""

    pem: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: float
    not_after: float
    serial: int
    issuer: str

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    def to_json(self) -> dict[str, object]:
        return {"dns_names": list(self.dns_names), "ip_addresses": list(self.ip_addresses),
                "not_before": _iso(self.not_before), "not_after": _iso(self.not_after),
                "serial": f"{self.serial:x}", "issuer": self.issuer}


def _when(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def _iso(ts: float) -> str:
    return _when(ts).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def new_key_pem() -> str:
    """A fresh P-256 private key (PEM, PKCS#8): small, fast to sign with, accepted by every TLS stack."""
    return _pem_key(ec.generate_private_key(ec.SECP256R1()))


def create_ca(domain: str, now: float, lifetime: float = CA_LIFETIME) -> TailnetCa:
    """A new self-signed CA for `domain`, constrained to the tailnet's names and addresses."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshnode"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"meshnode tailnet CA ({domain})")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_when(now - BACKDATE)).not_valid_after(_when(now + lifetime))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.NameConstraints(permitted_subtrees=[
                x509.DNSName(domain), x509.IPAddress(TAILNET_V4), x509.IPAddress(TAILNET_V6)],
                excluded_subtrees=None), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return TailnetCa(_pem_key(key), cert.public_bytes(serialization.Encoding.PEM).decode(), domain)


def ca_domain(ca_cert_pem: str) -> str | None:
    """The DNS name the CA is constrained to (None if it has no such constraint)."""
    cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    for sub in nc.permitted_subtrees or ():
        if isinstance(sub, x509.DNSName):
            return sub.value
    return None


@dataclass(frozen=True)
class LeafNames:
    """The names a leaf certificate is valid for: decided by the issuer, never by the requester."""

    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]


def node_names(node_name: str, domain: str, addresses: tuple[str, ...]) -> LeafNames:
    """A node's names: its resolver's (`magicdns.<domain>`, 100.100.100.100, fd7a:115c:a1e0::53),
    its own FQDN and its tailnet addresses."""
    ips = [str(RESOLVER_V4), str(RESOLVER_V6)]
    for a in addresses:
        text = str(ipaddress.ip_address(a.split("/", 1)[0]))
        if text not in ips:
            ips.append(text)
    fqdn = f"{node_name}.{domain}".lower()
    dns = tuple(dict.fromkeys((fqdn, f"magicdns.{domain}".lower())))
    return LeafNames(dns, tuple(ips))


def public_key_from_csr(csr_pem: str) -> ec.EllipticCurvePublicKey:
    """The public key of a PEM CSR whose self-signature checks out (proof the requester holds the key)."""
    if not isinstance(csr_pem, str) or len(csr_pem) > MAX_CSR_BYTES:
        raise CertError("csr: expected a PEM certificate request of at most 8 KiB")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise CertError(f"csr: not a PEM certificate request ({exc})") from None
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError):
        valid = False
    if not valid:
        raise CertError("csr: its signature does not match its key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1"):
        raise CertError("csr: the key must be ECDSA P-256 or P-384")
    return key


def issue(ca: TailnetCa, public_key: ec.EllipticCurvePublicKey, names: LeafNames, now: float,
          lifetime: float = LEAF_LIFETIME) -> str:
    """A leaf certificate (PEM) for `public_key`, valid for `names`, from now - BACKDATE for `lifetime`."""
    if not names.dns_names and not names.ip_addresses:
        raise CertError("a certificate needs at least one name")
    ca_key = serialization.load_pem_private_key(ca.key_pem.encode(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc.timestamp())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names.dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in names.ip_addresses]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (names.dns_names or names.ip_addresses)[0])])
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca_cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_when(now - BACKDATE)).not_valid_after(_when(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_csr(key_pem: str, common_name: str) -> str:
    """A CSR (PEM) proving possession of `key_pem`; the issuer decides the names, not this request."""
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def cert_info(pem: str) -> CertInfo:
    """Parse the first certificate of `pem`; raises `CertError` if there is none."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except (ValueError, TypeError) as exc:
        raise CertError(f"not a PEM certificate ({exc})") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    return CertInfo(pem if isinstance(pem, str) else pem.decode(), dns, ips,
                    cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(),
                    cert.serial_number, cert.issuer.rfc4514_string())


def key_matches(cert_pem: str, key_pem: str) -> bool:
    """Whether the certificate was issued for this private key."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def servable(info: CertInfo, now: float) -> bool:
    """Whether a certificate may be served at `now`: an expired (or not yet valid) one never is."""
    return info.not_before <= now < info.not_after


def renew_at(info: CertInfo, now: float) -> float:
    """Seconds from `now` until the certificate should be renewed (0.0: renew now).

    Renewal is due at two thirds of its life, so a node that misses a few attempts (control down)
    still has a third of the lifetime (about 4.7 days of 14) before it stops serving.
    """
    due = info.not_before + info.lifetime * RENEW_FRACTION
    return max(0.0, due - now)
