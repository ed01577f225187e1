"""The node's preferences: what the user asked for with `meshnode up` (and `down`), as one frozen value.

Prefs are persisted in the state directory so a restarted daemon comes back in the state the user left
it in. The auth key is deliberately not a pref: it is used once, to register, and never stored.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import urlparse


class PrefsError(ValueError):
    """A pref value that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class Prefs:
    """What the user wants this node to be; flags mirror `tailscale up`."""

    login_server: str = ""
    hostname: str = ""
    accept_dns: bool = True
    accept_routes: bool = False
    advertise_routes: tuple[str, ...] = ()
    advertise_exit_node: bool = False
    exit_node: str = ""
    advertise_tags: tuple[str, ...] = ()
    shields_up: bool = False                  # drop every new connection arriving from the tailnet
    exit_node_allow_lan_access: bool = False  # with an exit node: the local networks stay reachable
    # False after `down`: the daemon keeps keys and map but neither connects nor serves DNS.
    want_running: bool = False

    def to_json(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}

    def updated(self, **changes: Any) -> "Prefs":
        """A validated copy with `changes` applied."""
        return validate_prefs(replace(self, **changes))


def check_login_server(url: str) -> str:
    """An http(s) URL with a host, or several separated by commas (replicas of one control server,
    tried in order); returns them without trailing slashes."""
    urls = [u.strip() for u in url.split(",")]
    for u in urls:
        parsed = urlparse(u)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise PrefsError(f"login_server: {u!r} must be an http:// or https:// URL with a host")
    return ",".join(u.rstrip("/") for u in urls)


def check_route(text: str) -> str:
    """A CIDR prefix as `--advertise-routes` takes it, normalised ('10.0.0.1/24' is refused)."""
    try:
        return str(ipaddress.ip_network(text.strip(), strict=True))
    except ValueError as exc:
        raise PrefsError(f"advertise_routes: {text!r}: {exc}") from None


def check_tag(text: str) -> str:
    tag = text.strip()
    if not tag.startswith("tag:") or len(tag) <= 4 or not all(c.isalnum() or c in "-_" for c in tag[4:]):
        raise PrefsError(f"advertise_tags: {text!r} must look like 'tag:name' (letters, digits, '-', '_')")
    return tag


def validate_prefs(p: Prefs) -> Prefs:
    """Check every field; returns a normalised copy or raises `PrefsError`."""
    login = check_login_server(p.login_server) if p.login_server else ""
    routes = tuple(check_route(r) for r in p.advertise_routes)
    tags = tuple(check_tag(t) for t in p.advertise_tags)
    if len(p.hostname) > 253:
        raise PrefsError("hostname: longer than 253 characters")
    return replace(p, login_server=login, advertise_routes=routes, advertise_tags=tags)


_BOOL_FIELDS = {"accept_dns", "accept_routes", "advertise_exit_node", "want_running", "shields_up",
                "exit_node_allow_lan_access"}
# The prefs a user sets with `up`/`set` flags (all but login_server and want_running), flag-named.
SETTABLE = ("hostname", "accept_dns", "accept_routes", "advertise_routes", "advertise_exit_node",
            "exit_node", "exit_node_allow_lan_access", "advertise_tags", "shields_up")


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def flag_text(field: str, value: Any) -> str:
    """The `up` flag that sets `field` to `value`, as a user would type it."""
    if isinstance(value, bool):
        return flag_name(field) + ("" if value else "=false")
    if isinstance(value, (tuple, list)):
        return f"{flag_name(field)}={','.join(value)}"
    return f"{flag_name(field)}={value}" if value else f"{flag_name(field)}="
_STR_FIELDS = {"login_server", "hostname", "exit_node"}
_LIST_FIELDS = {"advertise_routes", "advertise_tags"}


def prefs_from_json(obj: Any) -> Prefs:
    """Parse the stored form; unknown keys are ignored so a newer daemon's file still loads."""
    if not isinstance(obj, dict):
        raise PrefsError("prefs must be a JSON object")
    values: dict[str, Any] = {}
    for key, value in obj.items():
        if key in _BOOL_FIELDS:
            if not isinstance(value, bool):
                raise PrefsError(f"{key}: expected true or false")
            values[key] = value
        elif key in _STR_FIELDS:
            if not isinstance(value, str):
                raise PrefsError(f"{key}: expected a string")
            values[key] = value
        elif key in _LIST_FIELDS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PrefsError(f"{key}: expected a list of strings")
            values[key] = tuple(value)
    return validate_prefs(Prefs(**values))
