"""`easel packs ...`: genre pack tools (list what a pack resolves to, generate the example LoRA files,
preload a genre's stacks into the daemon)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from client.cli.errors import EaselGroup, ExitStatus
from client.cli.options import json_option, lora_root_option, packs_option, socket_option, timeout_option
from client.client import DEFAULT_RENDER_TIMEOUT_S
from client.wire.errors import LoraError, PathNotAllowed


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
    from client.packs import genre_dir, load_visual_style

    style = load_visual_style(genre_dir(packs_root, genre), world, tier=tier, lora_root=lora_root, check_files=False)
    entries = style.stack.active
    click.echo(f"{genre}/{world or '-'} tier={tier or 'any'}: {len(entries)} LoRA(s)")
    for e in entries:
        exists = "" if Path(e.path).is_file() else "  [missing: run `easel packs make-loras`]"
        click.echo(f"  {e.name}  scale={e.scale}  tiers={','.join(e.applies_to)}  {e.path}{exists}")
    if tier is not None:
        click.echo(f"  triggers: {', '.join(style.stack.triggers) or '-'}")
        click.echo(f"  suffix:   {style.style_suffix() or '-'}")


@packs.command("preload")
@packs_option
@click.option("--genre", required=True)
@click.option("--world", "worlds", multiple=True, help="A world of the genre, repeatable [default: every world].")
@click.option("--tier", "tiers", multiple=True, help="A render tier, repeatable [default: every tier].")
@lora_root_option
@socket_option
@timeout_option(DEFAULT_RENDER_TIMEOUT_S, "Seconds to wait for each stack, its wait for an idle daemon included.")
@json_option()
def preload(
    packs_root: Path,
    genre: str,
    worlds: tuple[str, ...],
    tiers: tuple[str, ...],
    lora_root: Path | None,
    socket_path: Path | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Build the LoRA stacks a genre's worlds render with into the daemon's resident stacks, so the first
    render of each switches to its stack at once (each distinct stack once; renders go first). A stack
    whose LoRA fails is reported and the others still go; the exit status is then 1."""
    import msgspec

    from client.client import RenderClient
    from client.packs import genre_dir, load_visual_style, world_names
    from client.tiers import TIERS

    gdir = genre_dir(packs_root, genre)
    for tier in tiers:
        if tier not in TIERS:
            raise click.BadParameter(f"unknown tier {tier!r}; known tiers: {', '.join(TIERS)}", param_hint="--tier")
    stacks: dict[tuple, tuple[list[str], list[str]]] = {}  # (paths, scales) -> (names, world/tier pairs using it)
    for world in worlds or world_names(gdir) or [None]:
        style = load_visual_style(gdir, world, lora_root=lora_root)
        for tier in tiers or TIERS:
            active = style.stack.for_tier(tier).active
            if not active:
                continue
            key = (tuple(e.path for e in active), tuple(e.scale for e in active))
            stacks.setdefault(key, ([e.name for e in active], []))[1].append(f"{world or '-'}/{tier}")
    results: list[dict] = []
    with RenderClient(socket_path, render_timeout=timeout) as c:
        for (paths, scales), (names, uses) in stacks.items():
            try:
                r = c.preload(list(paths), list(scales), lora_names=names)
            except (LoraError, PathNotAllowed) as err:  # this stack's own fault: the others still go
                failure = err.to_wire()
                results.append({"uses": uses, "error": failure})
                if not as_json:  # an item of the report, as `easel batch` lists a failed item
                    click.echo(f"{'FAILED':>9}  [{failure['code']}] {failure['message']}  ({', '.join(uses)})")
                continue
            results.append({"uses": uses, **msgspec.to_builtins(r)})
            if not as_json:
                state = "built" if r.built else ("live" if r.live else "resident")
                if not r.resident:
                    state = "not kept"
                keys = ", ".join(f"{f.name or Path(f.path).name} {f.keys_applied}/{f.keys_total}" for f in r.stack)
                click.echo(f"{state:>9}  {r.bytes / 2**20:8.1f} MiB  {r.build_ms:8.1f} ms  {keys}  ({', '.join(uses)})")
                if r.reason:
                    click.echo(f"           {r.reason}")
    failed = sum("error" in r for r in results)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        click.echo(f"{len(results)} stack(s): {sum(r.get('built', False) for r in results)} built, "
                   f"{sum(r.get('resident', False) for r in results)} resident, {failed} failed")  # fmt: skip
    if failed:
        sys.exit(ExitStatus.FAILED)
