"""meshnode/words.py: failures in words, never a Python repr."""

from __future__ import annotations

import asyncio
import errno
import json
import re
import socket

import aiohttp
import pytest

from meshnode.words import control_unreachable, detail, hint, in_words

REPR = re.compile(r"[A-Za-z]+\(")


def _connector_error(os_error: OSError) -> aiohttp.ClientConnectorError:
    from aiohttp.client_reqrep import ConnectionKey
    key = ConnectionKey("h", 1, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, os_error)


@pytest.mark.parametrize("exc,words", [
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
    (_connector_error(ConnectionRefusedError(errno.ECONNREFUSED, "x")), "connection refused"),
    (_connector_error(OSError(errno.EHOSTUNREACH, "x")), "no route to the host"),
    (socket.gaierror(-2, "Name or service not known"), "the host name does not resolve"),
    (asyncio.TimeoutError(), "no answer in time"),
    (aiohttp.ServerDisconnectedError(), "the server closed the connection"),
    (json.JSONDecodeError("x", "doc", 0), "the answer is not JSON"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (ValueError("boom"), "unexpected ValueError"),
])
def test_failures_in_words(exc: BaseException, words: str) -> None:
    assert in_words(exc) == words
    assert not REPR.search(in_words(exc))


def test_control_unreachable_says_where_and_what_to_try() -> None:
    exc = _connector_error(ConnectionRefusedError(errno.ECONNREFUSED, "x"))
    text = control_unreachable("http://10.0.0.1:8080", exc)
    assert text == ("cannot reach the control server at http://10.0.0.1:8080: connection refused"
                    " (is the control server running, and is --login-server right?)")
    assert "ClientConnectorError" in detail(exc)  # kept for -v
    assert hint(ValueError()) == ""
