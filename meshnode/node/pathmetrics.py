"""Prometheus text for the node's paths, disco, relay (DERP) and STUN, appended to the resolver's
metrics on the daemon's `--metrics` listener.

The listener runs on the resolver's thread while the path runner lives on the daemon's loop, so this
reads only snapshots: `dict(counter)` and `list(...)` copies are single C-level operations under the
GIL, never an iteration that a concurrent update could break."""

from __future__ import annotations

from typing import Any

from ..paths import PathType

# (metric, help, runner/layer counter, labels): every family is always printed, zero or not, so a
# dashboard sees the series before the first event.
_COUNTERS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("meshnode_disco_pings_sent_total", "Disco pings sent.", "pings_sent", {}),
    ("meshnode_disco_pongs_received_total", "Disco pongs received for our pings.", "pongs_received", {}),
    ("meshnode_disco_ping_timeouts_total", "Disco pings that got no pong.", "ping_timeouts", {}),
    ("meshnode_path_switches_total", "Times a peer's path changed.", "path_changes", {}),
    ("meshnode_paths_abandoned_total", "Direct paths abandoned for unanswered data.", "paths_abandoned", {}),
    ("meshnode_relay_packets_total", "Packets through the relay.", "relay_sent", {"direction": "sent"}),
    ("meshnode_relay_packets_total", "", "relay_received", {"direction": "received"}),
    ("meshnode_relay_bytes_total", "Payload bytes through the relay.", "relay_bytes_sent", {"direction": "sent"}),
    ("meshnode_relay_bytes_total", "", "relay_bytes_received", {"direction": "received"}),
    ("meshnode_stun_queries_total", "STUN binding requests sent from the WireGuard socket.", "stun_sent", {}),
    ("meshnode_stun_responses_total", "STUN answers by outcome.", "stun_received", {"result": "ok"}),
    ("meshnode_stun_responses_total", "", "stun_bad", {"result": "malformed"}),
    ("meshnode_stun_responses_total", "", "stun_unknown", {"result": "unknown_txid"}),
)

# Relay drops by reason: our runner's counters and the DERP client's own.
_RUNNER_DROPS = {"relay_send_dropped": "no_relay_or_peer", "relay_unavailable": "disco_no_relay"}
_CLIENT_DROPS = {"send_dropped_disconnected": "disconnected", "send_dropped_backlog": "backlog",
                 "recv_dropped": "receive_queue_full", "forward_dropped": "forward"}


def _line(out: list[str], name: str, value: float, labels: dict[str, str]) -> None:
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    out.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")


def paths_text(runner: Any) -> str:
    """The families for `runner` (a PathRunner, or None when the node has no tunnel: all zero)."""
    counts: dict[str, int] = {}
    client_stats: dict[str, int] = {}
    by_type = {t: 0 for t in PathType}
    connected = 0
    if runner is not None:
        counts = {**dict(runner.layer.counters), **dict(runner.counters)}
        for path in list(runner.layer.paths().values()):
            by_type[path.type] += 1
        relay = runner.relay
        if relay is not None:
            client_stats = dict(relay.stats)
            connected = 1 if relay.connected_url is not None else 0
    out: list[str] = []
    out.append("# HELP meshnode_paths Peers by the path that carries their traffic.")
    out.append("# TYPE meshnode_paths gauge")
    for t in PathType:
        _line(out, "meshnode_paths", by_type[t], {"type": t.value})
    seen: set[str] = set()
    for name, help_, key, labels in _COUNTERS:
        if name not in seen:
            seen.add(name)
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} counter")
        _line(out, name, counts.get(key, 0), labels)
    out.append("# HELP meshnode_relay_drops_total Relay packets dropped, by reason.")
    out.append("# TYPE meshnode_relay_drops_total counter")
    for key, reason in _RUNNER_DROPS.items():
        _line(out, "meshnode_relay_drops_total", counts.get(key, 0), {"reason": reason})
    for key, reason in _CLIENT_DROPS.items():
        _line(out, "meshnode_relay_drops_total", client_stats.get(key, 0), {"reason": reason})
    out.append("# HELP meshnode_relay_connected Whether the DERP client of the home region is connected.")
    out.append("# TYPE meshnode_relay_connected gauge")
    _line(out, "meshnode_relay_connected", connected, {})
    out.append("# HELP meshnode_relay_home_region The home relay region (0: none).")
    out.append("# TYPE meshnode_relay_home_region gauge")
    _line(out, "meshnode_relay_home_region", (runner.relay_region or 0) if runner is not None else 0, {})
    return "\n".join(out) + "\n"
