"""A node's Tailnet Lock files, under `<state-dir>/tka/` (thin I/O around the pure core).

    lock.key          this node's lock private key (`nlpriv:HEX`), 0600, made on first use
    aums/, ancestor   the chain (FileStore)
    local-disabled    present after `lock local-disable`: this node stops enforcing (holds the head)
    outbox.json       what must reach the control server once connected: the genesis AUM of a
                      `lock init` made here, node-key signatures made here and a disablement secret
                      used here (the daemon sends and clears it)
    own.sig           this node's node-key signature as the last map carried it (base64): what a
                      rotation signature nests when the node key changes (nodesig.resign)

When a daemon runs, the `meshnode lock` commands go through its LocalAPI and the daemon runs them on
these files (it is their only writer, meshnode/node/lock.py); otherwise they work on them directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..node.atomicfile import atomic_write
from .authority import Authority
from .cli_format import format_private, parse_private
from .errors import DecodeError, StorageError
from .signing import LockPrivateKey
from .store import FileStore


@dataclass
class Outbox:
    signatures: dict[str, str] = field(default_factory=dict)   # node key (base64) -> signature (base64)
    disablement_secret: str | None = None                      # hex
    # Set by `lock init`: the genesis AUM (base64) to hand to the control server (ControlChain.init).
    # It tells "I enabled the lock here" apart from "the control server says the lock is off".
    init_genesis: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"signatures": self.signatures}
        if self.init_genesis:
            out["init_genesis"] = self.init_genesis
        if self.disablement_secret:
            out["disablement_secret"] = self.disablement_secret
        return out


class LockDir:
    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / "tka"

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def lock_key(self) -> LockPrivateKey:
        """This node's lock key, generated (and saved) the first time."""
        f = self.path / "lock.key"
        if f.exists():
            try:
                return parse_private(f.read_text())
            except DecodeError as exc:
                # Never replaced silently: a new key would no longer be the one others trust.
                raise StorageError(f"{f}: {exc}; move it away to make a new lock key") from None
        self.ensure()
        key = LockPrivateKey.generate()
        atomic_write(f, format_private(key) + "\n", mode=0o600)
        return key

    def store(self) -> FileStore:
        self.ensure()
        return FileStore(self.path)

    def authority(self) -> tuple[Authority | None, FileStore]:
        """The authority (None when the lock is not enabled here) and its store."""
        store = self.store()
        if not store.heads():
            return None, store
        return Authority.open(store), store

    @property
    def locally_disabled(self) -> bool:
        return (self.path / "local-disabled").exists()

    def set_local_disabled(self, head: str) -> None:
        self.ensure()
        atomic_write(self.path / "local-disabled", head + "\n")

    def clear_local_disabled(self) -> None:
        (self.path / "local-disabled").unlink(missing_ok=True)

    def outbox(self) -> Outbox:
        f = self.path / "outbox.json"
        if not f.exists():
            return Outbox()
        try:
            obj = json.loads(f.read_text())
            return Outbox(dict(obj.get("signatures", {})), obj.get("disablement_secret"), obj.get("init_genesis"))
        except (ValueError, AttributeError, TypeError) as exc:
            raise StorageError(f"{f}: unreadable: {exc}") from None

    def save_outbox(self, box: Outbox) -> None:
        self.ensure()
        atomic_write(self.path / "outbox.json", json.dumps(box.to_json(), indent=1, sort_keys=True))

    def own_signature(self) -> bytes | None:
        """This node's last known node-key signature (serialized), if any."""
        import base64
        import binascii

        f = self.path / "own.sig"
        try:
            return base64.b64decode(f.read_text().strip(), validate=True) or None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, binascii.Error) as exc:
            raise StorageError(f"{f}: unreadable: {exc}") from None

    def save_own_signature(self, blob: bytes | None) -> None:
        import base64

        if blob is None:
            (self.path / "own.sig").unlink(missing_ok=True)
            return
        self.ensure()
        atomic_write(self.path / "own.sig", base64.b64encode(blob).decode() + "\n")

    def own_node_key(self) -> bytes | None:
        """The node key of this node (public), if the node has one (node.key in the state dir)."""
        f = self.path.parent / "node.key"
        if not f.exists():
            return None
        from ..node.state import KeyFileError, decode_key  # the node key's format is node/state.py's

        try:
            return bytes(decode_key(f.read_text(), str(f)).public_key)
        except KeyFileError as exc:
            raise StorageError(str(exc)) from None

    def forget_chain(self) -> None:
        """Drop the chain and the local-disable marker (after a valid disablement secret)."""
        self.store().clear()
        self.clear_local_disabled()
