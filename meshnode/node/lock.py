"""Tailnet Lock in the daemon: the glue between each received map, the node's chain
(`tka.nodelock.NodeLock` over `<state-dir>/tka/`) and the control server's `/machine/tka/*`.

On every map (`apply`), before anything sees it:
1. what `meshnode lock` queued here (the outbox: a genesis, signatures, a disablement secret) goes to
   the control server and is cleared once accepted; a refusal is kept for `status`, never retried
   in a loop (the command said why; the user decides);
2. when the map's `tka_head` differs from ours: bootstrap (no chain yet) or sync (offer, answer,
   send back what the control server lacks). A refused update keeps our chain as it was and is
   shown in `status` as the last refusal;
3. when the map says the lock is off but we hold a chain: we ask for the disablement secret and
   obey it only if it is one of our chain's (a control server cannot turn the lock off by itself);
4. `filter_peers`: a peer whose node key has no valid signature is dropped from the map, so the
   WireGuard peers, the router, the packet filter's peers and MagicDNS never see it; its addresses
   are also cut out of the map's packet-filter rules (`tka.filterrules`), so no rule this node
   installs names them.
Then the daemon applies the filtered map. The chain is only written here (and by the lock commands
the daemon runs for the LocalAPI, under the same lock), so the daemon is its only writer.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from ..control.client import ControlClient, ControlError
from ..netmap import MapNode, NetMap
from ..tka.cli_format import format_public
from ..tka.signing import key_proof_message
from ..tka.errors import TKAError
from ..tka.filterrules import host_addresses, without_hosts
from ..tka.nodelock import NodeLock
from ..tka.nodesig import NodeKeySignature
from ..tka.statedir import LockDir

log = logging.getLogger("meshnode.node.lock")

COMPACT_EVERY = 86400.0  # seconds between compactions of this node's chain (after a sync)


class LockService:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.dir = LockDir(state_dir)
        self._node: NodeLock | None = None
        self._mutex = asyncio.Lock()
        self.last_map: NetMap | None = None          # the last map as received (unfiltered)
        self.locked_out: tuple[tuple[MapNode, str], ...] = ()   # (peer, why) of the last map
        self.last_refusal: str | None = None          # an update (or request) that was refused
        self.error: str | None = None                 # the lock could not be run (damaged files...)
        self._compacted_at = 0.0
        self._key_reported: str | None = None   # the node key under which we last told control our lock key

    # -- the chain ------------------------------------------------------------------------------

    def node(self) -> NodeLock:
        if self._node is None:
            self._node = NodeLock(self.dir.store(), self.dir.lock_key(), locally_disabled=self.dir.locally_disabled)
        return self._node

    def _refuse(self, what: str) -> None:
        self.last_refusal = what
        log.warning("tailnet lock: %s", what)

    # -- per map --------------------------------------------------------------------------------

    async def apply(self, netmap: NetMap | None, client: ControlClient | None,
                    apply_fn: Callable[[NetMap], Awaitable[None]]) -> None:
        """Sync with the control server if needed, filter `netmap`'s peers, then `apply_fn` it (under
        the lock). `netmap` None re-applies the newest map, read under the lock: a lock command's
        re-apply must never put back a map older than one that arrived while it waited."""
        async with self._mutex:
            if netmap is None:
                netmap = self.last_map
                if netmap is None:
                    return
            self.last_map = netmap
            try:
                if client is not None:
                    await self._report_key(client)
                    await self._flush_outbox(client)
                    await self._sync(netmap.tka_head, client)
                filtered = self._filter(netmap)
                self._remember_own_signature(netmap)
                self.error = None
            except (TKAError, OSError) as exc:
                # Damaged lock files: enforce nothing new, but say so loudly; peers stay as they were.
                self.error = f"Tailnet Lock cannot run: {exc}"
                log.error("tailnet lock: %s", exc)
                filtered = self._filter_safely(netmap)
            await apply_fn(filtered)

    def _filter_safely(self, netmap: NetMap) -> NetMap:
        try:
            return self._filter(netmap)
        except (TKAError, OSError):
            pass
        # The lock files cannot be read. If a chain was there, fail closed: no peer is known to be
        # signed (the health line says how to recover); with no chain, the lock was never on here.
        aums = self.dir.path / "aums"
        try:
            had_chain = aums.is_dir() and any(aums.iterdir())
        except OSError:
            had_chain = True
        if not had_chain:
            return netmap
        self.locked_out = tuple((p, "lock state unreadable") for p in netmap.peers)
        self.error = (f"{self.error}; no peer is admitted until it is fixed (move {self.dir.path} away to "
                      "start over: the next map bootstraps the chain again)")
        return dataclasses.replace(netmap, peers=(), packet_filter=_filter_without(netmap, netmap.peers))

    def _filter(self, netmap: NetMap) -> NetMap:
        result = self.node().filter_peers(netmap.peers, node_key=lambda p: p.node_key,
                                          signature=lambda p: p.key_signature or None)
        self.locked_out = tuple((lo.peer, f"{lo.reason.value}: {lo.detail}" if lo.detail else lo.reason.value)
                                for lo in result.locked_out)
        if len(result.admitted) == len(netmap.peers):
            return netmap
        for peer, why in self.locked_out:
            log.info("tailnet lock: peer %s (%s) is locked out: %s", peer.name, peer.node_key, why)
        return dataclasses.replace(netmap, peers=result.admitted,
                                   packet_filter=_filter_without(netmap, [p for p, _ in self.locked_out]))

    def _remember_own_signature(self, netmap: NetMap) -> None:
        """Keep this node's signature as the map carries it (only one made for our current node
        key): a later node-key rotation nests it in a rotation signature (`rotation_signature`)."""
        raw = netmap.self_node.key_signature
        if not raw:
            return
        try:
            blob = base64.b64decode(raw, validate=True)
            if NodeKeySignature.parse(blob).pubkey != base64.b64decode(netmap.self_node.node_key):
                return
        except (TKAError, ValueError):
            return
        try:
            current = self.dir.own_signature()
        except (TKAError, OSError):
            current = None   # damaged: the map's copy replaces it
        if current != blob:
            try:
                self.dir.save_own_signature(blob)
            except OSError as exc:   # only a later rotation needs it: not a reason to stop enforcing
                log.warning("tailnet lock: cannot keep this node's signature: %s", exc)

    async def rotation_signature(self, new_node_key: str) -> str | None:
        """The signature (base64) to register a new node key with, so that locked peers keep
        trusting this node without a `lock sign` (Tailscale's ResignNKS at registration): a rotation
        signature by this node's lock key over our last signature. None when there is nothing to
        rotate (no lock, never signed, or signed without naming our lock key as rotation key;
        then a trusted node must sign the new key, and `status` says why)."""
        async with self._mutex:
            try:
                old = self.dir.own_signature()
                if old is None:
                    return None
                node = self.node()
                if node.authority is None:
                    return None
                new = node.rotate(base64.b64decode(new_node_key), old)
            except (TKAError, OSError, ValueError) as exc:
                self._refuse(f"cannot re-sign the new node key by rotation: {exc}")
                return None
            log.info("tailnet lock: signed the new node key %s by rotation", new_node_key)
            return base64.b64encode(new).decode()

    async def _report_key(self, client: ControlClient) -> None:
        """Tell the control server our lock public key once per run, so peers' maps carry it and a
        `lock init` that trusts it signs our node key (as Tailscale's does)."""
        node_key = getattr(client, "node_key_public", None)
        if self._key_reported is not None and self._key_reported == node_key:
            return   # a re-keyed node (`up --force-reauth`) reports again under its new node key
        try:
            me = self.dir.lock_key()
            proof = me.sign(key_proof_message(base64.b64decode(node_key or "")))
            await client.tka("key", {"lock_key": format_public(me.public), "proof": base64.b64encode(proof).decode()})
        except ControlError as exc:
            if exc.retryable:
                return   # unreachable: the next map tries again
            log.warning("tailnet lock: the control server did not take our lock key: %s", exc.message)
        self._key_reported = node_key or ""

    async def _flush_outbox(self, client: ControlClient) -> None:
        box = self.dir.outbox()
        if not (box.init_genesis or box.signatures or box.disablement_secret):
            return
        changed = False
        if box.init_genesis:
            try:
                await client.tka("init", {"genesis": box.init_genesis, "signatures": box.signatures})
                box.signatures = {}
                log.info("tailnet lock: enabled on the control server")
            except ControlError as exc:
                if exc.retryable:
                    return   # unreachable: the outbox stays, the next map tries again
                self._refuse(f"the control server refused `lock init`: {exc.message}")
            box.init_genesis = None
            changed = True
        for nk, sig in list(box.signatures.items()):
            try:
                await client.tka("sign", {"target": nk, "signature": sig})
            except ControlError as exc:
                if exc.retryable:
                    break
                self._refuse(f"the control server refused the signature of {nk}: {exc.message}")
            del box.signatures[nk]
            changed = True
        if box.disablement_secret:
            try:
                await client.tka("disable", {"secret": box.disablement_secret})
                box.disablement_secret = None
                changed = True
            except ControlError as exc:
                if not exc.retryable:
                    self._refuse(f"the control server refused the disablement secret: {exc.message}")
                    box.disablement_secret = None
                    changed = True
        if changed:
            self.dir.save_outbox(box)

    async def _sync(self, control_head: str | None, client: ControlClient) -> None:
        node = self.node()
        if control_head is None:
            if node.authority is not None and not self.dir.outbox().init_genesis:
                await self._follow_disable(client)
            return
        if node.head == control_head:
            return
        try:
            if node.authority is None:
                ans = await client.tka("bootstrap", {})
                if not ans.get("genesis"):
                    return
                node.bootstrap(base64.b64decode(ans["genesis"]))
                log.info("tailnet lock: joined the tailnet's lock (head %s)", node.head)
                self.dir.clear_local_disabled()
                if node.head == control_head:
                    return
            offer = node.offer()
            answer = (await client.tka("sync/offer", {"offer": offer}))["answer"]
            back = node.apply(answer)
            if back:
                await client.tka("sync/send", {"aums": back})
            log.info("tailnet lock: synced to head %s", node.head)
            now = time.time()
            if now - self._compacted_at > COMPACT_EVERY:
                # Without compaction a chain stops opening past the 2000-AUM scan limit; the control
                # server keeps the whole history, so a common AUM is always found.
                node.compact(now)
                self._compacted_at = now
        except TKAError as exc:
            # NodeLock keeps `last_refusal`; our chain is unchanged.
            self._refuse(f"refused an update from the control server: {type(exc).__name__}: {exc}")
        except ControlError as exc:
            if not exc.retryable:
                self._refuse(f"the control server refused our sync: {exc.message}")
            else:
                log.warning("tailnet lock: sync failed, will retry with the next map: %s", exc)
        except (KeyError, TypeError, ValueError) as exc:
            self._refuse(f"malformed answer from the control server: {exc}")

    async def _follow_disable(self, client: ControlClient) -> None:
        try:
            ans = await client.tka("bootstrap", {})
        except ControlError as exc:
            log.warning("tailnet lock: cannot ask for the disablement secret: %s", exc)
            return
        secret = ans.get("disablement_secret")
        if ans.get("genesis"):
            return  # the lock is on there (this map predates it): the next map carries its head
        if not secret:
            self._refuse("the control server says the lock is off but gives no disablement secret: still enforcing")
            return
        try:
            raw = bytes.fromhex(str(secret))
        except ValueError:
            self._refuse("the control server sent a malformed disablement secret: still enforcing")
            return
        node = self.node()
        ok = await asyncio.get_running_loop().run_in_executor(None, node.disable, raw)
        if ok:
            self.dir.forget_chain()
            log.warning("tailnet lock: disabled with a disablement secret")
        else:
            self._refuse("the control server sent a disablement secret that is not one of ours: still enforcing")

    # -- LocalAPI -------------------------------------------------------------------------------

    async def command(self, command: str, params: dict[str, Any], client: ControlClient | None,
                      apply_fn: Callable[[NetMap], Awaitable[None]]) -> dict[str, Any]:
        """Run `meshnode lock COMMAND` here for the CLI, then send what it queued and re-filter."""
        from .lockcli import run_in_daemon

        async with self._mutex:
            me = self.last_map.self_node if self.last_map else None
            extra = {"self_signature": me.key_signature if me else None,
                     "peers": [{"name": p.name, "node_key": p.node_key, "key_signature": p.key_signature,
                                "lock_key": p.lock_key}
                               for p in (self.last_map.peers if self.last_map else ())],
                     "last_refusal": self.last_refusal or (self._node.last_refusal if self._node else None)}
            output, error = await asyncio.get_running_loop().run_in_executor(
                None, run_in_daemon, self.state_dir, command, params, extra)
            self._node = None   # the command may have changed the files: read them again
        if error is None and command not in ("status", "log"):
            await self.apply(None, client, apply_fn)
        return {"output": output, "error": error}

    def status(self) -> dict[str, Any]:
        """For `meshnode status`: whether the lock is on, the locked-out peers, the last refusal."""
        node = self._node
        return {"enabled": bool(node is not None and node.authority is not None),
                "head": node.head if node is not None else None,
                "locked_out": [{"name": p.name, "node_key": p.node_key, "reason": why} for p, why in self.locked_out],
                "last_refusal": self.last_refusal or (node.last_refusal if node is not None else None),
                "error": self.error}


def _filter_without(netmap: NetMap, peers: Any) -> tuple[Any, ...]:
    """The map's packet-filter rules without the addresses of `peers` (the locked-out ones)."""
    hosts: set[Any] = set()
    for p in peers:
        hosts |= host_addresses(p.addresses)
    # Never cut this node's own addresses (a hostile map could give a peer one of them).
    hosts -= host_addresses(netmap.self_node.addresses)
    return without_hosts(netmap.packet_filter, hosts)
