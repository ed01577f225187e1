"""Tailnet Lock at the control server: it stores and relays the tailnet's chain and the node-key
signatures, and checks each like any node would, but holds no signing key and cannot forge one.

The chain lives in the store (`tka_aums`, through `StoreChain`), so every replica of one PostgreSQL
database serves the same chain; a replica notices another's write by `tka_generation` and reads the
chain again, and a write made from a stale copy is refused by the store and retried on a fresh one.
(A SQLite deployment from before kept it in `<db>.tka/`; the `_m11_tka_chain` migration moves it in.)
The signatures are in the `tka_signatures` table (store.py), the disablement secret that turned the
lock off in `control_meta`, so nodes that were offline can follow.

Node endpoints (sealed like every node request; shaped on Tailscale's `/machine/tka/*`, tailcfg
TKA*Request; bodies also carry the node's `node_key`):
  POST /machine/tka/init        {genesis: b64 AUM, signatures: {nodekey: b64}}  -> {head}
  POST /machine/tka/bootstrap   {}                  -> {genesis: b64} | {disablement_secret: hex|null}
  POST /machine/tka/sync/offer  {offer}             -> {answer}   (ControlChain.answer)
  POST /machine/tka/sync/send   {aums: [b64]}       -> {head}     (verified, all or nothing)
  POST /machine/tka/sign        {target, signature} -> {ok}       (refused unless it verifies)
  POST /machine/tka/disable     {secret: hex}       -> {ok}       (refused unless it is one of ours)
  POST /machine/tka/key         {lock_key: tlpub:HEX, proof: b64} -> {ok}  (this node's lock public key,
                                for the map's `lock_key`, so `lock init` can sign it; `proof` is the
                                lock key's signature of key_proof_message(node key))
A refused update is a `bad_request` whose message names the reason (`ReplayedAUM: ...`,
`InvalidSignature: ...`, `LimitExceeded: ...`); a request while the lock is off/on is a `conflict`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import sqlite3
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

from aiohttp import web

from ..tka.cli_format import format_public, parse_public
from ..tka.errors import StateError, TKAError
from ..tka.signing import key_proof_message, verify
from ..tka.nodelock import ControlChain
from ..tka.aum import AUM, AUMHash
from ..tka.errors import DecodeError, StorageError
from ..tka.store import MemoryStore
from .protocol import ErrorCode, ProtocolError, decode_key
from .store import ControlStore, StaleChain

if TYPE_CHECKING:
    from .server import ControlServer

log = logging.getLogger("meshnode.control.lock")


T = TypeVar("T")


class StoreChain(MemoryStore):
    """The tailnet's chain in the control store, with an in-memory index of it (MemoryStore) for the
    verifier's many look-ups. Every write goes to the store first, conditional on the generation this
    copy was read at (`StaleChain` if another replica wrote since), then to the index."""

    def __init__(self, store: ControlStore) -> None:
        super().__init__()
        self.store = store
        self.generation = -1
        self.load()

    def load(self) -> None:
        generation, rows, ancestor = self.store.tka_chain()
        parsed = []
        for raw, when in rows:
            try:
                parsed.append((AUM.parse(raw), when))
            except DecodeError as exc:
                raise StorageError(f"tka_aums: a stored AUM does not parse: {exc}") from None
        with self._lock:
            self._aums.clear()
            self._children.clear()
            self._times.clear()
            for aum, when in parsed:
                self._index(aum, when)
            self._ancestor = AUMHash.from_text(ancestor) if ancestor else None
        self.generation = generation

    def stale(self) -> bool:
        return self.store.tka_generation() != self.generation

    def _write(self, **change: Any) -> None:
        self.generation = self.store.tka_chain_write(self.generation, **change)

    def commit_verified(self, aums: Iterable[AUM]) -> None:
        new = {bytes(a.hash): a for a in aums if self.aum(a.hash) is None}
        if not new:
            return
        now = self.clock()
        self._write(add=[(str(a.hash), str(a.parent) if a.parent is not None else None, a.serialized, now)
                         for a in new.values()])
        with self._lock:
            for a in new.values():
                self._index(a, now)

    def set_last_active_ancestor(self, h: bytes) -> None:
        self._write(ancestor=str(AUMHash(h)))
        super().set_last_active_ancestor(h)

    def purge(self, hashes: Iterable[bytes]) -> None:
        hashes = [bytes(h) for h in hashes]
        self._write(purge=[str(AUMHash(h)) for h in hashes])
        super().purge(hashes)

    def clear(self) -> None:
        self._write(clear=True)
        super().clear()


def _refused(exc: TKAError) -> ProtocolError:
    code = ErrorCode.CONFLICT if isinstance(exc, StateError) else ErrorCode.BAD_REQUEST
    return ProtocolError(code, f"tailnet lock: {type(exc).__name__}: {exc}")


def _b64(value: Any, what: str, max_len: int = 64 * 1024) -> bytes:
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what}: expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what}: not valid base64") from None


class ControlLock:
    """The tailnet's ControlChain and the node endpoints that drive it."""

    def __init__(self, server: "ControlServer") -> None:
        self.server = server
        self.store = server.store
        self.chain_store = StoreChain(self.store)
        self.chain = ControlChain(self.chain_store)

    def refresh(self) -> None:
        """Read the chain again if another replica (or process) wrote it since we last did."""
        if self.chain_store.stale():
            self.chain_store.load()
            self.chain = ControlChain(self.chain_store)

    def _fresh(self, op: Callable[[], T]) -> T:
        """`op` on the newest chain; if another replica wrote the chain between our read and our write,
        once more on the chain as it now is (the node's request then meets what that replica did)."""
        self.refresh()
        try:
            return op()
        except StaleChain:
            self.refresh()
            try:
                return op()
            except StaleChain:
                raise ProtocolError(ErrorCode.CONFLICT, "tailnet lock: the chain is changing on another"
                                    " replica; try again") from None

    @property
    def head(self) -> str | None:
        self.refresh()   # read at every snapshot: a chain written on another replica reaches our maps
        return self.chain.head

    def signatures(self) -> dict[str, str]:
        """Node key -> signature, for the map (only while the lock is on)."""
        return self.store.tka_signatures() if self.chain.head is not None else {}

    def lock_keys(self) -> dict[str, str]:
        """Node key -> the lock public key its node reported (in the map whether or not the lock is on:
        `lock init` needs them before there is a chain)."""
        return self.store.tka_lock_keys()

    def attach(self, app: web.Application) -> None:
        app.add_routes([
            web.post("/machine/tka/init", self._init), web.post("/machine/tka/bootstrap", self._bootstrap),
            web.post("/machine/tka/sync/offer", self._offer), web.post("/machine/tka/sync/send", self._send),
            web.post("/machine/tka/sign", self._sign), web.post("/machine/tka/disable", self._disable),
            web.post("/machine/tka/key", self._key),
        ])

    async def _node(self, request: web.Request) -> tuple[Any, Any, dict[str, Any]]:
        machine_key, chan, p = await self.server._open(request)
        node = self.server._node_for(machine_key, p)
        return node, chan, p

    def _changed(self, action: str, node: Any, secret: str | None = None) -> None:
        with self.store.acting_as(f"node:{node.name}"):
            self.store.tka_changed(action, self.chain.head, secret)
        self.server.mark_dirty()

    def _store_signature(self, node: Any, target: str, sig: bytes) -> None:
        decode_key(target, "target node key")
        self.refresh()
        try:
            self.chain.check_signature(base64.b64decode(target), sig)
        except TKAError as exc:
            raise _refused(exc) from None
        with self.store.acting_as(f"node:{node.name}"):
            self.store.set_tka_signature(target, base64.b64encode(sig).decode())

    def registration(self, authkey: str | None, node_key: str, p: dict[str, Any]) -> tuple[str | None, bytes | None]:
        """At registration: strip a pre-signed auth key's `--TL...` suffix (the node signs with it
        itself and sends `key_signature`), and check that signature before anything is written."""
        if authkey and "--TL" in authkey:
            authkey = authkey.partition("--TL")[0]
        raw = p.get("key_signature")
        if raw is None:
            return authkey, None
        sig = _b64(raw, "key_signature")
        self.refresh()
        if self.chain.head is not None:
            try:
                self.chain.check_signature(base64.b64decode(node_key), sig)
            except TKAError as exc:
                raise _refused(exc) from None
        return authkey, sig

    def store_registration_signature(self, node: Any, node_key: str, sig: bytes) -> None:
        if self.chain.head is None:
            return  # the lock is off: nothing to keep (a later init needs fresh signatures)
        with self.store.acting_as(f"node:{node.name}"):
            self.store.set_tka_signature(node_key, base64.b64encode(sig).decode())

    async def _init(self, request: web.Request) -> web.Response:
        node, chan, p = await self._node(request)
        genesis = _b64(p.get("genesis"), "genesis")
        sigs = p.get("signatures") or {}
        if not isinstance(sigs, dict) or len(sigs) > 1024:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "signatures: expected an object (node key -> signature)")
        try:
            self._fresh(lambda: self.chain.init(genesis))
        except TKAError as exc:
            raise _refused(exc) from None
        log.info("tailnet lock enabled by %s (head %s)", node.name, self.chain.head)
        self._changed("tka.init", node)
        for target, sig in sigs.items():
            self._store_signature(node, str(target), _b64(sig, "signature"))
        self.server.mark_dirty()
        return self.server._sealed(chan, {"head": self.chain.head})

    async def _bootstrap(self, request: web.Request) -> web.Response:
        _node, chan, _p = await self._node(request)
        self.refresh()
        if self.chain.head is None:
            return self.server._sealed(chan, {"disablement_secret": self.store.tka_disablement_secret() or None})
        return self.server._sealed(chan, {"genesis": base64.b64encode(self.chain.bootstrap_aum()).decode()})

    async def _offer(self, request: web.Request) -> web.Response:
        _node, chan, p = await self._node(request)
        self.refresh()
        try:
            answer = self.chain.answer(p.get("offer"))
        except TKAError as exc:
            raise _refused(exc) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"tailnet lock: malformed offer: {exc}") from None
        return self.server._sealed(chan, {"answer": answer})

    async def _send(self, request: web.Request) -> web.Response:
        node, chan, p = await self._node(request)
        self.refresh()
        before = self.chain.head
        try:
            head = self._fresh(lambda: self.chain.receive(p.get("aums") or [], allow_known=False))
        except TKAError as exc:
            log.warning("tailnet lock: refused AUMs from %s: %s", node.name, exc)
            raise _refused(exc) from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"tailnet lock: malformed AUMs: {exc}") from None
        if head != before:
            log.info("tailnet lock: %s moved the head to %s", node.name, head)
            self._changed("tka.update", node)
        return self.server._sealed(chan, {"head": head})

    async def _sign(self, request: web.Request) -> web.Response:
        node, chan, p = await self._node(request)
        target = p.get("target")
        if not isinstance(target, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "target: expected a node key")
        self._store_signature(node, target, _b64(p.get("signature"), "signature"))
        self.server.mark_dirty()
        return self.server._sealed(chan, {"ok": True})

    async def _key(self, request: web.Request) -> web.Response:
        node, chan, p = await self._node(request)
        text = p.get("lock_key")
        try:
            if not isinstance(text, str) or len(text) > 128:
                raise ValueError
            raw = parse_public(text)
        except (TKAError, ValueError):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "lock_key: expected tlpub:HEX") from None
        # Proof of possession: without it a node could claim a trusted node's lock key and be signed
        # by a `lock init` that trusts that key.
        proof = _b64(p.get("proof"), "proof", 256)
        if not verify(raw, key_proof_message(base64.b64decode(node.node_key)), proof):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "lock_key: the proof does not verify with that key")
        if self.store.set_tka_lock_key(node.node_key, format_public(raw)):
            self.server.mark_dirty()
        return self.server._sealed(chan, {"ok": True})

    async def _disable(self, request: web.Request) -> web.Response:
        node, chan, p = await self._node(request)
        secret = p.get("secret")
        try:
            raw = bytes.fromhex(secret) if isinstance(secret, str) and len(secret) <= 256 else None
        except ValueError:
            raw = None
        if raw is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "secret: expected hex")
        self.refresh()
        if self.chain.head is None:
            raise ProtocolError(ErrorCode.CONFLICT, "tailnet lock: Tailnet Lock is not enabled on this tailnet")
        if not self._fresh(lambda: self.chain.disable(raw)):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "tailnet lock: invalid disablement secret")
        log.warning("tailnet lock disabled by %s with a disablement secret", node.name)
        self._changed("tka.disable", node, raw.hex())
        return self.server._sealed(chan, {"ok": True})


def locked_out(store: ControlStore) -> dict[str, str]:
    """For `control nodes ls` (another process): node key -> why it is locked out, for every node
    whose key carries no valid signature; empty when the lock is off."""
    try:
        chain = ControlChain(StoreChain(store))
    except (sqlite3.Error, TKAError):
        return {}
    if chain.head is None:
        return {}
    sigs = store.tka_signatures()
    out: dict[str, str] = {}
    for node in store.list_nodes():
        sig = sigs.get(node.node_key)
        why = chain.locked_out(base64.b64decode(node.node_key), base64.b64decode(sig) if sig else None)
        if why is not None:
            out[node.node_key] = why
    return out
