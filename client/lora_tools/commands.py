"""Click commands of the LoRA author tools, attached to the `easel lora` group by client/cli/lora.py.

`add_commands(group)` is the hook: it adds `remap`, `verify` and `grid` to whatever group it is given.
Heavy imports stay inside the commands so `easel --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from client.wire.errors import EaselError

_socket_option = click.option(
    "--socket", "socket_path", default=None, help="Daemon socket (default: $EASEL_SOCKET or the runtime dir)."
)


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


@click.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--prompt", default=None, help="Prompt of the gate renders.")
@click.option("--control-prompt", default=None, help="Prompt without the trigger (default: --prompt).")
@click.option("--trigger", default=None, help="The LoRA's trigger word (enables check 3).")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--tier", default=None, help="Render tier (its size/steps), e.g. portrait.")
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--steps", type=int, default=None)
@click.option("--scale", type=float, default=1.0, show_default=True, help="LoRA scale for the gate renders.")
@click.option(
    "--min-match",
    type=click.FloatRange(0, 1),
    default=0.8,
    show_default=True,
    help="Check 1: minimum fraction of keys that must reach the model.",
)
@click.option(
    "--max-ssim-lora",
    type=float,
    default=0.999,
    show_default=True,
    help="Check 2: SSIM(LoRA, no LoRA) must be below this.",
)
@click.option(
    "--max-ssim-trigger",
    type=float,
    default=0.97,
    show_default=True,
    help="Check 3: SSIM(trigger prompt, control prompt) must be below this.",
)
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the report and pictures go (default: ./verify-<file stem>).",
)
@click.option("--promote", is_flag=True, help="On pass, ship the file into --genre and record the verification.")
@click.option("--genre", default=None, help="Genre to promote into (required with --promote).")
@click.option("--name", default=None, help="Shipped name (default: the file's stem).")
@click.option(
    "--packs-root", type=click.Path(file_okay=False, path_type=Path), default=Path("genre_packs"), show_default=True
)
@click.option(
    "--lora-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="LoRA root the pack's file: paths are relative to (default: $EASEL_LORA_ROOT or --packs-root).",
)
@_socket_option
def verify(
    file: str,
    prompt: str | None,
    control_prompt: str | None,
    trigger: str | None,
    seed: int,
    tier: str | None,
    width: int | None,
    height: int | None,
    steps: int | None,
    scale: float,
    min_match: float,
    max_ssim_lora: float,
    max_ssim_trigger: float,
    report_dir: Path | None,
    promote: bool,
    genre: str | None,
    name: str | None,
    packs_root: Path,
    lora_root: Path | None,
    socket_path: str | None,
) -> None:
    """Gate FILE before it ships: key match, visible effect, trigger effect; exit 0 on pass, 1 on fail."""
    from client.client import RenderClient
    from client.lora_tools.promote import promote as do_promote
    from client.lora_tools.verify import DEFAULT_PROMPT, Thresholds, VerifyConfig, run_verification
    from client.telemetry.client_spans import setup_command_telemetry

    if promote and not genre:
        raise click.UsageError("--promote needs --genre")
    config = VerifyConfig(
        prompt=prompt or DEFAULT_PROMPT,
        control_prompt=control_prompt,
        trigger=trigger,
        seed=seed,
        tier=tier,
        width=width,
        height=height,
        steps=steps,
        scale=scale,
        thresholds=Thresholds(min_match, max_ssim_lora, max_ssim_trigger),
    )
    out_dir = report_dir or Path(f"verify-{Path(file).stem}")
    try:
        setup_command_telemetry()
        with RenderClient(socket_path) as client:
            result = run_verification(client, file, config, out_dir)
    except EaselError as exc:
        raise click.ClickException(exc.message) from exc
    for check in result.checks:
        click.echo(f"check {check.number} {check.name}: {check.verdict} — {check.detail}")
    click.echo(f"report: {out_dir / 'report.html'} ({out_dir / 'report.md'})")
    click.echo(f"{Path(file).name}: {'PASS' if result.passed else 'FAIL'}")
    if promote and result.passed:
        try:
            done = do_promote(result, genre=genre or "", packs_root=packs_root, name=name, lora_root=lora_root)
        except EaselError as exc:
            raise click.ClickException(exc.message) from exc
        click.echo(f"promoted to {done.shipped}; recorded in {done.manifest}")
    elif promote:
        click.echo("not promoted: the gate failed", err=True)
    sys.exit(0 if result.passed else 1)


@click.command("grid")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeat for more rows).")
@click.option(
    "--strengths",
    "strengths",
    multiple=True,
    default=("0.3 0.5 0.7 0.9 1.0",),
    show_default=True,
    help="LoRA scales, space- or comma-separated (repeatable).",
)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--tier", default=None)
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--steps", type=int, default=None)
@click.option("--baseline/--no-baseline", default=True, show_default=True, help="A first column without the LoRA.")
@click.option(
    "-o",
    "--out",
    "output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PNG to write (default: ./<file stem>-grid.png).",
)
@_socket_option
def grid(
    file: str,
    prompts: tuple[str, ...],
    strengths: tuple[str, ...],
    seed: int,
    tier: str | None,
    width: int | None,
    height: int | None,
    steps: int | None,
    baseline: bool,
    output: Path | None,
    socket_path: str | None,
) -> None:
    """Render FILE at several strengths over one or more prompts (fixed seed) as one labelled picture."""
    from client.client import RenderClient
    from client.lora_tools.grid import GridSpec, parse_strengths, render_grid, write_grid
    from client.lora_tools.verify import DEFAULT_PROMPT
    from client.telemetry.client_spans import setup_command_telemetry

    try:
        values = parse_strengths(strengths)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--strengths") from exc
    spec = GridSpec(
        prompts=prompts or (DEFAULT_PROMPT,),
        strengths=values,
        seed=seed,
        baseline=baseline,
        tier=tier,
        width=width,
        height=height,
        steps=steps,
    )
    target = output or Path(f"{Path(file).stem}-grid.png")
    try:
        setup_command_telemetry()
        with RenderClient(socket_path) as client:
            image = render_grid(client, file, spec, on_cell=lambda i, n: click.echo(f"  rendered {i}/{n}", err=True))
    except EaselError as exc:
        raise click.ClickException(exc.message) from exc
    write_grid(image, target)
    click.echo(f"{target}: {len(spec.prompts)} prompt(s) x {len(spec.columns)} column(s), {image.width}x{image.height}")


def add_commands(group: click.Group) -> None:
    """Attach every LoRA author command to `group` (the `easel lora` group)."""
    for command in (remap, verify, grid):
        group.add_command(command)
