"""`easel lora ...`: the LoRA command group.

`inspect` comes from client/lora_tools/inspect_cmd.py; the author tools (remap, verify, grid) attach
themselves through `client.lora_tools.commands.add_commands(group)` when that module is present.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from client.lora_tools.inspect_cmd import inspect_command


@click.group("lora")
def lora() -> None:
    """LoRA files: inspect, remap, verify, strength grids."""


lora.add_command(inspect_command)

# Other modules contribute commands to this group via add_commands(group).
_CONTRIBUTORS = ("client.lora_tools.commands",)


def register(group: click.Group) -> None:
    for name in _CONTRIBUTORS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).add_commands(lora)
    group.add_command(lora)
