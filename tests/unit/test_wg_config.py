"""The wg-quick file parser and `meshnode wg`'s handling of bad files (exit code 2, line named)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshnode.cli import main
from meshnode.wg.config import ConfigError, parse_config, parse_endpoint
from meshnode.wg.crypto import encode_key

K1 = encode_key(bytes(range(32)))
K2 = encode_key(bytes(range(1, 33)))
K3 = encode_key(bytes(range(2, 34)))

GOOD = f"""
# a comment
[Interface]
PrivateKey = {K1}
Address = 10.0.0.1/24, fd00::1/64
ListenPort = 51820
MTU = 1400
DNS = 10.0.0.53   # wg-quick only: ignored

[Peer]
PublicKey = {K2}
PresharedKey = {K3}
AllowedIPs = 10.0.0.2/32, 192.168.7.0/24
AllowedIPs = fd00::2/128
Endpoint = 198.51.100.7:51820
PersistentKeepalive = 25

[peer]
publickey = {K3}
endpoint = [2001:db8::1]:4500
"""


def test_parses_a_full_file() -> None:
    cfg = parse_config(GOOD)
    assert cfg.private_key == bytes(range(32))
    assert [str(a) for a in cfg.addresses] == ["10.0.0.1/24", "fd00::1/64"]
    assert (cfg.listen_port, cfg.mtu) == (51820, 1400)
    p1, p2 = cfg.peers
    assert p1.allowed_ips == tuple(ipaddress.ip_network(n) for n in
                                   ("10.0.0.2/32", "192.168.7.0/24", "fd00::2/128"))
    assert p1.endpoint == ("198.51.100.7", 51820) and p1.persistent_keepalive == 25
    assert p1.preshared_key == bytes(range(2, 34))
    assert p2.endpoint == ("2001:db8::1", 4500) and p2.allowed_ips == ()
    assert p2.preshared_key == bytes(32)


def test_defaults() -> None:
    cfg = parse_config(f"[Interface]\nPrivateKey={K1}\n")
    assert (cfg.listen_port, cfg.mtu, cfg.addresses, cfg.peers) == (None, 1280, (), ())


@pytest.mark.parametrize("text,line,fragment", [
    ("[Interface]\nPrivateKey = nope\n", 2, "PrivateKey"),
    (f"[Interface]\nPrivateKey = {K1}\nAddress = 10.0.0.300/24\n", 3, "Address"),
    (f"[Interface]\nPrivateKey = {K1}\nListenPort = 70000\n", 3, "ListenPort"),
    (f"[Interface]\nPrivateKey = {K1}\nBogus = 1\n", 3, "unknown"),
    (f"[Interface]\nPrivateKey = {K1}\n[Peer]\nAllowedIPs = 10.0.0.0/8\n", 3, "no PublicKey"),
    (f"[Interface]\nPrivateKey = {K1}\n[Peer]\nPublicKey = {K2}\nEndpoint = host\n", 5, "Endpoint"),
    (f"[Interface]\nPrivateKey = {K1}\n[Peer]\nPublicKey = {K2}\nAllowedIPs = x\n", 5, "AllowedIPs"),
    (f"[Interface]\nPrivateKey = {K1}\n[Peer]\nPublicKey = {K2}\n[Peer]\nPublicKey = {K2}\n", 5,
     "twice"),
    (f"[Interface]\nPrivateKey = {K1}\nPrivateKey = {K1}\n", 3, "twice"),
    ("PrivateKey = x\n", 1, "outside"),
    ("[Interface]\n", 1, "no PrivateKey"),
    ("[Wat]\n", 1, "unknown section"),
    ("[Interface]\njunk line\n", 2, "Key = Value"),
])
def test_errors_name_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "f.conf")
    assert f"f.conf:{line}:" in str(exc.value) and fragment in str(exc.value)


def test_missing_interface_section() -> None:
    with pytest.raises(ConfigError, match="no \\[Interface\\]"):
        parse_config("")


@pytest.mark.parametrize("text", ["1.2.3.4", "1.2.3.4:0", "::1:80", "[::1]80", ":80", "h:x"])
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


def test_cli_bad_config_exits_2_naming_the_line(tmp_path: Path) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {K1}\nMTU = lots\n")
    result = CliRunner().invoke(main, ["wg", "--config", str(conf), "--tun", "x0"])
    assert result.exit_code == 2
    assert f"{conf}:3: MTU" in result.output


def test_cli_missing_file_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["wg", "--config", str(tmp_path / "nope.conf")])
    assert result.exit_code == 2 and "cannot read" in result.output
