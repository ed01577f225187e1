"""The CLI's side of the LocalAPI: one blocking HTTP request over the daemon's unix socket."""

from __future__ import annotations

import errno
import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from .apitypes import API_PREFIX


class DaemonNotRunning(RuntimeError):
    """Nothing answers on the socket."""


class LocalApiRefused(RuntimeError):
    """The daemon answered with an error; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class LocalClient:
    """Talks to the daemon listening on `socket_path`."""

    def __init__(self, socket_path: str | Path, timeout: float = 60.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None,
                params: dict[str, str] | None = None) -> Any:
        """Send one request; returns the decoded JSON answer or raises a precise error."""
        url = API_PREFIX + path + ("?" + urlencode(params) if params else "")
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            try:
                conn.request(method, url, body=payload, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except FileNotFoundError:
                raise DaemonNotRunning(f"the meshnode daemon is not running (no socket at {self.socket_path})") from None
            except ConnectionRefusedError:
                raise DaemonNotRunning(f"the meshnode daemon is not running (nothing listens on {self.socket_path})") from None
            except PermissionError:
                raise DaemonNotRunning(f"permission denied on {self.socket_path}: the LocalAPI is root-only") from None
            except socket.timeout:
                raise LocalApiRefused(504, f"the daemon did not answer within {self.timeout:g}s") from None
            except OSError as exc:
                if exc.errno in (errno.ENOTSOCK, errno.ECONNRESET):
                    raise DaemonNotRunning(f"{self.socket_path}: {exc.strerror}") from None
                raise
        finally:
            conn.close()
        try:
            obj = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            raise LocalApiRefused(resp.status, f"the daemon answered {resp.status} with non-JSON") from None
        if resp.status >= 400:
            msg = obj.get("error") if isinstance(obj, dict) else None
            det = obj.get("detail") if isinstance(obj, dict) else None
            raise LocalApiRefused(resp.status, str(msg or f"HTTP {resp.status}"), str(det or ""))
        return obj

    def netcheck(self, probe_timeout: float | None = None) -> dict[str, Any]:
        """The daemon's network report (`meshnode netcheck`); `probe_timeout` bounds the control
        server probe (seconds, 0.1-10; the daemon's default otherwise)."""
        params = {"timeout": f"{probe_timeout:g}"} if probe_timeout is not None else None
        report = self.request("GET", "/netcheck", params=params)
        if not isinstance(report, dict):
            raise LocalApiRefused(502, "the daemon answered netcheck with something else than an object")
        return report
