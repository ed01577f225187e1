"""LocalAPI requests as values, and their validation (sans-I/O).

The LocalAPI server turns the JSON body or query string of each request into one of these frozen
dataclasses, or an `ApiError` naming the bad field; the daemon only ever sees validated requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from magicdns.names import NameError_, normalize_domain

from .prefs import PrefsError, check_login_server, check_route, check_tag

API_PREFIX = "/localapi/v0"
# Query types `dns query` accepts; the resolver supports these (DESIGN.md section 3).
QUERY_TYPES = frozenset({"A", "AAAA", "CNAME", "TXT", "SRV", "MX", "CAA", "PTR", "NS", "SOA", "ANY"})


class ApiError(Exception):
    """A request the LocalAPI refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail  # technical form (`meshnode -v` shows it); never the message itself


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


@dataclass(frozen=True, slots=True)
class UpRequest:
    """`meshnode up`: None means 'keep what is set'."""

    login_server: str | None = None
    authkey: str | None = field(default=None, repr=False)   # a secret: never in a log line or repr
    hostname: str | None = None
    accept_dns: bool | None = None
    accept_routes: bool | None = None
    advertise_routes: tuple[str, ...] | None = None
    advertise_exit_node: bool | None = None
    exit_node: str | None = None
    advertise_tags: tuple[str, ...] | None = None
    timeout: float = 30.0  # seconds to wait for the first network map
    force_reauth: bool = False  # forget node key and pinned server key: register afresh
    interactive: bool = False   # no auth key: log in through the browser (the server gives a URL)
    shields_up: bool | None = None
    exit_node_allow_lan_access: bool | None = None


@dataclass(frozen=True, slots=True)
class QueryRequest:
    name: str
    qtype: str


@dataclass(frozen=True, slots=True)
class PingRequest:
    peer: str
    count: int = 1
    timeout: float = 2.0  # seconds per probe
    until_direct: bool = False  # stop at the first pong over a direct path


@dataclass(frozen=True, slots=True)
class NetcheckRequest:
    timeout: float = 2.0  # seconds for the control server to answer GET /key


@dataclass(frozen=True, slots=True)
class IpRequest:
    family: int | None  # 4, 6 or None for both
    peer: str | None    # None for this node


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _check_keys(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _opt_str(body: Mapping[str, Any], key: str, max_len: int = 1024) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"{key}: expected a string")
    if len(value) > max_len:
        raise bad_request(f"{key}: longer than {max_len} characters")
    return value


def _opt_bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise bad_request(f"{key}: expected true or false")


def _opt_list(body: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f"{key}: expected a list of strings")
    if len(value) > 1000:
        raise bad_request(f"{key}: at most 1000 entries")
    return tuple(value)


def parse_up(body: Any) -> UpRequest:
    """Validate an `up` request; flag values are checked here so the CLI gets the reason at once."""
    obj = _object(body)
    _check_keys(obj, {f for f in UpRequest.__dataclass_fields__})
    try:
        login = _opt_str(obj, "login_server")
        login = check_login_server(login) if login is not None else None
        routes = _opt_list(obj, "advertise_routes")
        routes = tuple(check_route(r) for r in routes) if routes is not None else None
        tags = _opt_list(obj, "advertise_tags")
        tags = tuple(check_tag(t) for t in tags) if tags is not None else None
    except PrefsError as exc:
        raise bad_request(str(exc)) from None
    timeout = obj.get("timeout", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise bad_request("timeout: expected a number of seconds from 0 to 3600")
    hostname = _opt_str(obj, "hostname", 253)
    if hostname is not None and not hostname.strip():
        raise bad_request("hostname: must not be empty")
    return UpRequest(login, _opt_str(obj, "authkey"), hostname, _opt_bool(obj, "accept_dns"),
                     _opt_bool(obj, "accept_routes"), routes, _opt_bool(obj, "advertise_exit_node"),
                     _opt_str(obj, "exit_node", 253), tags, float(timeout),
                     bool(_opt_bool(obj, "force_reauth")), interactive=bool(_opt_bool(obj, "interactive")),
                     shields_up=_opt_bool(obj, "shields_up"),
                     exit_node_allow_lan_access=_opt_bool(obj, "exit_node_allow_lan_access"))


_SET_ONLY_UP = {"login_server", "authkey", "force_reauth", "interactive"}


def parse_set(body: Any) -> UpRequest:
    """Validate a `set` request: the prefs of `up` (one or more), without login or auth key."""
    obj = _object(body)
    _check_keys(obj, {f for f in UpRequest.__dataclass_fields__} - _SET_ONLY_UP)
    req = parse_up(obj)
    if all(getattr(req, k) is None for k in ("hostname", "accept_dns", "accept_routes", "advertise_routes",
                                              "advertise_exit_node", "exit_node", "advertise_tags",
                                              "shields_up", "exit_node_allow_lan_access")):
        raise bad_request("nothing to set: give at least one preference")
    return req


@dataclass(frozen=True, slots=True)
class WhoisRequest:
    address: str         # a tailnet IP address (the port, if given, is dropped)


def parse_whois(params: Mapping[str, str]) -> WhoisRequest:
    """Validate `whois` parameters: addr=IP, IP:PORT or [IPv6]:PORT."""
    import ipaddress
    _check_keys(params, {"addr"})
    text = (params.get("addr") or "").strip()
    host = text
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            raise bad_request(f"addr: {text!r} is not IP, IP:PORT or [IPv6]:PORT")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            raise bad_request(f"addr: {text!r} is not IP, IP:PORT or [IPv6]:PORT")
    try:
        return WhoisRequest(str(ipaddress.ip_address(host)))
    except ValueError:
        raise bad_request(f"addr: {text!r} is not IP, IP:PORT or [IPv6]:PORT") from None


def parse_query(body: Any) -> QueryRequest:
    """Validate a `dns query` request: a domain name and a supported type (default A)."""
    obj = _object(body)
    _check_keys(obj, {"name", "type"})
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise bad_request("name: expected a domain name")
    try:
        normalize_domain(name)
    except NameError_ as exc:
        raise bad_request(f"name: {exc}") from None
    qtype = obj.get("type", "A")
    if not isinstance(qtype, str) or qtype.upper() not in QUERY_TYPES:
        raise bad_request(f"type: expected one of {', '.join(sorted(QUERY_TYPES))}")
    return QueryRequest(name.strip(), qtype.upper())


def parse_ip(params: Mapping[str, str]) -> IpRequest:
    """Validate `ip` query parameters: family=4|6 and an optional peer name or address."""
    _check_keys(params, {"family", "peer"})
    family_text = params.get("family")
    family: int | None = None
    if family_text is not None:
        if family_text not in ("4", "6"):
            raise bad_request("family: expected 4 or 6")
        family = int(family_text)
    peer = params.get("peer") or None
    if peer is not None and len(peer) > 253:
        raise bad_request("peer: longer than 253 characters")
    return IpRequest(family, peer)


def parse_ping(body: Any) -> PingRequest:
    """Validate a `ping` request: a peer (name or address), 1-100 probes, 0.1-30 s each."""
    obj = _object(body)
    _check_keys(obj, {"peer", "count", "timeout", "until_direct"})
    peer = _opt_str(obj, "peer", 253)
    if not peer or not peer.strip():
        raise bad_request("peer: expected a peer name or address")
    count = obj.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100:
        raise bad_request("count: expected an integer from 1 to 100")
    timeout = obj.get("timeout", 2.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0.1 <= timeout <= 30:
        raise bad_request("timeout: expected seconds from 0.1 to 30")
    until_direct = obj.get("until_direct", False)
    if not isinstance(until_direct, bool):
        raise bad_request("until_direct: expected true or false")
    return PingRequest(peer.strip(), count, float(timeout), until_direct)


def parse_netcheck(params: Mapping[str, str]) -> NetcheckRequest:
    """Validate `netcheck` query parameters: timeout=SECONDS (0.1-10) for the control server probe."""
    _check_keys(params, {"timeout"})
    text = params.get("timeout")
    if text is None:
        return NetcheckRequest()
    try:
        timeout = float(text)
    except ValueError:
        raise bad_request("timeout: expected seconds from 0.1 to 10") from None
    if not 0.1 <= timeout <= 10:  # also refuses nan
        raise bad_request("timeout: expected seconds from 0.1 to 10")
    return NetcheckRequest(timeout)


@dataclass(frozen=True, slots=True)
class ServeRequest:
    """`meshnode serve --tcp|--http PORT TARGET` (target already normalised by serve.parse_target)."""

    kind: str      # "tcp" or "http"
    port: int
    target: str


def parse_serve(body: Any) -> ServeRequest:
    """Validate a serve request: kind tcp|http (https is refused with the reason), a port, a local target."""
    from .serve import Kind, ServeError, parse_target
    obj = _object(body)
    _check_keys(obj, {"kind", "port", "target"})
    kind = obj.get("kind")
    if kind == "https":
        raise ApiError(409, "HTTPS needs the tailnet's certificate authority, which this tailnet does not"
                            " have yet; serve over --http for now (the tunnel already encrypts it)")
    if kind not in ("tcp", "http"):
        raise bad_request("kind: expected tcp or http")
    port = obj.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise bad_request("port: expected a port number from 1 to 65535")
    target = _opt_str(obj, "target", 1024)
    if not target:
        raise bad_request("target: expected e.g. tcp://127.0.0.1:22 or http://127.0.0.1:8080")
    try:
        return ServeRequest(kind, port, parse_target(Kind(kind), target))
    except ServeError as exc:
        raise bad_request(str(exc)) from None


def parse_serve_off(body: Any) -> int:
    obj = _object(body)
    _check_keys(obj, {"port"})
    port = obj.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise bad_request("port: expected a port number from 1 to 65535")
    return port


@dataclass(frozen=True, slots=True)
class CertRequest:
    """`meshnode cert NAME`: the CLI's CSR (its key stays with the CLI) and the name asked for."""

    csr: str
    name: str


def parse_cert(body: Any) -> CertRequest:
    obj = _object(body)
    _check_keys(obj, {"csr", "name"})
    csr, name = obj.get("csr"), obj.get("name")
    if not isinstance(csr, str) or "BEGIN CERTIFICATE REQUEST" not in csr or len(csr) > 8192:
        raise bad_request("csr: expected a PEM certificate request")
    if not isinstance(name, str) or not name.strip() or len(name) > 253:
        raise bad_request("name: expected this node's name")
    return CertRequest(csr, name.strip())
