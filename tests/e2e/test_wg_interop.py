"""meshnode's WireGuard engine against Debian's wireguard-go, in two network namespaces.

wireguard-go runs in the foreground (`-f`) in namespace a, configured with `wg setconf`;
`meshnode wg` runs in namespace b. Each side initiates in turn; ping and a TCP transfer must cross."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from meshnode.wg.crypto import clamp, encode_key, public_key
from tests.e2e.netns import NetnsPair, check_tcp_transfer
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root,
              pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="no wireguard-go")]

TUN_A, TUN_B = "10.201.0.1", "10.201.0.2"
TUN_A6, TUN_B6 = "fd00:201::1", "fd00:201::2"
PORT = 51820
TRANSFER = 4 << 20
# meshnode.cli has no __main__ guard; this runs the console script's entry point with our Python.
MESHNODE = "import sys; from meshnode.cli import main; sys.argv[0] = 'meshnode'; main()"

def keypair() -> tuple[bytes, bytes]:
    private = clamp(os.urandom(32))
    return private, public_key(private)


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    p = NetnsPair.create("mnwg")
    try:
        yield p
    finally:
        p.destroy()


def endpoint(pair: NetnsPair, side: str, v6: bool) -> str:
    if v6:
        return f"[{pair.a_addr6 if side == 'a' else pair.b_addr6}]:{PORT}"
    return f"{pair.a_addr if side == 'a' else pair.b_addr}:{PORT}"


def start_wireguard_go(pair: NetnsPair, tmp: Path, private: bytes, peer_public: bytes,
                       psk: bytes | None = None, v6: bool = False) -> str:
    ifname = f"wg{pair.a.name}"[:15]
    proc = pair.a.popen("wireguard-go", "-f", ifname, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    wait_until(lambda: proc.poll() is None and Path(f"/var/run/wireguard/{ifname}.sock").exists(),
               timeout=10, what="wireguard-go's UAPI socket")
    conf = tmp / "wggo.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {encode_key(private)}\nListenPort = {PORT}\n\n"
                    f"[Peer]\nPublicKey = {encode_key(peer_public)}\n"
                    f"AllowedIPs = {TUN_B}/32, {TUN_B6}/128\nEndpoint = {endpoint(pair, 'b', v6)}\n"
                    + (f"PresharedKey = {encode_key(psk)}\n" if psk else ""))
    pair.a.run("wg", "setconf", ifname, str(conf))
    pair.a.run("ip", "addr", "add", f"{TUN_A}/24", "dev", ifname)
    pair.a.run("ip", "-6", "addr", "add", f"{TUN_A6}/64", "dev", ifname)
    pair.a.run("ip", "link", "set", ifname, "mtu", "1280", "up")
    return ifname


def start_meshnode(pair: NetnsPair, tmp: Path, private: bytes, peer_public: bytes,
                   offload: str = "gro", psk: bytes | None = None, v6: bool = False) -> str:
    ifname = f"mn{pair.b.name}"[:15]
    conf = tmp / "meshnode.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {encode_key(private)}\n"
                    f"Address = {TUN_B}/24, {TUN_B6}/64\nListenPort = {PORT}\n\n"
                    f"[Peer]\nPublicKey = {encode_key(peer_public)}\n"
                    f"AllowedIPs = {TUN_A}/32, {TUN_A6}/128\nEndpoint = {endpoint(pair, 'a', v6)}\n"
                    + (f"PresharedKey = {encode_key(psk)}\n" if psk else ""))
    log = open(tmp / "meshnode.log", "wb")
    proc = pair.b.popen(sys.executable, "-c", MESHNODE, "wg", "--config", str(conf),
                        "--tun", ifname, stdout=log, stderr=subprocess.STDOUT,
                        env={**os.environ, "MESHNODE_WG_OFFLOAD": offload},
                        cwd=str(Path(__file__).resolve().parents[2]))
    wait_until(lambda: proc.poll() is None and b"listening" in (tmp / "meshnode.log").read_bytes(),
               timeout=15, what="meshnode wg to come up (see meshnode.log)")
    return ifname


def ping(pair: NetnsPair, side: str, dst: str) -> bool:
    ns = pair.a if side == "a" else pair.b
    return ns.ping(dst) is not None


def tcp_transfer(pair: NetnsPair, server_side: str, v6: bool = False) -> None:
    server_ns, client_ns = (pair.a, pair.b) if server_side == "a" else (pair.b, pair.a)
    server_ip = (TUN_A6 if v6 else TUN_A) if server_side == "a" else (TUN_B6 if v6 else TUN_B)
    check_tcp_transfer(server_ns, server_ip, client_ns, TRANSFER)


# Each side initiates in turn; meshnode's TUN offload modes (coalesced GSO writes by default, TSO
# reads, none) each carry the TCP transfer both ways; two cases add a preshared key, two run the
# tunnel over IPv6.
@pytest.mark.parametrize("initiator,offload,psk,v6", [
    ("wireguard-go", "gro", False, False), ("meshnode", "gro", False, True),
    ("meshnode", "tso", True, False), ("wireguard-go", "none", True, True)])
def test_interop_with_wireguard_go(pair: NetnsPair, tmp_path: Path, initiator: str,
                                   offload: str, psk: bool, v6: bool) -> None:
    a_priv, a_pub = keypair()
    b_priv, b_pub = keypair()
    shared = os.urandom(32) if psk else None
    wg_if = start_wireguard_go(pair, tmp_path, a_priv, b_pub, shared, v6)
    start_meshnode(pair, tmp_path, b_priv, a_pub, offload, shared, v6)
    first, dst = ("a", TUN_B) if initiator == "wireguard-go" else ("b", TUN_A)
    wait_until(lambda: ping(pair, first, dst), timeout=20, what=f"{initiator} to reach its peer")
    assert ping(pair, "b" if first == "a" else "a", TUN_A if first == "a" else TUN_B)
    shown = pair.a.run("wg", "show", wg_if, "latest-handshakes").stdout
    assert encode_key(b_pub) in shown and not shown.strip().endswith("\t0")
    assert endpoint(pair, "b", v6) in pair.a.run("wg", "show", wg_if, "endpoints").stdout
    tcp_transfer(pair, server_side="a" if initiator == "meshnode" else "b")
    tcp_transfer(pair, server_side="b" if initiator == "meshnode" else "a")
    tcp_transfer(pair, server_side="a" if initiator == "meshnode" else "b", v6=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_meshnode_wg_cleans_up_on_signal(pair: NetnsPair, tmp_path: Path, sig: int) -> None:
    b_priv, _ = keypair()
    _, a_pub = keypair()
    ifname = start_meshnode(pair, tmp_path, b_priv, a_pub)
    assert TUN_B in pair.b.run("ip", "-br", "addr", "show", "dev", ifname).stdout
    (proc,) = pair.b.processes
    proc.send_signal(sig)
    assert proc.wait(timeout=10) == 0
    assert pair.b.run("ip", "link", "show", ifname, check=False).returncode != 0
    assert TUN_A not in pair.b.run("ip", "route").stdout


def test_meshnode_wg_exits_when_its_interface_is_deleted(pair: NetnsPair, tmp_path: Path) -> None:
    b_priv, _ = keypair()
    _, a_pub = keypair()
    ifname = start_meshnode(pair, tmp_path, b_priv, a_pub)
    pair.b.run("ip", "link", "del", ifname)
    (proc,) = pair.b.processes
    assert proc.wait(timeout=10) == 1
    assert b"reading the TUN" in (tmp_path / "meshnode.log").read_bytes()
