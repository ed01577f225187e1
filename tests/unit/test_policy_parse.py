"""Parsing and validating policy files: every section, and every kind of semantic error."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.policy import (DEFAULT_PROTOS, HuJSONError, IPProto, PolicyError, PolicyValidationError, PortRange,
                             SelectorKind, default_policy, parse_policy)

SAMPLE = Path(__file__).resolve().parents[2] / "conf" / "policy.hujson"

BASE = """{
  "groups": {"group:dev": ["bob@example.com", "carol@example.com"]},
  "hosts": {"db": "100.64.0.9", "lan": "192.168.1.0/24"},
  "tagOwners": {"tag:server": ["group:dev"], "tag:ci": ["tag:server", "alice@example.com"]},
  %s
}"""


def _acl(src: str, dst: str, extra: str = "") -> str:
    return BASE % f'"acls": [{{"action": "accept", "src": [{src}], "dst": [{dst}]{extra}}}],'


def test_sample_policy_parses() -> None:
    policy = parse_policy(SAMPLE.read_text())
    assert policy.acls and policy.tests and policy.groups and policy.hosts and policy.tag_owners
    assert policy.auto_approvers.routes and policy.auto_approvers.exit_node
    assert policy.text == SAMPLE.read_text()


def test_sections_are_read() -> None:
    policy = parse_policy(_acl('"group:dev", "tag:ci", "lan", "10.0.0.1"',
                               '"db:22", "tag:server:80,443", "[fd7a:115c:a1e0::1]:1000-2000", "*:*"'))
    assert policy.groups["group:dev"] == ("bob@example.com", "carol@example.com")
    assert policy.hosts["lan"] == ipaddress.ip_network("192.168.1.0/24")
    assert policy.hosts["db"] == ipaddress.ip_network("100.64.0.9/32")
    assert [s.kind for s in policy.tag_owners["tag:ci"]] == [SelectorKind.TAG, SelectorKind.USER]
    (rule,) = policy.acls
    assert [s.kind for s in rule.src] == [SelectorKind.GROUP, SelectorKind.TAG, SelectorKind.HOST,
                                          SelectorKind.PREFIX]
    assert rule.src[3].prefix == ipaddress.ip_network("10.0.0.1/32")
    assert [d.ports for d in rule.dst] == [
        (PortRange(22, 22),), (PortRange(80, 80), PortRange(443, 443)), (PortRange(1000, 2000),),
        (PortRange(0, 65535),)]
    assert rule.dst[2].selector.prefix == ipaddress.ip_network("fd7a:115c:a1e0::1/128")
    assert rule.protos == DEFAULT_PROTOS


def test_ports_are_merged_and_sorted() -> None:
    policy = parse_policy(_acl('"*"', '"db:443,80-90,85-100,101"'))
    assert policy.acls[0].dst[0].ports == (PortRange(80, 101), PortRange(443, 443))


def test_ipv6_without_brackets_splits_at_last_colon() -> None:
    policy = parse_policy(_acl('"*"', '"fd7a:115c:a1e0::/48:*"'))
    assert policy.acls[0].dst[0].selector.prefix == ipaddress.ip_network("fd7a:115c:a1e0::/48")


def test_legacy_users_and_ports_fields() -> None:
    policy = parse_policy(BASE % '"acls": [{"action": "accept", "users": ["*"], "ports": ["db:22"]}]')
    assert policy.acls[0].src[0].kind is SelectorKind.ANY
    assert policy.acls[0].dst[0].selector.name == "db"


@pytest.mark.parametrize("proto, expected", [('"tcp"', (IPProto.TCP,)), ('"icmp"', (1, 58)),
                                             ("17", (17,)), ('"47"', (47,))])
def test_proto(proto: str, expected: tuple[int, ...]) -> None:
    ports = '"db:22"' if 6 in expected or 17 in expected else '"db:*"'
    policy = parse_policy(_acl('"*"', ports, f', "proto": {proto}'))
    assert policy.acls[0].protos == expected


def test_empty_policy_denies_everything_and_default_allows_all() -> None:
    assert parse_policy("{}").acls == ()
    (rule,) = default_policy().acls
    assert rule.src[0].kind is SelectorKind.ANY and rule.dst[0].selector.kind is SelectorKind.ANY


def test_tailscale_only_sections_are_ignored_and_reported() -> None:
    policy = parse_policy('{"ssh": [{"action": "check"}], "nodeAttrs": [], "acls": []}')
    assert policy.ignored_sections == ("ssh", "nodeAttrs")


def test_syntax_error_has_line_and_column() -> None:
    with pytest.raises(HuJSONError) as info:
        parse_policy('{\n  "acls": [\n    {"action": "accept" "src": ["*"]},\n  ],\n}')
    assert (info.value.line, info.value.column) == (3, 25)
    assert "line 3, column 25" in str(info.value)


@pytest.mark.parametrize("text, where, words", [
    (_acl('"group:nope"', '"*:*"'), "acls[0].src[0]", "unknown group 'group:nope'"),
    (_acl('"*"', '"group:nope:22"'), "acls[0].dst[0]", "unknown group"),
    (_acl('"tag:nope"', '"*:*"'), "acls[0].src[0]", "undefined tag 'tag:nope'"),
    (_acl('"*"', '"db:http"'), "acls[0].dst[0]", "bad port 'http'"),
    (_acl('"*"', '"db:70000"'), "acls[0].dst[0]", "above 65535"),
    (_acl('"*"', '"db:90-80"'), "acls[0].dst[0]", "first above last"),
    (_acl('"*"', '"db:"'), "acls[0].dst[0]", "bad port ''"),
    (_acl('"*"', '"db"'), "acls[0].dst[0]", "host:ports"),
    (_acl('"10.0.0.0/33"', '"*:*"'), "acls[0].src[0]", "bad IP or CIDR"),
    (_acl('"10.0.0.1/8"', '"*:*"'), "acls[0].src[0]", "host bits set"),
    (_acl('"*"', '"300.1.1.1:22"'), "acls[0].dst[0]", "bad IP or CIDR"),
    (_acl('"role:admin"', '"*:*"'), "acls[0].src[0]", "unknown selector kind 'role:'"),
    (_acl('"autogroup:admin"', '"*:*"'), "acls[0].src[0]", "unknown autogroup"),
    (_acl('"autogroup:self"', '"*:*"'), "acls[0].src[0]", "not allowed as a src"),
    (_acl('"nosuchhost"', '"*:*"'), "acls[0].src[0]", "unknown selector 'nosuchhost'"),
    (_acl('"*"', '"db:22"', ', "proto": "icmp"'), "acls[0].dst[0]", "ports must be '*'"),
    (_acl('"*"', '"db:22"', ', "proto": "carrier-pigeon"'), "acls[0].proto", "unknown protocol"),
    (_acl('"*"', '"db:22"', ', "proto": 300'), "acls[0].proto", "unknown protocol"),
    (_acl('"*"', '"db:22"', ', "color": "red"'), "acls[0]", "unknown field 'color'"),
    (BASE % '"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]', "acls[0].action", "unknown action"),
    (BASE % '"acls": [{"action": "accept", "dst": ["*:*"]}]', "acls[0]", "missing field 'src'"),
    (BASE % '"acls": [{"action": "accept", "src": "*", "dst": ["*:*"]}]', "acls[0].src", "a list of strings"),
    (BASE % '"acls": {}', "acls", "expected a list"),
    ('{"groups": {"group:a": ["x@y"], "group:b": ["group:a"]}}', "groups['group:b'][0]", "may not nest"),
    ('{"groups": {"admins": ["x@y"]}}', "groups['admins']", "must start with 'group:'"),
    ('{"groups": {"group:a": ["tag:x"]}}', "groups['group:a'][0]", "users only"),
    ('{"groups": {"group:a": ["bob"]}}', "groups['group:a'][0]", "users only"),
    ('{"groups": {"group:a": ["@y"]}}', "groups['group:a'][0]", "bad user"),
    ('{"hosts": {"db": "10.0.0.300"}}', "hosts['db']", "bad IP or CIDR"),
    ('{"hosts": {"db:1": "10.0.0.3"}}', "hosts['db:1']", "host name"),
    ('{"hosts": {"db": 5}}', "hosts['db']", "an IP or CIDR string"),
    ('{"tagOwners": {"tag:a": ["tag:b"]}}', "tagOwners['tag:a'][0]", "undefined tag 'tag:b'"),
    ('{"tagOwners": {"tag:a": ["group:x"]}}', "tagOwners['tag:a'][0]", "unknown group"),
    ('{"tagOwners": {"server": []}}', "tagOwners['server']", "must start with 'tag:'"),
    ('{"autoApprovers": {"routes": {"10.0.0.0/40": ["a@b"]}}}', "autoApprovers.routes['10.0.0.0/40']",
     "bad IP or CIDR"),
    ('{"autoApprovers": {"routes": {"10.0.0.0/8": ["tag:x"]}}}', "autoApprovers.routes['10.0.0.0/8'][0]",
     "undefined tag"),
    ('{"autoApprovers": {"exitNode": ["*"]}}', "autoApprovers.exitNode[0]", "not allowed as a owner"),
    ('{"autoApprovers": {"exitNodes": []}}', "autoApprovers", "unknown field 'exitNodes'"),
    ('{"tests": [{"src": "a@b", "accept": ["db"]}]}', "tests[0].accept[0]", "host:ports"),
    ('{"tests": [{"src": "a@b", "accept": ["10.0.0.1:22-23"]}]}', "tests[0].accept[0]", "bad port"),
    ('{"tests": [{"src": "a@b", "accept": ["10.0.0.1:*"]}]}', "tests[0].accept[0]", "bad port '*'"),
    ('{"tests": [{"src": "*", "accept": []}]}', "tests[0].src", "not allowed as a test src"),
    ('{"tests": [{"accept": []}]}', "tests[0]", "missing field 'src'"),
    ('{"tests": [{"src": "a@b", "allow": []}]}', "tests[0]", "unknown field 'allow'"),
    ('{"acl": []}', "acl", "unknown section"),
    ('{"grants": []}', "grants", "not supported"),
    ('[]', "policy", "an object"),
])
def test_semantic_errors_name_section_and_entry(text: str, where: str, words: str) -> None:
    with pytest.raises(PolicyValidationError) as info:
        parse_policy(text)
    assert info.value.where == where, str(info.value)
    assert words in str(info.value)
    assert str(info.value).startswith(where)


def test_semantic_errors_carry_the_line_and_column_of_the_entry() -> None:
    text = """{
  // developers
  "groups": {"group:dev": ["bob@example.com"]},
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["*:*"]},
    {"action": "accept",
     "src": ["group:dev"],
     "dst": ["*:22", /* ssh */ "group:ops:443",],
    },
  ],
}"""
    with pytest.raises(PolicyValidationError) as info:
        parse_policy(text)
    assert info.value.where == "acls[1].dst[1]"
    assert (info.value.line, info.value.column) == (8, 32)
    assert str(info.value).startswith("acls[1].dst[1] (line 8, column 32): unknown group 'group:ops'")


def test_legacy_field_names_are_located_too() -> None:
    with pytest.raises(PolicyValidationError) as info:
        parse_policy('{"acls": [{"action": "accept",\n "users": ["*", "who"], "ports": ["*:*"]}]}')
    assert (info.value.where, info.value.line, info.value.column) == ("acls[0].src[1]", 2, 17)


# Random documents built from the policy's own vocabulary, so most reach deep into validation.
_WORDS = st.sampled_from(["*", "*:*", "a@b", "group:g", "tag:t", "autogroup:self", "autogroup:member",
                          "h", "h:22", "10.0.0.0/8", "10.0.0.0/8:1-2", "tcp", "icmp", "accept", "",
                          "x:y:z", "[::1]:80", "fd7a::/48:*", "group:g:*", "tag:t:80,443"])
_KEYS = st.sampled_from(["acls", "groups", "hosts", "tagOwners", "autoApprovers", "tests", "src", "dst",
                         "users", "ports", "proto", "action", "accept", "deny", "routes", "exitNode",
                         "group:g", "tag:t", "h", "10.0.0.0/8", "ssh"])
_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-1, 70000) | st.floats(allow_nan=False) | _WORDS,
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
                       max_leaves=25)


@given(st.dictionaries(_KEYS, _VALUES, max_size=6))
@settings(max_examples=1000, deadline=None)
def test_random_documents_parse_or_raise_a_policy_error(doc: dict) -> None:
    text = json.dumps(doc)
    try:
        parse_policy(text)
    except PolicyError as exc:
        assert str(exc)
