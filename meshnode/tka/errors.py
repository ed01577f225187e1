"""The precise failures of the Tailnet Key Authority, so each edge (CLI, LocalAPI, control server)
can turn them into a clear message or status without parsing strings."""

from __future__ import annotations


class TKAError(Exception):
    """Base class of every Tailnet Lock failure."""


class DecodeError(TKAError):
    """Bytes that are not a well-formed, canonical CBOR AUM or node-key signature."""


class InvalidAUM(TKAError):
    """An AUM that is well-formed CBOR but breaks the rules of its kind (StaticValidate)."""


class InvalidSignature(TKAError):
    """A signature that does not verify, or is missing, or is made by a key the authority does not trust."""


class UnknownKey(InvalidSignature):
    """A signature (or an update) refers to a key that is not trusted in the state it applies to."""


class UnknownParent(TKAError):
    """An AUM whose parent is not in the local chain (the sender must send the missing ancestors first)."""


class ReplayedAUM(TKAError):
    """An AUM submitted as new that is already part of the chain."""


class LimitExceeded(TKAError):
    """A limit Tailscale puts on the authority (keys, disablement values, metadata, chain scan) was hit."""


class StateError(TKAError):
    """An AUM that is signed and well-formed but cannot be applied to the state (duplicate key, removing
    the last key, wrong state ID in a checkpoint...)."""


class NoIntersection(TKAError):
    """Two chains being synchronised share no AUM: they belong to different authorities."""


class NodeKeyNotAuthorized(TKAError):
    """A node key whose signature does not authorize it under the current lock state."""


class StorageError(TKAError):
    """The chain store is unreadable or inconsistent (a corrupted file, a missing AUM it should hold)."""
