"""Connection (flow) logs at the control server: nodes upload windows over the authenticated node
protocol and get an acknowledgement; the store keeps them for `flow_retention_days` (30 by default).

    POST /machine/flows  {boot_id, lost, batches: [{seq, records: [...]}]}  -> {ack: seq}

`seq` counts the batches of one node run (`boot_id`): a batch re-sent because its acknowledgement
was lost is stored once (store.store_flows). `lost` is how many windows the node dropped while the
control server was unreachable (its buffer is bounded). Records are checked field by field.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .protocol import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from .server import ControlServer

log = logging.getLogger("meshnode.control.flows")

MAX_BATCHES = 100
MAX_RECORDS = 20_000

_INTS = ("proto", "sport", "dport", "tx_packets", "tx_bytes", "rx_packets", "rx_bytes")
_KINDS = frozenset({"tunnel", "subnet", "exit"})


def check_record(r: Any) -> dict[str, Any]:
    if not isinstance(r, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "flow record: expected an object")
    out: dict[str, Any] = {}
    for k in ("start", "end"):
        v = r.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"flow record: {k} must be a number")
        out[k] = float(v)
    for k in _INTS:
        v = r.get(k, 0)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 62:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"flow record: {k} must be a non-negative integer")
        out[k] = v
    for k, n in (("src", 64), ("dst", 64), ("peer", 256), ("rule", 128)):
        v = r.get(k, "")
        if not isinstance(v, str) or len(v) > n:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"flow record: {k} must be text")
        out[k] = v
    kind = r.get("kind", "tunnel")
    if kind not in _KINDS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"flow record: kind must be one of {sorted(_KINDS)}")
    out["kind"] = kind
    out["dropped"] = 1 if r.get("dropped") else 0
    return out


class ControlFlows:
    def __init__(self, server: "ControlServer") -> None:
        self.server = server   # retention: the server's once-per-tailnet job (server.py, jobs.py)

    def attach(self, app: web.Application) -> None:
        app.add_routes([web.post("/machine/flows", self._upload)])

    async def _upload(self, request: web.Request) -> web.Response:
        machine_key, chan, p = await self.server._open(request)
        node = self.server._node_for(machine_key, p)
        boot_id = p.get("boot_id")
        batches = p.get("batches")
        if not isinstance(boot_id, str) or not 0 < len(boot_id) <= 64:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "boot_id: expected text")
        if not isinstance(batches, list) or len(batches) > MAX_BATCHES:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"batches: expected a list of at most {MAX_BATCHES}")
        lost = p.get("lost", 0)
        if not isinstance(lost, int) or lost < 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "lost: expected a non-negative integer")
        parsed, total = [], 0
        for b in batches:
            if not isinstance(b, dict) or not isinstance(b.get("seq"), int) or not isinstance(b.get("records"), list):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "batch: expected {seq, records}")
            total += len(b["records"])
            if total > MAX_RECORDS:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"at most {MAX_RECORDS} records per upload")
            parsed.append((b["seq"], [check_record(r) for r in b["records"]]))
        ack = self.server.store.store_flows(node, boot_id, parsed, lost)
        return self.server._sealed(chan, {"ack": ack})
