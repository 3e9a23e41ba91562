"""`easel`: one program; each module of this package owns one group of commands.

Commands are registered explicitly (a renamed module fails loudly, it never silently drops out). The
commands that need the model stack (`easel serve`) live with the daemon and join through the
`easel.commands` entry point declared in pyproject.toml, so this package never imports the daemon;
such a command is imported only when it runs (or when help lists it), so `easel batch` or
`easel render` never load the daemon's modules. Importing a command module stays cheap: heavy imports
happen inside the command.

Every command fails the same way (client/cli/errors.py: `easel: <code>: <message>` and one exit status per
class of error) and shares its common options (client/cli/options.py); EASEL_* variables are read through
client/env.py.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

import click

from client.cli import batch, daemon_control, dataset, lora, packs, render, traces
from client.cli.errors import EaselGroup


class _Program(EaselGroup):
    """The top-level group: this package's commands, plus entry-point commands loaded on first use."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._plugins: dict[str, EntryPoint] = {ep.name: ep for ep in entry_points(group="easel.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugins))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in self._plugins:
            command = self._plugins[cmd_name].load()
            self.add_command(command, cmd_name)
        return command


@click.group(cls=_Program, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="easel")
def main() -> None:
    """easel: a Flux render daemon with per-request LoRA stacks, and its client."""


for _module in (render, daemon_control, batch, lora, dataset, traces, packs):
    _module.register(main)
