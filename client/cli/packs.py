"""`easel packs ...`: genre pack tools (list what a pack resolves to, generate the example LoRA files)."""

from __future__ import annotations

from pathlib import Path

import click

from client.cli.errors import EaselGroup
from client.cli.options import lora_root_option, packs_option


def register(group: click.Group) -> None:
    group.add_command(packs)


@click.group(cls=EaselGroup)
def packs() -> None:
    """Genre packs: example LoRA files and stack resolution."""


@packs.command("make-loras")
@packs_option
@lora_root_option
@click.option("--force", is_flag=True, help="Rewrite files even when they are already up to date.")
def make_loras(packs_root: Path, lora_root: Path | None, force: bool) -> None:
    """Generate the small tiny-preset LoRA files every example pack names (kohya naming, never committed)."""
    from client.packs.example_loras import make_pack_loras

    made = make_pack_loras(packs_root, lora_root, force=force)
    for g in made:
        state = "wrote" if g.created else "up to date"
        click.echo(f"{state:>10}  {g.path}  ({len(g.modules)} modules)")
    click.echo(f"{sum(g.created for g in made)} written, {sum(not g.created for g in made)} already up to date")


@packs.command("show")
@packs_option
@click.option("--genre", required=True)
@click.option("--world", default=None)
@click.option("--tier", default=None, help="Render tier to filter the stack for (default: show every entry).")
@lora_root_option
def show(packs_root: Path, genre: str, world: str | None, tier: str | None, lora_root: Path | None) -> None:
    """Print the composed LoRA stack (and triggers) of a genre/world for a tier."""
    from client.packs import load_visual_style

    style = load_visual_style(packs_root / genre, world, tier=tier, lora_root=lora_root, check_files=False)
    entries = style.stack.active
    click.echo(f"{genre}/{world or '-'} tier={tier or 'any'}: {len(entries)} LoRA(s)")
    for e in entries:
        exists = "" if Path(e.path).is_file() else "  [missing: run `easel packs make-loras`]"
        click.echo(f"  {e.name}  scale={e.scale}  tiers={','.join(e.applies_to)}  {e.path}{exists}")
    if tier is not None:
        click.echo(f"  triggers: {', '.join(style.stack.triggers) or '-'}")
        click.echo(f"  suffix:   {style.style_suffix() or '-'}")
