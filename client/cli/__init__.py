"""`easel`: one program; each module of this package owns one group of commands.

Commands are registered explicitly (a renamed module fails loudly, it never silently drops out). The
commands that need the model stack (`easel serve`) live with the daemon and join through the
`easel.commands` entry point declared in pyproject.toml, so this package never imports the daemon.
Importing a command module stays cheap: heavy imports happen inside the command.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import click

from client.cli import batch, daemon_control, dataset, lora, packs, render, traces


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="easel")
def main() -> None:
    """easel: a Flux render daemon with per-request LoRA stacks, and its client."""


for _module in (render, daemon_control, batch, lora, dataset, traces, packs):
    _module.register(main)

for _ep in entry_points(group="easel.commands"):
    main.add_command(_ep.load(), _ep.name)
