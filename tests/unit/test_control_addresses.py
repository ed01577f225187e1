"""Address allocation (meshnode.control.addresses)."""

import ipaddress

from hypothesis import given, strategies as st
import pytest

from meshnode.control.addresses import (MAX_OFFSET, AddressesExhausted, address_objects, allocate, is_allocatable,
                                       pair_for)


def test_first_address_pairs_v4_and_v6() -> None:
    pair = allocate(set())
    assert pair.texts == ("100.64.0.1", "fd7a:115c:a1e0::1")


def test_skips_used_and_dot_zero_and_255() -> None:
    assert allocate({1}).offset == 2
    assert str(allocate(set(), start=0xFF).ipv4) == "100.64.1.1"


def test_never_reserved_service_addresses() -> None:
    for ip in ("100.100.100.100", "100.100.100.1", "100.115.92.7", "100.115.93.200"):
        offset = int(ipaddress.IPv4Address(ip)) - int(ipaddress.IPv4Address("100.64.0.0"))
        assert not is_allocatable(offset)
    start = int(ipaddress.IPv4Address("100.100.100.0")) - int(ipaddress.IPv4Address("100.64.0.0"))
    assert str(allocate(set(), start=start).ipv4) == "100.100.101.1"


def test_never_the_resolvers_v6_address() -> None:
    assert not is_allocatable(0x53)
    assert allocate(set(), start=0x53).offset == 0x54


def test_wraps_around_to_holes() -> None:
    assert allocate({1, 2, MAX_OFFSET - 1}, start=MAX_OFFSET - 1).offset == 3


def test_exhaustion_is_an_error() -> None:
    class All:
        def __contains__(self, item: object) -> bool:
            return True
    with pytest.raises(AddressesExhausted):
        allocate(All())


@given(st.integers(min_value=0, max_value=MAX_OFFSET + 5))
def test_allocated_addresses_are_in_range(start: int) -> None:
    pair = allocate(set(), start=start)
    assert pair.ipv4 in ipaddress.IPv4Network("100.64.0.0/10")
    assert pair.ipv6 in ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
    assert pair.ipv4.packed[-1] not in (0, 255)
    assert pair == pair_for(pair.offset)


@given(st.integers(min_value=1, max_value=MAX_OFFSET))
def test_address_objects_are_the_parsed_texts(offset: int) -> None:
    # The policy engine gets the objects straight from the offset; maps carry the texts. They must agree.
    assert address_objects(offset) == tuple(ipaddress.ip_address(t) for t in pair_for(offset).texts)
