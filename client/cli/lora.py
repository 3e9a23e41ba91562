"""`easel lora ...`: the LoRA command group (inspect, and the author tools: remap, verify, grid)."""

from __future__ import annotations

import click

from client.lora_tools import commands
from client.lora_tools.inspect_cmd import inspect_command


@click.group("lora")
def lora() -> None:
    """LoRA files: inspect, remap, verify, strength grids."""


lora.add_command(inspect_command)
commands.add_commands(lora)


def register(group: click.Group) -> None:
    group.add_command(lora)
