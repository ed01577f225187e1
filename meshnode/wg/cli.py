"""`meshnode wg --config FILE [--tun NAME]`: the WireGuard engine alone."""

from __future__ import annotations

import click


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--tun", default="wg0", show_default=True)
def wg(config_path: str, tun: str) -> None:
    """Run the WireGuard engine in the foreground from a wg-quick style file."""
    raise click.ClickException("not built yet")
