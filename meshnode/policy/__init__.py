"""The ACL policy: Tailscale's policy-file format (HuJSON), its evaluation and its `tests` section.

Control server: `check_policy(text, nodes)` on `policy set` (refuse on PolicyError, keep the old
policy), then `compile_policy(policy, nodes)` once per change of policy or nodes and, per node,
`visible_peers` (the peers its map holds) and `filter_rules_json` (its packet filter) into its map.
Data plane: `PacketFilter(rules_from_json(...))`; `check` each packet from the tunnel,
`note_outbound` each packet into it, `set_rules` on a new map.
"""

from . import idpgroups
from .approvals import auto_approved_exit, auto_approved_routes, tag_allowed, tag_allowed_for_node
from .compile import CompiledPolicy, compile_policy
from .errors import HuJSONError, PolicyError, PolicyTestError, PolicyValidationError
from .filter import AcceptReason, DropReason, PacketFilter
from .model import (AclRule, Action, AutoApprovers, DstEntry, Expectation, NodeInfo, Policy,
                    PolicyTest, PortRange, Selector, SelectorKind, TestDst)
from .parse import DEFAULT_POLICY_TEXT, default_policy, parse_policy
from .protocols import DEFAULT_PROTOS, IPProto
from .rules import FilterRule, rules_from_json, rules_to_json
from .tests_section import TestFailure, check_policy, run_tests

__all__ = [
    "AcceptReason", "AclRule", "Action", "AutoApprovers", "CompiledPolicy", "DEFAULT_POLICY_TEXT",
    "DEFAULT_PROTOS", "DropReason", "DstEntry", "Expectation", "FilterRule", "HuJSONError",
    "IPProto", "NodeInfo", "PacketFilter", "Policy", "PolicyError", "PolicyTest", "PolicyTestError",
    "PolicyValidationError", "PortRange", "Selector", "SelectorKind", "TestDst", "TestFailure",
    "auto_approved_exit", "auto_approved_routes", "check_policy", "compile_policy", "default_policy",
    "parse_policy", "rules_from_json", "rules_to_json", "run_tests", "tag_allowed",
    "idpgroups", "tag_allowed_for_node",
]
