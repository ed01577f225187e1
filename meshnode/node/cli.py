"""Node commands: daemon, up, down, logout, status, ip, ping, netcheck, dns."""

from __future__ import annotations

import click


def register_node_commands(group: click.Group) -> None:
    """Attach the node's commands to the top-level `meshnode` group."""
