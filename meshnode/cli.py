"""The `meshnode` command: the node CLI (up, down, status, ...), the daemon, the control server and
the standalone WireGuard engine. Each part lives in its own package; this module only assembles them."""

from __future__ import annotations

import click

from .control.cli import control
from .derp.cli import derp
from .node.cli import register_node_commands
from .wg.cli import wg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", default=None, envvar="MESHNODE_SOCKET",
              help="LocalAPI unix socket of the daemon.")
@click.pass_context
def main(ctx: click.Context, socket_path: str | None) -> None:
    """meshnode: a mesh VPN node with MagicDNS."""
    ctx.ensure_object(dict)
    ctx.obj["socket"] = socket_path


main.add_command(control)
main.add_command(derp)
main.add_command(wg)
register_node_commands(main)


if __name__ == "__main__":
    main()
