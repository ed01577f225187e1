"""The `tests` section: passing and failing checks, and `check_policy` refusing a failing policy."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from meshnode.policy import (Expectation, HuJSONError, NodeInfo, PolicyError, PolicyTestError,
                             PolicyValidationError, check_policy, parse_policy, run_tests)

SAMPLE = Path(__file__).resolve().parents[2] / "conf" / "policy.hujson"

POLICY = """{
  "groups": {"group:dev": ["bob@example.com", "carol@example.com"]},
  "hosts": {"db": "100.64.0.9", "lan": "192.168.1.0/24"},
  "tagOwners": {"tag:server": []},
  "acls": [
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:server:22", "db:5432"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
    {"action": "accept", "src": ["100.64.0.7"], "dst": ["lan:80"]},
    {"action": "accept", "src": ["*"], "dst": ["db:53"], "proto": "udp"},
  ],
  "tests": [%s],
}"""


def failures(tests: str, nodes: list[NodeInfo] | None = None) -> list[str]:
    return [str(f) for f in run_tests(parse_policy(POLICY % tests), nodes)]


def test_sample_policy_tests_pass() -> None:
    assert run_tests(parse_policy(SAMPLE.read_text())) == []


@pytest.mark.parametrize("test", [
    '{"src": "bob@example.com", "accept": ["tag:server:22", "db:5432"], "deny": ["tag:server:23", "db:22"]}',
    '{"src": "group:dev", "accept": ["100.64.0.9:5432"]}',
    '{"src": "tag:server", "deny": ["db:5432", "tag:server:22"]}',
    '{"src": "100.64.0.7", "accept": ["192.168.1.200:80"], "deny": ["192.168.2.1:80", "lan:81"]}',
    '{"src": "db", "accept": ["db:53"], "proto": "udp"}',
    '{"src": "db", "deny": ["db:53"]}',                       # tcp by default
    '{"src": "bob@example.com", "accept": ["bob@example.com:9999"], "deny": ["carol@example.com:1"]}',
])
def test_passing_tests(test: str) -> None:
    assert failures(test) == []


def test_failing_tests_are_all_reported() -> None:
    found = failures('{"src": "alice@example.com", "accept": ["tag:server:22"], "deny": ["alice@example.com:1"]},'
                     '{"src": "bob@example.com", "accept": ["tag:server:22", "db:80"]}')
    assert found == [
        "tests[0]: alice@example.com -> tag:server:22 (tcp): expected accept, policy would deny",
        "tests[0]: alice@example.com -> alice@example.com:1 (tcp): expected deny, policy would accept",
        "tests[1]: bob@example.com -> db:80 (tcp): expected accept, policy would deny",
    ]


def test_group_src_must_hold_for_every_member() -> None:
    text = POLICY.replace('"src": ["group:dev"]', '"src": ["bob@example.com"]') % (
        '{"src": "group:dev", "accept": ["db:5432"]}')
    (failure,) = run_tests(parse_policy(text))
    assert failure.expected is Expectation.ACCEPT and failure.test_index == 0


def test_node_list_gives_ip_tests_their_identity() -> None:
    nodes = [NodeInfo(1, "laptop", "bob@example.com", (), (ipaddress.ip_address("100.64.0.1"),)),
             NodeInfo(2, "srv", "alice@example.com", ("tag:server",), (ipaddress.ip_address("100.64.0.2"),))]
    test = '{"src": "100.64.0.1", "accept": ["100.64.0.2:22"]}'
    assert failures(test) != []            # an unknown address is nobody in particular
    assert failures(test, nodes) == []     # with the nodes, it is bob's laptop reaching a server


def test_check_policy_returns_the_policy_or_raises_with_every_failure() -> None:
    ok = check_policy(POLICY % '{"src": "bob@example.com", "accept": ["db:5432"]}')
    assert ok.acls
    with pytest.raises(PolicyTestError) as info:
        check_policy(POLICY % '{"src": "dave@example.com", "accept": ["db:5432", "tag:server:22"]}')
    assert len(info.value.failures) == 2
    assert "db:5432" in str(info.value) and "tag:server:22" in str(info.value)
    assert isinstance(info.value, PolicyError)


def test_check_policy_refuses_unparseable_and_invalid_text() -> None:
    with pytest.raises(HuJSONError):
        check_policy('{"acls": [}')
    with pytest.raises(PolicyValidationError):
        check_policy('{"tests": [{"src": "bob@example.com", "accept": ["tag:nope:22"]}]}')
