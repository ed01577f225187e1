"""The sans-I/O port-mapping client: request a UDP mapping, renew it, notice a gateway restart,
release it. Bytes and `now` in, datagrams and events out; the runner owns the socket and clock.

One `PortMapClient` keeps one mapping of one internal UDP port with one protocol:
- requests are retransmitted on the protocol's schedule (NAT-PMP: 250 ms doubling, nine tries,
  RFC 6886 3.1; PCP: 3 s doubling to 1024 s with +-10 % jitter, RFC 6887 8.1.1), bounded by
  `give_up_after` for the first request (a prober wants an answer in seconds, not minutes);
- a granted mapping is renewed at half its lifetime; renewals retry until it expires;
- each response's epoch is checked against the client's own clock (RFC 6887 8.5, RFC 6886 3.6):
  a gateway that lost its state (rebooted) is re-asked at once, since our mapping is gone;
- responses that do not answer our request (another nonce, port or protocol) are ignored;
- error results are reported in words; errors that retrying cannot fix stop the client.
"""

from __future__ import annotations

import enum
import os
import random
from dataclasses import dataclass
from typing import Callable

from . import pcp, pmp


class Protocol(enum.Enum):
    PMP = "NAT-PMP"
    PCP = "PCP"
    UPNP = "UPnP"       # upnp.py; not driven by PortMapClient


class State(enum.Enum):
    IDLE = "idle"
    REQUESTING = "requesting"       # no mapping yet
    MAPPED = "mapped"               # a mapping (possibly being renewed)
    FAILED = "failed"               # given up; retry_at says when to try again (None: never)
    RELEASED = "released"


@dataclass(frozen=True, slots=True)
class Mapping:
    protocol: Protocol
    external_ip: str
    external_port: int
    internal_port: int
    lifetime: int               # seconds granted
    obtained_at: float
    renew_at: float
    expires_at: float

    @property
    def endpoint(self) -> str:
        return f"[{self.external_ip}]:{self.external_port}" if ":" in self.external_ip \
            else f"{self.external_ip}:{self.external_port}"


@dataclass(frozen=True, slots=True)
class Mapped:
    """A mapping was granted or renewed (compare `mapping.endpoint` to notice a change)."""
    mapping: Mapping


@dataclass(frozen=True, slots=True)
class Lost:
    """The mapping expired without a renewal answering."""
    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The gateway refused or never answered; `retry_at` None: retrying will not help."""
    reason: str
    retry_at: float | None
    answered: bool              # the gateway speaks the protocol (it sent an error result)


@dataclass(frozen=True, slots=True)
class GatewayRestarted:
    """The epoch check says the gateway lost its mappings; a new request is on its way."""


@dataclass(frozen=True, slots=True)
class Released:
    """The gateway confirmed the deletion."""


Event = Mapped | Lost | Failed | GatewayRestarted | Released

RETRY_AFTER_TIMEOUT = 120.0     # no answer at all: ask again later (the gateway may learn it)
MIN_RETRY = 30.0                # RFC 6887 7.4: wait at least 30 s after a short-lifetime error


class PortMapClient:
    def __init__(self, protocol: Protocol, *, client_ip: str, internal_port: int,
                 lifetime: int = 7200, give_up_after: float | None = 10.0,
                 nonce: bytes | None = None, rand: Callable[[], float] = random.random) -> None:
        if protocol not in (Protocol.PMP, Protocol.PCP):
            raise ValueError(f"PortMapClient speaks NAT-PMP and PCP, not {protocol.value}")
        self.protocol = protocol
        self.client_ip = client_ip
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.give_up_after = give_up_after
        self.nonce = nonce if nonce is not None else os.urandom(12)
        self._rand = rand
        self.state = State.IDLE
        self.mapping: Mapping | None = None
        self.retry_at: float | None = None
        self.last_error: str | None = None
        self.answered = False               # the gateway ever answered in this protocol
        # the request in flight
        self._next_send: float | None = None
        self._rt = 0.0
        self._tries = 0
        self._give_up_at: float | None = None
        self._pmp_ip: str | None = None     # NAT-PMP: the two halves of one answer
        self._pmp_map: pmp.PmpResponse | None = None
        # epoch check (RFC 6887 8.5)
        self._epoch: tuple[int, float] | None = None

    # --- driving ------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Ask for the mapping (again)."""
        self.state = State.REQUESTING if self.mapping is None else State.MAPPED
        self._begin(now)

    def _begin(self, now: float) -> None:
        self._next_send = now
        self._tries = 0
        self._rt = 0.0
        self._pmp_ip, self._pmp_map = None, None
        if self.mapping is not None:
            self._give_up_at = self.mapping.expires_at       # a renewal tries until expiry
        elif self.give_up_after is not None:
            self._give_up_at = now + self.give_up_after
        else:
            self._give_up_at = None

    def next_deadline(self) -> float | None:
        times = [t for t in (self._next_send, self._give_up_at) if t is not None]
        if self.state == State.MAPPED and self.mapping is not None and self._next_send is None:
            times.append(self.mapping.renew_at)
        if self.state == State.FAILED and self.retry_at is not None:
            times.append(self.retry_at)
        return min(times) if times else None

    def poll(self, now: float) -> tuple[list[bytes], list[Event]]:
        """Datagrams due now (first sends, retransmissions, renewals) and timeouts."""
        events: list[Event] = []
        if self.state == State.FAILED and self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            self.start(now)
        if self.state == State.MAPPED and self.mapping is not None and self._next_send is None \
                and now >= self.mapping.renew_at:
            self._begin(now)
        if self.state not in (State.REQUESTING, State.MAPPED):
            return [], events
        if self._give_up_at is not None and now >= self._give_up_at:
            return [], self._timed_out(now)
        if self._next_send is None or now < self._next_send:
            return [], events
        self._tries += 1
        if self.protocol is Protocol.PMP:
            if self._tries >= pmp.MAX_TRIES:
                self._next_send = None
                # the ninth try waits as long again as all before it, then gives up
                end = now + pmp.INITIAL_TIMEOUT * 2 ** (self._tries - 1)
                self._give_up_at = end if self._give_up_at is None else min(self._give_up_at, end)
            else:
                self._next_send = now + pmp.INITIAL_TIMEOUT * 2 ** (self._tries - 1)
        else:
            base = pcp.IRT if self._tries == 1 else min(2 * self._rt, pcp.MRT)
            self._rt = base * (1 + (self._rand() * 0.2 - 0.1))
            self._next_send = now + self._rt
        return self._requests(), events

    def _requests(self) -> list[bytes]:
        if self.protocol is Protocol.PMP:
            out = []
            if self._pmp_ip is None:
                out.append(pmp.public_address_request())
            if self._pmp_map is None:
                suggested = self.mapping.external_port if self.mapping else 0
                out.append(pmp.map_udp_request(self.internal_port, suggested, self.lifetime))
            return out
        m = self.mapping
        return [pcp.map_request(self.client_ip, self.nonce, self.internal_port, self.lifetime,
                                external_port=m.external_port if m else 0,
                                external_ip=m.external_ip if m else "0.0.0.0")]

    def _timed_out(self, now: float) -> list[Event]:
        self._next_send, self._give_up_at = None, None
        if self.mapping is not None and now >= self.mapping.expires_at:
            self.mapping = None
            self.state, self.retry_at = State.FAILED, now + RETRY_AFTER_TIMEOUT
            self.last_error = "the mapping expired and the gateway did not answer its renewal"
            return [Lost(self.last_error)]
        if self.mapping is not None:
            return []
        self.state, self.retry_at = State.FAILED, now + RETRY_AFTER_TIMEOUT
        self.last_error = f"no {self.protocol.value} answer from the gateway"
        return [Failed(self.last_error, self.retry_at, self.answered)]

    def release(self) -> list[bytes]:
        """The datagram that deletes the mapping (lifetime 0); nothing when there is none."""
        m = self.mapping
        self.state, self._next_send, self._give_up_at, self.retry_at = State.RELEASED, None, None, None
        if m is None:
            return []
        if self.protocol is Protocol.PMP:
            return [pmp.map_udp_request(self.internal_port, 0, 0)]
        return [pcp.map_request(self.client_ip, self.nonce, self.internal_port, 0,
                                external_port=m.external_port, external_ip=m.external_ip)]

    # --- answers --------------------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Event]:
        """A datagram from the gateway's port 5351; events it causes (none for strangers)."""
        if not data:
            return []
        if self.protocol is Protocol.PCP and data[0] == pmp.VERSION:
            # RFC 6887 9: a NAT-PMP-only gateway answers a PCP request with NAT-PMP's
            # "unsupported version": it speaks NAT-PMP, not PCP.
            try:
                r = pmp.parse_response(data)
            except pmp.PmpError:
                return []
            if r.result == pmp.PmpResult.UNSUPPORTED_VERSION and self.state == State.REQUESTING:
                return self._fail(now, "the gateway speaks NAT-PMP, not PCP", permanent=True, answered=False)
            return []
        try:
            if self.protocol is Protocol.PMP:
                return self._receive_pmp(pmp.parse_response(data), now)
            return self._receive_pcp(pcp.parse_response(data), now)
        except (pmp.PmpError, pcp.PcpError):
            return []

    def _epoch_lost(self, epoch: int, now: float) -> bool:
        prev, self._epoch = self._epoch, (epoch, now)
        if prev is None:
            return False
        prev_epoch, prev_now = prev
        client_delta = now - prev_now
        server_delta = epoch - prev_epoch
        return (epoch < prev_epoch - 1
                or client_delta + 2 < server_delta - server_delta / 16
                or server_delta + 2 < client_delta - client_delta / 16)

    def _fail(self, now: float, reason: str, *, permanent: bool, answered: bool,
              retry_after: float = MIN_RETRY) -> list[Event]:
        self._next_send, self._give_up_at = None, None
        self.last_error = reason
        if self.mapping is not None and now < self.mapping.expires_at and not permanent:
            # a renewal refused for now: the mapping we hold lasts until it expires
            self._next_send = now + max(retry_after, MIN_RETRY)
            self._give_up_at = self.mapping.expires_at
            return [Failed(reason, self._next_send, answered)]
        self.mapping = None
        self.state = State.FAILED
        self.retry_at = None if permanent else now + max(retry_after, MIN_RETRY)
        return [Failed(reason, self.retry_at, answered)]

    def _granted(self, now: float, ip: str, port: int, lifetime: int, restarted: bool) -> list[Event]:
        if lifetime <= 0:
            return self._fail(now, "the gateway granted a mapping with no lifetime", permanent=False,
                              answered=True)
        self.mapping = Mapping(self.protocol, ip, port, self.internal_port, lifetime, now,
                               now + lifetime / 2, now + lifetime)
        self.state, self._next_send, self._give_up_at, self.last_error = State.MAPPED, None, None, None
        events: list[Event] = [GatewayRestarted()] if restarted else []
        return events + [Mapped(self.mapping)]

    def _receive_pmp(self, r: pmp.PmpResponse, now: float) -> list[Event]:
        if self.state == State.RELEASED:
            if r.op == pmp.OP_MAP_UDP and r.internal_port == self.internal_port and r.lifetime == 0:
                return [Released()]
            return []
        if self._next_send is None and self._give_up_at is None:
            return []       # nothing asked
        if r.op == pmp.OP_MAP_UDP and r.result == pmp.PmpResult.SUCCESS and r.internal_port != self.internal_port:
            return []
        self.answered = True
        restarted = self._epoch_lost(r.epoch, now) and self.mapping is not None
        if r.result != pmp.PmpResult.SUCCESS:
            code = pmp.PmpResult(r.result) if r.result in pmp.PmpResult._value2member_map_ else None
            permanent = code in (pmp.PmpResult.UNSUPPORTED_VERSION, pmp.PmpResult.NOT_AUTHORIZED,
                                 pmp.PmpResult.UNSUPPORTED_OPCODE)
            return self._fail(now, "NAT-PMP: " + pmp.result_words(r.result), permanent=permanent, answered=True)
        if r.op == pmp.OP_PUBLIC_ADDRESS:
            if r.public_ip is None:
                return self._fail(now, "NAT-PMP: the gateway has no public address", permanent=False,
                                  answered=True)
            self._pmp_ip = r.public_ip
        elif r.op == pmp.OP_MAP_UDP:
            self._pmp_map = r
        if self._pmp_ip is None or self._pmp_map is None:
            return [GatewayRestarted()] if restarted else []
        m = self._pmp_map
        return self._granted(now, self._pmp_ip, m.external_port, m.lifetime, restarted)

    def _receive_pcp(self, r: pcp.PcpResponse, now: float) -> list[Event]:
        if r.op != pcp.OP_MAP:
            return []
        ours = r.nonce == self.nonce and r.protocol == pcp.PROTO_UDP and r.internal_port == self.internal_port
        if self.state == State.RELEASED:
            return [Released()] if ours and r.lifetime == 0 else []
        if self._next_send is None and self._give_up_at is None:
            return []
        # An error response without the payload cannot be matched by nonce; take it while asking.
        if r.nonce and not ours:
            return []
        self.answered = True
        restarted = self._epoch_lost(r.epoch, now) and self.mapping is not None
        if r.result != pcp.PcpResult.SUCCESS:
            code = pcp.PcpResult(r.result) if r.result in pcp.PcpResult._value2member_map_ else None
            permanent = code is None or code.long_lifetime
            return self._fail(now, "PCP: " + pcp.result_words(r.result), permanent=permanent, answered=True,
                              retry_after=float(r.lifetime))
        if not r.external_ip or r.external_port == 0:
            return self._fail(now, "PCP: the gateway granted no external address", permanent=False,
                              answered=True)
        return self._granted(now, r.external_ip, r.external_port, r.lifetime, restarted)
