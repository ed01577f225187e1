"""Where a node keeps its chain (Tailscale's "tailchonk"): verified AUMs indexed by hash and by parent.

Two implementations: MemoryStore (tests, the control server's cache) and FileStore, one file per AUM
under the node's state directory, written atomically so a crash never leaves a torn AUM. Only AUMs
that passed verification are ever committed; a file that no longer parses (disk corruption, a hand
edit) is reported as StorageError rather than trusted.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Protocol

from ..node.atomicfile import atomic_write
from .aum import AUM, AUMHash
from .errors import DecodeError, StorageError


class ChainStore(Protocol):
    """What the authority needs from storage (tka.Chonk)."""

    def aum(self, h: bytes) -> AUM | None:
        """The AUM with this hash, or None."""

    def child_aums(self, h: bytes) -> list[AUM]:
        """AUMs whose parent is `h`."""

    def heads(self) -> list[AUM]:
        """AUMs with no children: the tips of every chain stored."""

    def commit_verified(self, aums: Iterable[AUM]) -> None:
        """Durably store AUMs that were verified by the authority."""

    def last_active_ancestor(self) -> AUMHash | None:
        """The oldest AUM of the chain in use last time (a hint when several chains are stored)."""

    def set_last_active_ancestor(self, h: bytes) -> None:
        ...

    def all_hashes(self) -> list[AUMHash]:
        ...

    def clear(self) -> None:
        """Forget the whole chain (the lock was disabled)."""

    def commit_time(self, h: bytes) -> float:
        """When the AUM was stored (unix seconds): compaction keeps young AUMs."""

    def purge(self, hashes: Iterable[bytes]) -> None:
        """Delete AUMs (compaction)."""


class MemoryStore:
    """A ChainStore in memory; thread-safe. `clock` stamps commits (the I/O edge reads time, the
    core never does; tests pass their own)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._aums: dict[bytes, AUM] = {}
        self._children: dict[bytes, list[bytes]] = {}
        self._times: dict[bytes, float] = {}
        self._ancestor: AUMHash | None = None
        self.clock = clock

    def aum(self, h: bytes) -> AUM | None:
        with self._lock:
            return self._aums.get(bytes(h))

    def child_aums(self, h: bytes) -> list[AUM]:
        with self._lock:
            return [self._aums[c] for c in self._children.get(bytes(h), ())]

    def heads(self) -> list[AUM]:
        with self._lock:
            return [a for h, a in self._aums.items() if not self._children.get(h)]

    def commit_verified(self, aums: Iterable[AUM]) -> None:
        with self._lock:
            now = self.clock()
            for a in aums:
                self._index(a, now)

    def _index(self, a: AUM, when: float) -> None:
        h = bytes(a.hash)
        if h in self._aums:
            return
        self._aums[h] = a
        self._times[h] = when
        if a.parent is not None:
            self._children.setdefault(bytes(a.parent), []).append(h)

    def commit_time(self, h: bytes) -> float:
        with self._lock:
            try:
                return self._times[bytes(h)]
            except KeyError:
                raise StorageError(f"AUM {AUMHash(h)} is not stored") from None

    def purge(self, hashes: Iterable[bytes]) -> None:
        with self._lock:
            for h in hashes:
                self._forget(bytes(h))

    def _forget(self, h: bytes) -> None:
        a = self._aums.pop(h, None)
        self._times.pop(h, None)
        if a is not None and a.parent is not None:
            siblings = self._children.get(bytes(a.parent), [])
            if h in siblings:
                siblings.remove(h)

    def last_active_ancestor(self) -> AUMHash | None:
        with self._lock:
            return self._ancestor

    def set_last_active_ancestor(self, h: bytes) -> None:
        with self._lock:
            self._ancestor = AUMHash(h)

    def all_hashes(self) -> list[AUMHash]:
        with self._lock:
            return [AUMHash(h) for h in self._aums]

    def clear(self) -> None:
        with self._lock:
            self._aums.clear()
            self._children.clear()
            self._times.clear()
            self._ancestor = None


class FileStore(MemoryStore):
    """A ChainStore in a directory: `aums/<base32 hash>` holds each AUM's canonical bytes and
    `ancestor` the last active ancestor. The whole chain is read into memory when opened (chains are
    bounded by compaction and the scan limits, a few hundred kilobytes at most)."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__()
        self.directory = Path(directory)
        self._aum_dir = self.directory / "aums"
        self._aum_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._load()

    def _load(self) -> None:
        for entry in sorted(os.listdir(self._aum_dir)):
            if entry.startswith("."):
                continue  # a temporary file left by a crash mid-write
            path = self._aum_dir / entry
            try:
                aum = AUM.parse(path.read_bytes())
            except DecodeError as exc:
                raise StorageError(f"{path}: {exc}") from None
            if str(aum.hash) != entry:
                raise StorageError(f"{path}: content hashes to {aum.hash}, not to its file name")
            self._index(aum, path.stat().st_mtime)  # the file's mtime is its commit time
        anc = self.directory / "ancestor"
        if anc.exists():
            try:
                self._ancestor = AUMHash.from_text(anc.read_text())
            except DecodeError as exc:
                raise StorageError(f"{anc}: {exc}") from None

    def commit_verified(self, aums: Iterable[AUM]) -> None:
        with self._lock:
            for a in aums:
                if bytes(a.hash) in self._aums:
                    continue
                # Written before indexing: a crash mid-batch leaves some verified AUMs on disk, which
                # is harmless (each was verified against its parent before the batch was committed).
                atomic_write(self._aum_dir / str(a.hash), a.serialized)
                self._index(a, (self._aum_dir / str(a.hash)).stat().st_mtime)

    def set_last_active_ancestor(self, h: bytes) -> None:
        with self._lock:
            self._ancestor = AUMHash(h)
            atomic_write(self.directory / "ancestor", str(self._ancestor) + "\n")

    def purge(self, hashes: Iterable[bytes]) -> None:
        with self._lock:
            for h in hashes:
                (self._aum_dir / str(AUMHash(h))).unlink(missing_ok=True)
                self._forget(bytes(h))

    def clear(self) -> None:
        """Forget the whole chain (after the lock is disabled)."""
        with self._lock:
            for entry in os.listdir(self._aum_dir):
                (self._aum_dir / entry).unlink(missing_ok=True)
            (self.directory / "ancestor").unlink(missing_ok=True)
            self._aums.clear()
            self._children.clear()
            self._times.clear()
            self._ancestor = None
