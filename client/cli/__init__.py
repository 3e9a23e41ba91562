"""`easel`: one program, one subcommand module per job (each module in this package owns its commands).

Importing a subcommand module must stay cheap: heavy imports (MLX, mflux) happen inside the command.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

# Modules of this package that contribute commands; each defines `register(group)`.
_COMMAND_MODULES = ("render", "serve", "batch", "lora", "dataset", "traces", "packs")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="easel")
def main() -> None:
    """easel: a Flux render daemon with per-request LoRA stacks, and its client."""


for _name in _COMMAND_MODULES:
    _qualified = f"{__name__}.{_name}"
    if importlib.util.find_spec(_qualified) is not None:
        importlib.import_module(_qualified).register(main)
