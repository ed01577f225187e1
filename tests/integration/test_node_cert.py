"""A node gets its certificate from a real control server's tailnet CA and serves DoT/DoH with it;
kdig verifies it against the CA that `meshnode cert --ca` prints. Real daemons, real control server,
loopback listeners (the node's --dot-listen/--doh-listen)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from meshnode.control import ca
from tests.integration.test_node_cluster import Cluster, cluster  # noqa: F401 (fixture)
from tests.support import free_port, wait_until


def kdig(port: int, qname: str, ca_file: Path, hostname: str, mode: str = "+tls") -> subprocess.CompletedProcess:
    return subprocess.run(["kdig", "@127.0.0.1", "-p", str(port), mode, f"+tls-ca={ca_file}",
                           f"+tls-hostname={hostname}", "+time=3", "+retry=0", qname, "A"],
                          capture_output=True, text=True, timeout=30)


def start_with_tls(node, *extra: str) -> tuple[int, int]:  # noqa: ANN001
    dot, doh = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    node.start("--dot-listen", f"127.0.0.1:{dot}", "--doh-listen", f"127.0.0.1:{doh}", *extra)
    return dot, doh


def serving(node) -> bool:  # noqa: ANN001
    st = json.loads(node.cli("dns", "status", "--json").stdout)
    enc = ((st["resolver"].get("server") or {}).get("encrypted") or {})
    return bool(enc.get("listeners")) and (enc.get("certificate") or {}).get("state") == "valid"


def test_node_certificate_from_the_tailnet_ca_verifies_with_kdig(cluster: Cluster, tmp_path: Path) -> None:
    alpha = cluster.nodes[0]
    dot, doh = start_with_tls(alpha)
    alpha.up(cluster.control, cluster.authkey())
    wait_until(lambda: serving(alpha), timeout=20, what="alpha's DoT/DoH with a certificate")

    out = alpha.cli("cert", "--ca")
    assert out.returncode == 0 and out.stdout.startswith("-----BEGIN CERTIFICATE-----")
    ca_file = tmp_path / "tailnet-ca.pem"
    ca_file.write_text(out.stdout)
    assert cluster.admin.tailnet_ca()[2] == out.stdout  # the CA of this control server
    me = alpha.api().request("GET", "/status")["self"]
    for host in ("magicdns.tailnet", "alpha.tailnet"):
        r = kdig(dot, "alpha.tailnet", ca_file, host)
        assert r.returncode == 0 and me["addresses"][0] in r.stdout, r.stdout + r.stderr
    r = kdig(doh, "alpha.tailnet", ca_file, "magicdns.tailnet", "+https")
    assert r.returncode == 0 and me["addresses"][0] in r.stdout, r.stdout + r.stderr
    # Another node's name is not in alpha's certificate; another CA does not vouch for it.
    assert kdig(dot, "alpha.tailnet", ca_file, "bravo.tailnet").returncode != 0
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    assert kdig(dot, "alpha.tailnet", system, "magicdns.tailnet").returncode != 0

    key = alpha.state / "tls" / "node.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    info = ca.cert_info((alpha.state / "tls" / "node.crt").read_text())
    assert {"100.100.100.100", "fd7a:115c:a1e0::53", *me["addresses"]} <= set(info.ip_addresses)
    assert ca.renew_at(info, time.time()) > 8 * 86400  # fresh: renewal is days away

    status = alpha.cli("dns", "status")
    assert "Encrypted DNS: dot 127.0.0.1" in status.stdout and "magicdns.tailnet" in status.stdout
    assert "expires: " in status.stdout, status.stdout


def test_meshnode_cert_name_writes_a_pair_and_refuses_other_names(cluster: Cluster, tmp_path: Path) -> None:
    alpha = cluster.nodes[0]
    start_with_tls(alpha)
    alpha.up(cluster.control, cluster.authkey())
    work = tmp_path / "out"
    work.mkdir()
    r = subprocess.run([*alpha_cli(alpha), "cert", "alpha.tailnet"], capture_output=True, text=True, cwd=work,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    crt, key = work / "alpha.tailnet.crt", work / "alpha.tailnet.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert ca.key_matches(crt.read_text(), key.read_text())
    (tmp_path / "ca.pem").write_text(alpha.cli("cert", "--ca").stdout)
    v = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), "-verify_hostname",
                        "alpha.tailnet", str(crt)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    r = alpha.cli("cert", "--cert-file", str(tmp_path / "x.crt"), "--key-file", str(tmp_path / "x.key"), "alpha")
    assert r.returncode == 0 and (tmp_path / "x.crt").exists()
    bad = alpha.cli("cert", "bravo")
    assert bad.returncode == 2 and "only be for this node's name" in bad.stderr
    assert alpha.cli("cert").returncode == 2


def alpha_cli(node) -> list[str]:  # noqa: ANN001
    from tests.integration.test_node_cluster import MESHNODE
    return [*MESHNODE, "--socket", str(node.sock)]


def test_install_and_uninstall_ca_with_update_ca_certificates(cluster: Cluster, tmp_path: Path) -> None:
    """Debian's real update-ca-certificates, pointed at directories of the test's own."""
    alpha = cluster.nodes[0]
    alpha.start()
    alpha.up(cluster.control, cluster.authkey())
    local, etc, certs, hooks = (tmp_path / d for d in ("local", "etc", "certs", "hooks"))
    for d in (local, etc, certs, hooks):
        d.mkdir()
    conf = tmp_path / "ca-certificates.conf"
    conf.write_text("")
    # Another trusted CA, as a real system has (Debian's tool keeps a stale bundle when none is left).
    from tests.integration.tls_helpers import make_ca
    make_ca("some other root").write(local / "other-root.crt")
    update = (f"update-ca-certificates --localcertsdir {local} --etccertsdir {etc} --certsdir {certs}"
              f" --certsconf {conf} --hooksdir {hooks}")
    r = alpha.cli("cert", "--install-ca", "--trust-dir", str(local), "--update-command", update)
    assert r.returncode == 0, r.stderr
    pem = alpha.cli("cert", "--ca").stdout
    assert (local / "meshnode-tailnet.crt").read_text() == pem
    bundle = (etc / "ca-certificates.crt").read_text()
    assert pem.strip() in bundle
    r = alpha.cli("cert", "--uninstall-ca", "--trust-dir", str(local), "--update-command", update)
    assert r.returncode == 0, r.stderr
    assert not (local / "meshnode-tailnet.crt").exists()
    assert pem.strip() not in (etc / "ca-certificates.crt").read_text()
    again = alpha.cli("cert", "--uninstall-ca", "--trust-dir", str(local), "--update-command", update)
    assert again.returncode == 0 and "was not installed" in again.stdout


def test_offline_node_serves_its_certificate_until_expiry_then_stops(cluster: Cluster, tmp_path: Path) -> None:
    alpha = cluster.nodes[0]
    dot, _ = start_with_tls(alpha)
    alpha.up(cluster.control, cluster.authkey())
    wait_until(lambda: serving(alpha), timeout=20, what="alpha's first certificate")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(alpha.cli("cert", "--ca").stdout)
    alpha.stop()
    cluster.control.stop()

    # Restarted with the control server down: the stored, valid certificate serves at once.
    dot, _ = start_with_tls(alpha)
    wait_until(lambda: serving(alpha), timeout=20, what="the stored certificate served offline")
    assert kdig(dot, "alpha.tailnet", ca_file, "magicdns.tailnet").returncode == 0
    alpha.stop()

    # Its certificate expired while it was off (signed by the same CA, so only time decides).
    domain, key_pem, cert_pem = cluster.admin.tailnet_ca()
    tailnet = ca.TailnetCa(key_pem, cert_pem, domain)
    node_key = (alpha.state / "tls" / "node.key").read_text()
    pub = ca.public_key_from_csr(ca.make_csr(node_key, "alpha"))
    old = ca.issue(tailnet, pub, ca.node_names("alpha", "tailnet", ()), time.time() - 20 * 86400)
    (alpha.state / "tls" / "node.crt").write_text(old)
    dot, _ = start_with_tls(alpha)
    wait_until(lambda: "not serving (expired" in alpha.cli("dns", "status").stdout, timeout=20,
               what="status to say the certificate expired")
    assert "EXPIRED" in alpha.cli("dns", "status").stdout
    r = kdig(dot, "alpha.tailnet", ca_file, "magicdns.tailnet")
    assert r.returncode != 0 and "100.64." not in r.stdout

    # Control back: a new certificate is fetched and served without a restart.
    cluster.control.start()
    wait_until(lambda: serving(alpha), timeout=30, what="a renewed certificate after control came back")
    assert kdig(dot, "alpha.tailnet", ca_file, "magicdns.tailnet").returncode == 0
