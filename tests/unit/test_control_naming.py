"""Name derivation, uniqueness and admin-rename validation (meshnode.control.naming)."""

from hypothesis import given, strategies as st
import pytest

from magicdns.names import normalize_host_label
from meshnode.control.naming import NameInvalid, derive_name, unique_name, validate_name


@pytest.mark.parametrize("hostname, expected", [
    ("My-Laptop", "my-laptop"),
    ("MacBook-Pro.local", "macbook-pro"),
    ("router.lan", "router"),
    ("db1.localdomain", "db1"),
    ("web.corp.example.com", "web"),
    ("web.tailnet", "web"),
    ("Bob’s iPhone", "bob-s-iphone"),
    ("under_score__host", "under-score-host"),
    ("--edge--", "edge"),
    ("", "node"),
    ("...", "node"),
    ("ünïcødé", "n-c-d"),
    ("a" * 80, "a" * 63),
])
def test_derive_name(hostname: str, expected: str) -> None:
    assert derive_name(hostname) == expected


def test_derive_name_trims_custom_domain() -> None:
    assert derive_name("box.corp.example", "corp.example") == "box"


@given(st.text(max_size=200))
def test_derived_names_are_always_valid_labels(hostname: str) -> None:
    name = derive_name(hostname)
    assert normalize_host_label(name) == name
    assert len(name.encode()) <= 63


def test_collisions_get_numbered_suffixes() -> None:
    taken = {"web", "web-1"}
    assert unique_name("web", taken) == "web-2"
    assert unique_name("db", taken) == "db"


def test_collision_suffix_keeps_63_bytes() -> None:
    base = "x" * 63
    name = unique_name(base, {base})
    assert name == "x" * 61 + "-1" and len(name) == 63


def test_collision_suffix_does_not_leave_double_dash() -> None:
    base = "x" * 61 + "-y"
    assert unique_name(base, {base}) == "x" * 61 + "-1"


@pytest.mark.parametrize("bad", ["", "-x", "x-", "a.b", "with space", "a" * 64, "ü"])
def test_rename_refuses_invalid(bad: str) -> None:
    with pytest.raises(NameInvalid):
        validate_name(bad)


def test_rename_normalises_case() -> None:
    assert validate_name("Web-2") == "web-2"
