"""`meshnode control ...`: the coordination server and its admin commands."""

from __future__ import annotations

import click


@click.group()
def control() -> None:
    """Run and administer the coordination server."""
