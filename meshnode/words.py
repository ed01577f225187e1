"""Exceptions in words: the one place that turns a network or OS failure into a sentence a user can
act on (what failed, and what to try), keeping the Python repr for `-v` and debug logs only.

    >>> in_words(ConnectionRefusedError(111, "Connection refused"))
    'connection refused'

`in_words` names the failure; `hint` says what to try. Callers add where (the URL or the socket).
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import ssl
from typing import Protocol

import aiohttp

_ERRNO_WORDS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by the server",
    errno.ETIMEDOUT: "connection timed out",
    errno.EHOSTUNREACH: "no route to the host",
    errno.ENETUNREACH: "the network is unreachable",
    errno.EADDRNOTAVAIL: "the address is not available here",
    errno.EPIPE: "the connection was closed",
    errno.EACCES: "permission denied",
    errno.EADDRINUSE: "the address is already in use",
}


def in_words(exc: BaseException) -> str:
    """A short lower-case phrase for `exc`, never a repr."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "the server's TLS certificate is not trusted"
    if isinstance(exc, (aiohttp.ClientConnectorSSLError, aiohttp.ClientSSLError, ssl.SSLError)):
        return "the TLS handshake failed (is the URL's scheme right: http or https?)"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "the host name does not resolve"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return in_words(exc.os_error)
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut off"
    if isinstance(exc, aiohttp.ContentTypeError):
        return "the answer is not JSON"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"the server answered HTTP {exc.status}" + (f" {exc.message}" if exc.message else "")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        return "no answer in time"
    if isinstance(exc, json.JSONDecodeError):
        return "the answer is not JSON"
    if isinstance(exc, OSError):
        if exc.errno in _ERRNO_WORDS:
            return _ERRNO_WORDS[exc.errno]
        if exc.strerror:
            return exc.strerror[:1].lower() + exc.strerror[1:]
    if isinstance(exc, aiohttp.ClientError):
        text = str(exc)
        return text if text and "(" not in text else "the HTTP request failed"
    return f"unexpected {type(exc).__name__}"


def hint(exc: BaseException) -> str:
    """What to try about `exc` when talking to the control server; '' when nothing useful."""
    words = in_words(exc)
    if words in ("connection refused", "no answer in time", "connection timed out"):
        return "is the control server running, and is --login-server right?"
    if "resolve" in words:
        return "check the host name in --login-server"
    if "TLS" in words:
        return "check the scheme and host in --login-server"
    if words == "the answer is not JSON":
        return "is --login-server a meshnode control server?"
    return ""


def control_unreachable(url: str, exc: BaseException) -> str:
    """The control server at `url` could not be asked (or answered like something else)."""
    words, tip = in_words(exc), hint(exc)
    if words == "the answer is not JSON":
        return (f"the server at {url} does not answer like a meshnode control server"
                " (its answer is not JSON: check --login-server)")
    return f"cannot reach the control server at {url}: {words}" + (f" ({tip})" if tip else "")


def detail(exc: BaseException) -> str:
    """The full technical form, for `-v` and debug logs."""
    return repr(exc)


class ControlErrorLike(Protocol):
    """What `control_failure` reads of a `ControlError` (kept structural: client.py imports us)."""

    status: int
    message: str


def control_failure(url: str, exc: ControlErrorLike) -> str:
    """A `ControlError` as a user reads it: unreachable, failed, or refused, and why."""
    if exc.status == 0 and exc.message.startswith(("cannot reach", "the server at")):
        return exc.message
    if exc.status == 0 or exc.status >= 500:
        return f"the control server at {url} failed: {exc.message}"
    return f"the control server at {url} refused this node: {exc.message}"
