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


def test_node_renewal_delay_follows_time_names_and_absence() -> None:
    """The daemon's timer follows `renewal_delay` (meshnode/node/cert.py): time passed in."""
    from meshnode.node.cert import RECHECK, renewal_delay
    tailnet = ca.create_ca("tailnet", NOW)
    wanted = ca.node_names("web", "tailnet", ("100.64.0.2",))
    info = ca.cert_info(_leaf(tailnet, wanted)[0])
    assert renewal_delay(None, wanted, NOW) == 0.0  # nothing stored: ask now
    assert renewal_delay(None, None, NOW) == RECHECK  # no map yet: nothing to ask for
    assert renewal_delay(info, wanted, NOW) == pytest.approx(ca.renew_at(info, NOW))
    later = info.not_before + info.lifetime * 0.7  # past two thirds: due
    assert renewal_delay(info, wanted, later) == 0.0
    renamed = ca.node_names("web2", "tailnet", ("100.64.0.2",))
    assert renewal_delay(info, renamed, NOW) == 0.0  # a rename needs a new certificate at once
    readdressed = ca.node_names("web", "tailnet", ("100.64.0.9",))
    assert renewal_delay(info, readdressed, NOW) == 0.0
    assert renewal_delay(info, None, NOW) == pytest.approx(ca.renew_at(info, NOW))


def test_node_certificates_key_is_private_and_a_foreign_certificate_is_refused(tmp_path) -> None:  # noqa: ANN001
    import os
    import stat as st
    from meshnode.node.cert import NodeCertificates
    certs = NodeCertificates(tmp_path / "tls")
    key = certs.key_pem()
    assert certs.key_pem() == key  # made once
    assert st.S_IMODE(os.stat(certs.key_path).st_mode) == 0o600
    assert certs.current() is None
    tailnet = ca.create_ca("tailnet", NOW)
    foreign, _ = _leaf(tailnet, ca.node_names("web", "tailnet", ()))
    with pytest.raises(ca.CertError):
        certs.save(foreign, tailnet.cert_pem)
    mine = ca.issue(tailnet, ca.public_key_from_csr(ca.make_csr(key, "web")), ca.node_names("web", "tailnet", ()), NOW)
    info = certs.save(mine, tailnet.cert_pem)
    assert certs.current() == info and certs.ca_pem() == tailnet.cert_pem
    certs.cert_path.write_text("garbage")
    assert certs.current() is None  # unusable: a new one will be requested
