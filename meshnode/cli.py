"""The `meshnode` command: the node CLI (up, down, status, ...), the daemon, the control server and
the standalone WireGuard engine. Each part lives in its own package; this module only assembles them."""

from __future__ import annotations

import click

from .control.cli import control
from .derp.cli import derp
from .node.cli import DEFAULT_SOCKET, register_node_commands, version_cmd
from .node.lockcli import lock
from .wg.cli import wg


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    ctx.invoke(version_cmd)
    ctx.exit(0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", default=None, envvar="MESHNODE_SOCKET", show_envvar=True,
              help=f"LocalAPI unix socket of the daemon [default: {DEFAULT_SOCKET}];"
                   " also accepted after the command.")
@click.option("-v", "--verbose", count=True, help="Show technical details of failures.")
@click.option("--version", "show_version", is_flag=True, is_eager=True, expose_value=False,
              callback=_print_version, help="Show the CLI, daemon and control server versions.")
@click.pass_context
def main(ctx: click.Context, socket_path: str | None, verbose: int) -> None:
    """meshnode: a mesh VPN node with MagicDNS.

    The node commands talk to the daemon over its LocalAPI socket: set MESHNODE_SOCKET or pass
    --socket PATH (before or after the command) when the daemon does not use the default.
    """
    ctx.ensure_object(dict)
    ctx.obj.setdefault("socket", socket_path)
    ctx.obj["verbose"] = ctx.obj.get("verbose", 0) + verbose


main.add_command(control)
main.add_command(derp)
main.add_command(wg)
main.add_command(lock)
register_node_commands(main)


if __name__ == "__main__":
    main()
