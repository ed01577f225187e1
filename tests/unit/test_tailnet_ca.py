"""The tailnet CA (meshnode/control/ca.py): names, constraints, validity, renewal, never serving expired."""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshnode.control import ca

NOW = 1_800_000_000.0


def _leaf(tailnet: ca.TailnetCa, names: ca.LeafNames, now: float = NOW) -> tuple[str, str]:
    key = ca.new_key_pem()
    pub = ca.public_key_from_csr(ca.make_csr(key, "ignored.example"))
    return ca.issue(tailnet, pub, names, now), key


def test_node_names_cover_resolver_node_and_addresses() -> None:
    names = ca.node_names("Laptop", "tailnet", ("100.64.0.7", "fd7a:115c:a1e0::7"))
    assert names.dns_names == ("laptop.tailnet", "magicdns.tailnet")
    assert names.ip_addresses == ("100.100.100.100", "fd7a:115c:a1e0::53", "100.64.0.7", "fd7a:115c:a1e0::7")


def test_leaf_carries_exactly_the_issuer_chosen_names_and_14_days() -> None:
    tailnet = ca.create_ca("tailnet", NOW)
    names = ca.node_names("web", "tailnet", ("100.64.0.2",))
    pem, key = _leaf(tailnet, names)
    info = ca.cert_info(pem)
    assert info.dns_names == names.dns_names  # the CSR's CN "ignored.example" is not in it
    assert set(info.ip_addresses) == set(names.ip_addresses)
    assert info.not_after - NOW == pytest.approx(ca.LEAF_LIFETIME)
    assert info.not_before < NOW  # backdated for slow clocks
    assert ca.key_matches(pem, key)
    assert not ca.key_matches(pem, ca.new_key_pem())
    cert = x509.load_pem_x509_certificate(pem.encode())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_ca_is_constrained_to_the_tailnet() -> None:
    tailnet = ca.create_ca("corp.ts", NOW)
    assert ca.ca_domain(tailnet.cert_pem) == "corp.ts"
    cert = x509.load_pem_x509_certificate(tailnet.cert_pem.encode())
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert "PRIVATE KEY" not in tailnet.cert_pem


def test_openssl_verifies_leaf_and_refuses_names_outside_the_constraint(tmp_path: Path) -> None:
    """OpenSSL (the verifier kdig and curl use) accepts a node's leaf and refuses one for a name the
    CA may not vouch for, even though the CA signed it."""
    now = time.time()
    tailnet = ca.create_ca("tailnet", now)
    (tmp_path / "ca.pem").write_text(tailnet.cert_pem)
    good, _ = _leaf(tailnet, ca.node_names("web", "tailnet", ("100.64.0.2",)), now)
    bad, _ = _leaf(tailnet, ca.LeafNames(("www.example.com",), ()), now)
    (tmp_path / "good.pem").write_text(good)
    (tmp_path / "bad.pem").write_text(bad)

    def verify(leaf: str) -> subprocess.CompletedProcess:
        return subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / leaf)],
                              capture_output=True, text=True)
    assert verify("good.pem").returncode == 0
    out = verify("bad.pem")
    assert out.returncode != 0 and "permitted subtree violation" in out.stdout + out.stderr


def test_renewal_decision_with_time_passed_in() -> None:
    tailnet = ca.create_ca("tailnet", NOW)
    info = ca.cert_info(_leaf(tailnet, ca.node_names("a", "tailnet", ()))[0])
    due = info.not_before + info.lifetime * 2 / 3
    assert ca.renew_at(info, NOW) == pytest.approx(due - NOW)
    assert ca.renew_at(info, due - 1) == pytest.approx(1.0)
    assert ca.renew_at(info, due) == 0.0
    assert ca.renew_at(info, info.not_after + 10) == 0.0


def test_expired_or_future_certificate_is_never_servable() -> None:
    tailnet = ca.create_ca("tailnet", NOW)
    info = ca.cert_info(_leaf(tailnet, ca.node_names("a", "tailnet", ()))[0])
    assert ca.servable(info, NOW)
    assert ca.servable(info, info.not_after - 1)
    assert not ca.servable(info, info.not_after)
    assert not ca.servable(info, info.not_before - 1)


def test_leaf_never_outlives_its_ca() -> None:
    tailnet = ca.create_ca("tailnet", NOW, lifetime=86400.0)
    info = ca.cert_info(_leaf(tailnet, ca.node_names("a", "tailnet", ()))[0])
    assert info.not_after <= NOW + 86400.0


@pytest.mark.parametrize("csr", ["", "not pem", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                                 "x" * 10000, None, 5])
def test_bad_csr_is_a_clear_error(csr: object) -> None:
    with pytest.raises(ca.CertError):
        ca.public_key_from_csr(csr)  # type: ignore[arg-type]


def test_csr_with_a_forged_signature_is_refused() -> None:
    """A CSR whose signature does not match its key proves nothing: refused."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    k1 = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")])).sign(k1, hashes.SHA256()))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # corrupt the signature
    import base64
    pem = ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der)).decode()
           + "-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(ca.CertError):
        ca.public_key_from_csr(pem)


def test_python_ssl_accepts_the_leaf_for_its_ip_and_name(tmp_path: Path) -> None:
    now = time.time()
    tailnet = ca.create_ca("tailnet", now)
    pem, key = _leaf(tailnet, ca.node_names("web", "tailnet", ()), now)
    (tmp_path / "c.pem").write_text(pem)
    (tmp_path / "k.pem").write_text(key)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=tailnet.cert_pem)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")  # the pair loads together
