"""CTAP2 canonical CBOR, as Tailscale's TKA encodes AUMs and node-key signatures.

Encoding: definite lengths, shortest integer forms, map keys sorted by length then bytes (cbor2's
canonical mode is exactly this for the integer and text keys TKA uses). Decoding follows Tailscale's
strict options (no tags, no indefinite lengths, no duplicate keys, bounded nesting and sizes) and,
stricter than Go, demands the canonical form itself: a byte that re-encodes differently is a tampered
byte, so it is refused rather than silently normalised.
"""

from __future__ import annotations

from typing import Any

import cbor2

from .errors import DecodeError
from .limits import MAX_ARRAY_ELEMENTS, MAX_ENCODED_BYTES, MAX_MAP_PAIRS, MAX_NESTED_LEVELS


def encode(value: Any) -> bytes:
    """Canonical CBOR bytes of a tree of ints, bytes, str, None, lists and int/str-keyed dicts."""
    return cbor2.dumps(value, canonical=True)


def decode(data: bytes, what: str = "value") -> Any:
    """Decode canonical CBOR with Tailscale's limits; raise DecodeError on anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise DecodeError(f"{what}: empty input")
    if len(data) > MAX_ENCODED_BYTES:
        raise DecodeError(f"{what}: {len(data)} bytes is more than the limit of {MAX_ENCODED_BYTES}")
    try:
        value = cbor2.loads(data, tag_hook=_refuse_tag)
    except DecodeError:
        raise
    except Exception as exc:  # cbor2 raises several types (CBORDecodeError, ValueError, EOFError...)
        raise DecodeError(f"{what}: malformed CBOR: {exc}") from None
    _check_tree(value, 1, what)
    if encode(value) != data:
        # Covers trailing bytes, duplicate map keys (collapsed by the decoder), indefinite lengths,
        # non-minimal integers and unsorted keys.
        raise DecodeError(f"{what}: not canonical CBOR (trailing data, duplicate or unsorted keys, "
                          "or non-minimal encoding)")
    return value


def _refuse_tag(_decoder: Any, tag: Any) -> Any:
    raise DecodeError(f"CBOR tags are not allowed (tag {tag.tag})")


def _check_tree(value: Any, depth: int, what: str) -> None:
    if isinstance(value, (list, dict)):
        if depth > MAX_NESTED_LEVELS:
            raise DecodeError(f"{what}: nested deeper than {MAX_NESTED_LEVELS} levels")
        if isinstance(value, list):
            if len(value) > MAX_ARRAY_ELEMENTS:
                raise DecodeError(f"{what}: array of {len(value)} elements (max {MAX_ARRAY_ELEMENTS})")
            for item in value:
                _check_tree(item, depth + 1, what)
        else:
            if len(value) > MAX_MAP_PAIRS:
                raise DecodeError(f"{what}: map of {len(value)} pairs (max {MAX_MAP_PAIRS})")
            for k, v in value.items():
                if not isinstance(k, (int, str)) or isinstance(k, bool):
                    raise DecodeError(f"{what}: map key of type {type(k).__name__}")
                _check_tree(v, depth + 1, what)
    elif value is None or isinstance(value, (bytes, str)):
        return
    elif isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError(f"{what}: unexpected CBOR item of type {type(value).__name__}")
    elif value < 0:
        raise DecodeError(f"{what}: negative integer")


class Fields:
    """Typed access to an integer-keyed CBOR map, raising DecodeError with the field's name."""

    def __init__(self, value: Any, what: str) -> None:
        if not isinstance(value, dict):
            raise DecodeError(f"{what}: expected a map, got {type(value).__name__}")
        self._m = value
        self._what = what

    def uint(self, key: int, name: str, *, max_value: int = 2**64 - 1) -> int:
        # Go decodes CBOR null into a non-pointer integer as its zero value; so do we.
        v = self._m.get(key)
        if v is None:
            return 0
        if not isinstance(v, int) or isinstance(v, bool):
            raise DecodeError(f"{self._what}.{name}: expected an unsigned integer")
        if v > max_value:
            raise DecodeError(f"{self._what}.{name}: {v} overflows")
        return v

    def opt_uint(self, key: int, name: str) -> int | None:
        if key not in self._m or self._m[key] is None:
            return None
        return self.uint(key, name)

    def bytes_(self, key: int, name: str) -> bytes | None:
        v = self._m.get(key)
        if v is None or isinstance(v, bytes):
            return v
        raise DecodeError(f"{self._what}.{name}: expected a byte string")

    def opt_map(self, key: int, name: str) -> Any:
        v = self._m.get(key)
        if v is None or isinstance(v, dict):
            return v
        raise DecodeError(f"{self._what}.{name}: expected a map")

    def opt_list(self, key: int, name: str) -> list[Any] | None:
        v = self._m.get(key)
        if v is None or isinstance(v, list):
            return v
        raise DecodeError(f"{self._what}.{name}: expected an array")

    def str_map(self, key: int, name: str) -> dict[str, str] | None:
        v = self.opt_map(key, name)
        if v is None:
            return None
        if not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
            raise DecodeError(f"{self._what}.{name}: expected a map of text to text")
        return dict(v)
