"""Several control URLs (`--login-server URL1,URL2`): validation and the client's order of trial."""

from __future__ import annotations

import asyncio

import pytest

from meshnode.control.client import ControlClient, ControlError
from meshnode.control.protocol import generate_private_key
from meshnode.node.prefs import PrefsError, check_login_server


def test_a_list_is_checked_url_by_url() -> None:
    assert check_login_server("http://a:1, https://b/") == "http://a:1,https://b"
    assert check_login_server("http://a:1/") == "http://a:1"
    with pytest.raises(PrefsError, match="ftp://b"):
        check_login_server("http://a:1,ftp://b")
    with pytest.raises(PrefsError):
        check_login_server("http://a:1,")


def test_the_client_moves_on_when_a_server_cannot_be_reached() -> None:
    async def go() -> None:
        # Two closed loopback ports: both are tried, in order, before the error comes back.
        client = ControlClient("http://127.0.0.1:9,http://127.0.0.1:7", generate_private_key(),
                               generate_private_key(), timeout=2.0)
        assert client.server_url == "http://127.0.0.1:9"
        try:
            with pytest.raises(ControlError):
                await client.register("k", hostname="x")
            assert client.server_url == "http://127.0.0.1:7"
        finally:
            await client.close()
    asyncio.run(go())
