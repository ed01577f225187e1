"""Packet-filter rules as they travel in a node's network map: the inbound traffic a node accepts."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import PolicyValidationError
from .model import IPNetwork, PortRange
from .selectors import parse_ports


@dataclass(frozen=True, slots=True)
class FilterRule:
    """Accept packets from any `src` prefix to any `dst` prefix with a protocol in `protos`, and,
    for TCP, UDP and SCTP, a destination port in `ports` (other protocols ignore `ports`)."""

    src: tuple[IPNetwork, ...]
    dst: tuple[IPNetwork, ...]
    ports: tuple[PortRange, ...]
    protos: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict (prefixes and port ranges as strings)."""
        return {"src": [str(p) for p in self.src], "dst": [str(p) for p in self.dst],
                "ports": ",".join(str(r) for r in self.ports),
                "protos": [int(p) for p in self.protos]}

    @classmethod
    def from_json(cls, obj: Any) -> "FilterRule":
        """The inverse of `to_json`; raises PolicyValidationError on anything malformed."""
        where = "filter rule"
        try:
            if not isinstance(obj, dict) or set(obj) != {"src", "dst", "ports", "protos"}:
                raise ValueError("expected an object with src, dst, ports and protos")
            src = tuple(ipaddress.ip_network(p) for p in _strings(obj["src"]))
            dst = tuple(ipaddress.ip_network(p) for p in _strings(obj["dst"]))
            if not isinstance(obj["ports"], str):
                raise ValueError("ports must be a string")
            ports = parse_ports(obj["ports"])
            protos = obj["protos"]
            if not isinstance(protos, list) or not all(
                    isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 255 for p in protos):
                raise ValueError("protos must be a list of numbers 0-255")
        except (ValueError, TypeError) as exc:
            raise PolicyValidationError(where, str(exc)) from None
        return cls(src, dst, ports, tuple(protos))


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return value


def rules_to_json(rules: Iterable[FilterRule]) -> list[dict[str, Any]]:
    """Every rule's JSON form, in order."""
    return [r.to_json() for r in rules]


def rules_from_json(obj: Any) -> tuple[FilterRule, ...]:
    """Rules from their JSON list form; raises PolicyValidationError naming the bad entry."""
    if not isinstance(obj, list):
        raise PolicyValidationError("filter rules", "expected a list")
    rules = []
    for i, item in enumerate(obj):
        try:
            rules.append(FilterRule.from_json(item))
        except PolicyValidationError as exc:
            raise PolicyValidationError(f"filter rules[{i}]", exc.message) from None
    return tuple(rules)
