"""From policy text to a validated `Policy`: every semantic error names its section and entry."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, TypeVar

from ..derp.derpmap import RelayMap, RelayMapError
from . import hujson
from .errors import PolicyValidationError
from .locate import locate
from .model import (AclRule, Action, AutoApprovers, DstEntry, IPNetwork, Policy, PolicyTest, Selector,
                    TestDst)
from .protocols import DEFAULT_PROTOS, PORT_PROTOS, IPProto, parse_proto
from .selectors import (HOST_NAME, Names, Role, parse_port, parse_ports, parse_prefix,
                        parse_selector, split_host_port)

T = TypeVar("T")

# Sections of Tailscale's format that concern features this mesh does not have; a policy copied from
# Tailscale should still load, and `Policy.ignored_sections` says what was skipped.
IGNORED_SECTIONS = frozenset({"ssh", "sshTests", "nodeAttrs", "disableIPv4",
                              "randomizeClientPort", "OneCGNATRoute", "postures",
                              "defaultSrcPosture", "attrs"})
KNOWN_SECTIONS = frozenset({"acls", "groups", "hosts", "tagOwners", "autoApprovers", "tests", "derpMap"})

# The policy in force when none is set: every node may reach every node and route (like Tailscale).
DEFAULT_POLICY_TEXT = """{
  // The default policy: allow all traffic between all nodes.
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}
"""


def _check(where: str, fn: Callable[[], T]) -> T:
    """Run a reader, turning its ValueError into a PolicyValidationError located at `where`."""
    try:
        return fn()
    except ValueError as exc:
        raise PolicyValidationError(where, str(exc)) from None


def _expect(where: str, value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise PolicyValidationError(where, f"expected {what}, got {type(value).__name__}")
    return value


def _keys(where: str, obj: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    for key in obj:
        if key not in allowed:
            raise PolicyValidationError(where, f"unknown field {key!r} (expected one of "
                                               f"{', '.join(sorted(allowed))})")
    for key in sorted(required):
        if key not in obj:
            raise PolicyValidationError(where, f"missing field {key!r}")


def _string_list(where: str, value: Any) -> list[str]:
    _expect(where, value, list, "a list of strings")
    for i, item in enumerate(value):
        _expect(f"{where}[{i}]", item, str, "a string")
    return value


def _groups(doc: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    section = _expect("groups", doc.get("groups", {}), dict, "an object")
    groups: dict[str, tuple[str, ...]] = {}
    empty = Names(frozenset(), {}, frozenset())
    for name, members in section.items():
        where = f"groups[{name!r}]"
        if not name.startswith("group:") or len(name) == len("group:"):
            raise PolicyValidationError(where, "group names must start with 'group:'")
        for i, member in enumerate(_string_list(where, members)):
            if member.startswith("group:"):
                raise PolicyValidationError(f"{where}[{i}]", f"groups may not nest ({member!r} is a group)")
            if "@" not in member:
                raise PolicyValidationError(f"{where}[{i}]", f"a group lists users only, not {member!r}")
            _check(f"{where}[{i}]", lambda: parse_selector(member, Role.GROUP_MEMBER, empty))
        groups[name] = tuple(dict.fromkeys(members))
    return groups


def _hosts(doc: dict[str, Any]) -> dict[str, IPNetwork]:
    section = _expect("hosts", doc.get("hosts", {}), dict, "an object")
    hosts: dict[str, IPNetwork] = {}
    for name, value in section.items():
        where = f"hosts[{name!r}]"
        if not HOST_NAME.match(name) or name.startswith(("group", "tag", "autogroup")) and ":" in name:
            raise PolicyValidationError(where, "a host name is letters, digits, '.', '_' and '-'")
        _expect(where, value, str, "an IP or CIDR string")
        hosts[name] = _check(where, lambda: parse_prefix(value))
    return hosts


def _tag_owners(doc: dict[str, Any], groups: dict[str, tuple[str, ...]],
                hosts: dict[str, IPNetwork]) -> dict[str, tuple[Selector, ...]]:
    section = _expect("tagOwners", doc.get("tagOwners", {}), dict, "an object")
    for tag in section:
        if not tag.startswith("tag:") or len(tag) == len("tag:"):
            raise PolicyValidationError(f"tagOwners[{tag!r}]", "tag names must start with 'tag:'")
    names = Names(frozenset(groups), hosts, frozenset(section))
    owners: dict[str, tuple[Selector, ...]] = {}
    for tag, values in section.items():
        where = f"tagOwners[{tag!r}]"
        owners[tag] = tuple(_check(f"{where}[{i}]", lambda: parse_selector(v, Role.OWNER, names))
                            for i, v in enumerate(_string_list(where, values)))
    return owners


def _protos(where: str, rule: dict[str, Any]) -> tuple[int, ...]:
    if "proto" not in rule:
        return DEFAULT_PROTOS
    value = rule["proto"]
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    _expect(f"{where}.proto", value, str, "a protocol name or number")
    return _check(f"{where}.proto", lambda: parse_proto(value))


def _dst(where: str, text: Any, names: Names, protos: tuple[int, ...]) -> DstEntry:
    host, ports_text = _check(where, lambda: split_host_port(text))
    selector = _check(where, lambda: parse_selector(host, Role.DST, names))
    ports = _check(where, lambda: parse_ports(ports_text))
    if ports_text != "*" and not PORT_PROTOS.intersection(protos):
        raise PolicyValidationError(where, "ports must be '*' for a protocol without ports")
    return DstEntry(selector, ports)


def _acl(where: str, rule: Any, names: Names) -> AclRule:
    _expect(where, rule, dict, "an object")
    # `users` and `ports` are the older spellings of `src` and `dst` that Tailscale still reads.
    _keys(where, rule, {"action", "src", "dst", "users", "ports", "proto"}, {"action"})
    if rule["action"] != Action.ACCEPT.value:
        raise PolicyValidationError(f"{where}.action", f"unknown action {rule['action']!r} "
                                                       "(only 'accept'; what is not accepted is denied)")
    src_key = "users" if "users" in rule and "src" not in rule else "src"
    dst_key = "ports" if "ports" in rule and "dst" not in rule else "dst"
    for key in (src_key, dst_key):
        if key not in rule:
            raise PolicyValidationError(where, f"missing field {key!r}")
    protos = _protos(where, rule)
    src = tuple(_check(f"{where}.src[{i}]", lambda: parse_selector(s, Role.SRC, names))
                for i, s in enumerate(_string_list(f"{where}.src", rule[src_key])))
    dst = tuple(_dst(f"{where}.dst[{i}]", d, names, protos)
                for i, d in enumerate(_string_list(f"{where}.dst", rule[dst_key])))
    return AclRule(Action.ACCEPT, src, dst, protos)


def _auto_approvers(doc: dict[str, Any], names: Names) -> AutoApprovers:
    section = _expect("autoApprovers", doc.get("autoApprovers", {}), dict, "an object")
    _keys("autoApprovers", section, {"routes", "exitNode"}, set())
    routes_section = _expect("autoApprovers.routes", section.get("routes", {}), dict, "an object")
    routes = []
    for cidr, values in routes_section.items():
        where = f"autoApprovers.routes[{cidr!r}]"
        prefix = _check(where, lambda: parse_prefix(cidr))
        approvers = tuple(_check(f"{where}[{i}]", lambda: parse_selector(v, Role.OWNER, names))
                          for i, v in enumerate(_string_list(where, values)))
        routes.append((prefix, approvers))
    exit_node = tuple(_check(f"autoApprovers.exitNode[{i}]",
                             lambda: parse_selector(v, Role.OWNER, names))
                      for i, v in enumerate(_string_list("autoApprovers.exitNode",
                                                         section.get("exitNode", []))))
    return AutoApprovers(tuple(routes), exit_node)


def _test_dst(where: str, text: Any, names: Names) -> TestDst:
    host, port_text = _check(where, lambda: split_host_port(text))
    selector = _check(where, lambda: parse_selector(host, Role.TEST_DST, names))
    port = _check(where, lambda: parse_port(port_text))
    return TestDst(selector, port, text)


def _test(where: str, entry: Any, names: Names) -> PolicyTest:
    _expect(where, entry, dict, "an object")
    _keys(where, entry, {"src", "accept", "deny", "proto"}, {"src"})
    src_text = _expect(f"{where}.src", entry["src"], str, "a string")
    src = _check(f"{where}.src", lambda: parse_selector(src_text, Role.TEST_SRC, names))
    protos = _protos(where, entry) if "proto" in entry else (IPProto.TCP,)
    if len(protos) != 1:
        raise PolicyValidationError(f"{where}.proto", "a test checks one protocol")
    lists = {}
    for key in ("accept", "deny"):
        lists[key] = tuple(_test_dst(f"{where}.{key}[{i}]", d, names)
                           for i, d in enumerate(_string_list(f"{where}.{key}", entry.get(key, []))))
    return PolicyTest(src, lists["accept"], lists["deny"], protos[0])


def _list_section(doc: dict[str, Any], key: str) -> list[Any]:
    return _expect(key, doc.get(key, []), list, "a list")


def parse_policy(text: str) -> Policy:
    """Parse and validate policy text; raise `HuJSONError` or `PolicyValidationError` (both PolicyError),
    each with the line and column of the problem where it can be found."""
    doc = hujson.loads(text)
    try:
        return _validate(doc, text)
    except PolicyValidationError as exc:
        index = locate(hujson.standardize(text), exc.where)
        if index is None:
            raise
        raise PolicyValidationError(exc.where, exc.message, *hujson.position(text, index)) from None


def _validate(doc: Any, text: str) -> Policy:
    _expect("policy", doc, dict, "an object at the top level")
    for key in doc:
        if key == "grants":
            raise PolicyValidationError("grants", "grants are not supported; use acls")
        if key not in KNOWN_SECTIONS and key not in IGNORED_SECTIONS:
            raise PolicyValidationError(key, f"unknown section (known: {', '.join(sorted(KNOWN_SECTIONS))})")
    groups = _groups(doc)
    hosts = _hosts(doc)
    tag_owners = _tag_owners(doc, groups, hosts)
    names = Names(frozenset(groups), hosts, frozenset(tag_owners))
    acls = tuple(_acl(f"acls[{i}]", rule, names) for i, rule in enumerate(_list_section(doc, "acls")))
    auto = _auto_approvers(doc, names)
    tests = tuple(_test(f"tests[{i}]", t, names) for i, t in enumerate(_list_section(doc, "tests")))
    derp_map = None
    if "derpMap" in doc:
        try:
            derp_map = RelayMap.from_tailscale(doc["derpMap"])
        except RelayMapError as exc:
            raise PolicyValidationError("derpMap", str(exc)) from None
    return Policy(acls=acls, groups=MappingProxyType(groups), hosts=MappingProxyType(hosts),
                  tag_owners=MappingProxyType(tag_owners), auto_approvers=auto, tests=tests, derp_map=derp_map,
                  ignored_sections=tuple(k for k in doc if k in IGNORED_SECTIONS), text=text)


def default_policy() -> Policy:
    """The policy in force when the admin has set none: allow all."""
    return parse_policy(DEFAULT_POLICY_TEXT)

