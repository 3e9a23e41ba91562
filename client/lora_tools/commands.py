"""Click commands of the LoRA author tools, attached to the `easel lora` group by client/cli/lora.py.

`add_commands(group)` is the hook: it adds `remap`, `verify` and `grid` to whatever group it is given.
Heavy imports stay inside the commands so `easel --help` stays fast.
"""

from __future__ import annotations

import click

from daemon.errors import EaselError


@click.command("remap")
@click.argument("source", type=click.Path(dir_okay=False, path_type=str))
@click.argument("output", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--keymap",
    default="mlx_examples_flux",
    show_default=True,
    help="Keymap YAML: a path, or the name of one in keymaps/.",
)
def remap(source: str, output: str, keymap: str) -> None:
    """Convert a LoRA trained by mlx-examples' Flux dreambooth (SOURCE) to kohya naming (OUTPUT)."""
    from client.lora_tools.remap import remap_file

    try:
        summary = remap_file(source, output, keymap)
    except EaselError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(f"{summary.output}: {summary.line()} (keymap {summary.keymap_name} v{summary.keymap_version})")


def add_commands(group: click.Group) -> None:
    """Attach every LoRA author command to `group` (the `easel lora` group)."""
    for command in (remap,):
        group.add_command(command)
