"""Tailnet Lock costs, run by hand: `.venv/bin/python bench/tka.py`.

Prints per-operation CPU figures for what a node does on each network map (checking every peer's
node-key signature) and on each chain update, and the one-off disablement KDF.
"""

from __future__ import annotations

import base64
import time

from meshnode.tka import Authority, MemoryStore, State, ed25519_key
from meshnode.tka.enforce import VerifyCache, filter_peers
from meshnode.tka.nodesig import sign_direct, sign_rotation
from meshnode.tka.signing import LockPrivateKey
from meshnode.tka.state import disablement_kdf
from meshnode.tka.sync import make_offer, missing_aums


def per_op(fn, n: int) -> float:
    t = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t) / n * 1e6


def main() -> None:
    signer = LockPrivateKey(b"\x01" * 32)
    rot = LockPrivateKey(b"\x02" * 32)
    store = MemoryStore()
    a, g = Authority.create(store, State(disablement_values=(bytes(32),), keys=(ed25519_key(signer.public),),
                                         state_id1=1, state_id2=2), signer)
    rows = []
    nks = [i.to_bytes(2, "big") * 16 for i in range(1000)]
    direct = [sign_direct(signer, nk, rot.public) for nk in nks]
    peers = [(base64.b64encode(nk).decode(), base64.b64encode(s.serialize()).decode()) for nk, s in zip(nks, direct)]
    rows.append(("verify one direct node-key signature", per_op(
        lambda: a.node_key_authorized(nks[0], direct[0].serialize()), 2000), "us"))
    rotated = sign_rotation(rot, nks[1], direct[0]).serialize()
    rows.append(("verify one rotation signature (2 Ed25519 checks)", per_op(
        lambda: a.node_key_authorized(nks[1], rotated), 2000), "us"))
    t = time.process_time()
    for _ in range(5):
        filter_peers(a.state, peers, node_key=lambda p: p[0], signature=lambda p: p[1])
    rows.append(("filter a 1000-peer map", (time.process_time() - t) / 5 * 1e3, "ms"))
    cache = VerifyCache()
    filter_peers(a.state, peers, node_key=lambda p: p[0], signature=lambda p: p[1], cache=cache)
    t = time.process_time()
    for _ in range(5):
        filter_peers(a.state, peers, node_key=lambda p: p[0], signature=lambda p: p[1], cache=cache)
    rows.append(("filter the same 1000-peer map again, with a VerifyCache", (time.process_time() - t) / 5 * 1e3, "ms"))

    # Locked-out peers cut out of the packet filter: a `*` rule (both families) plus one rule per
    # peer, with 100 of 1000 peers locked out (each split out of 0.0.0.0/0 and ::/0).
    import ipaddress
    from meshnode.tka.filterrules import without_hosts
    rules = [{"src": ["0.0.0.0/0", "::/0"], "dst": ["100.64.0.1/32"], "ports": "*", "protos": [6, 17]}]
    rules += [{"src": [f"100.64.{i // 256}.{i % 256}/32"], "dst": ["100.64.0.1/32"], "ports": "22", "protos": [6]}
              for i in range(2, 1002)]
    hosts = {ipaddress.ip_address(f"100.64.{i // 256}.{i % 256}") for i in range(2, 102)}
    hosts |= {ipaddress.ip_address(f"fd7a:115c:a1e0::{i:x}") for i in range(2, 102)}
    t = time.process_time()
    for _ in range(5):
        out = without_hosts(rules, hosts)
    rows.append((f"cut 100 locked-out peers out of 1001 filter rules ({len(out[0]['src'])} prefixes left in `*`)",
                 (time.process_time() - t) / 5 * 1e3, "ms"))

    ups = []
    b = a
    t = time.process_time()
    for _ in range(500):
        u = b.updater(signer).no_op().finalize(store)
        b = b.inform(store, u)
        ups += u
    rows.append(("sign + verify + apply one AUM (chain of 500)", (time.process_time() - t) / 500 * 1e6, "us"))
    t = time.process_time()
    Authority.open(store)
    rows.append(("open a 500-AUM chain from its store", (time.process_time() - t) * 1e3, "ms"))
    s2 = MemoryStore()
    b2 = Authority.bootstrap(s2, g)
    t = time.process_time()
    missing = missing_aums(b, store, make_offer(b2, s2))
    b2 = b2.inform(s2, missing)
    rows.append((f"sync {len(missing)} AUMs to a fresh node (offer, diff, verify, apply)",
                 (time.process_time() - t) * 1e3, "ms"))
    t = time.perf_counter()
    disablement_kdf(b"x" * 32)
    rows.append(("disablement KDF (Argon2i, 16 MiB, t=4, wall)", (time.perf_counter() - t) * 1e3, "ms"))
    width = max(len(r[0]) for r in rows)
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:10.1f} {unit}")


if __name__ == "__main__":
    main()
