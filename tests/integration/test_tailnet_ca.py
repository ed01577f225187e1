"""The tailnet CA over the real node protocol: a real control server on loopback, the real client."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshnode.control import ca
from meshnode.control.client import ControlError
from meshnode.control.protocol import ErrorCode
from meshnode.control.server import ControlServer
from meshnode.control.store import ControlStore
from tests.integration.test_control_server import FAST, Tailnet, run, within_1s


@run
async def test_node_gets_a_certificate_for_its_names_and_the_ca_is_in_its_map(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        node = await net.join("web")
        await within_1s(lambda: node.map is not None, "first map")
        assert node.map.tailnet_ca == net.server.ca.cert_pem
        assert "PRIVATE KEY" not in node.map.tailnet_ca
        key = ca.new_key_pem()
        cert_pem, ca_pem = await node.client.request_cert(ca.make_csr(key, "evil.example.com"))
        assert ca_pem == net.server.ca.cert_pem
        info = ca.cert_info(cert_pem)
        me = node.map.self_node
        assert set(info.dns_names) == {"web.tailnet", "magicdns.tailnet"}  # not the CSR's name
        assert set(info.ip_addresses) == {"100.100.100.100", "fd7a:115c:a1e0::53", *me.addresses}
        assert ca.key_matches(cert_pem, key)
        assert info.lifetime == pytest.approx(ca.LEAF_LIFETIME + ca.BACKDATE)

        # The CA key stays in the control store, whose file only its owner may read.
        mode = stat.S_IMODE(os.stat(net.path).st_mode)
        assert mode == 0o600, oct(mode)


@run
async def test_garbage_csr_and_unregistered_machines_are_refused(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        node = await net.join("web")
        with pytest.raises(ControlError) as err:
            await node.client.request_cert("-----BEGIN CERTIFICATE REQUEST-----\nAA==\n-----END CERTIFICATE REQUEST-----\n")
        assert err.value.code == ErrorCode.BAD_REQUEST
        from tests.integration.test_control_server import Node
        stranger = Node(net.url)
        try:
            with pytest.raises(ControlError) as err:
                await stranger.client.request_cert(ca.make_csr(ca.new_key_pem(), "x"))
            assert err.value.code == ErrorCode.NOT_REGISTERED
        finally:
            await stranger.client.close()


@run
async def test_ca_survives_restart_and_follows_a_domain_change(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    first = ControlServer(ControlStore(path), FAST).ca
    again = ControlServer(ControlStore(path), FAST).ca
    assert again == first  # created once, on the first start
    store = ControlStore(path)
    store.set_domain("corp.ts")
    moved = ControlServer(store, FAST).ca
    assert moved.domain == "corp.ts" and moved.cert_pem != first.cert_pem
    assert ca.ca_domain(moved.cert_pem) == "corp.ts"
