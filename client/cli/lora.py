"""`easel lora ...`: inspect a LoRA file, and the author tools: remap, verify (and promote), grid.

The work is done in client.lorafile and client.lora_tools, imported inside each command so `easel --help`
stays fast; this module is only their command line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from client.cli.errors import EaselGroup, ExitStatus, failure
from client.cli.options import (
    SEED,
    ConfigDefault,
    Finite,
    json_option,
    lora_root_option,
    packs_option,
    size_options,
    socket_option,
    writable_png,
)
from client.wire.errors import LoraZeroMatch


@click.group("lora", cls=EaselGroup)
def lora() -> None:
    """LoRA files: inspect, remap, verify, strength grids."""


def register(group: click.Group) -> None:
    group.add_command(lora)


def _verify_config():
    from client.lora_tools.verify import VerifyConfig

    return VerifyConfig()


def _grid_defaults():
    from client.lora_tools.grid import GridSpec

    return GridSpec(prompts=())


@lora.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--preset", default=None, help="Resolve keys against this preset's layers (tiny, dev, schnell...).")
@click.option(
    "--daemon",
    "via_daemon",
    is_flag=True,
    help="Ask the running daemon: resolve against the model it has loaded (its LoRA roots apply).",
)
@socket_option
@json_option("Print the report as JSON.")
def inspect_command(file: str, preset: str | None, via_daemon: bool, socket_path: Path | None, as_json: bool) -> None:
    """Show FILE's LoRA format, rank, alpha and which keys reach the model (and why others do not)."""
    from client.lora_tools.inspect_cmd import format_report, inspect_via_daemon
    from client.lorafile.inspect import inspect_lora
    from client.lorafile.layout import PRESET_SHAPES, preset_model_layout

    if preset is not None and preset not in PRESET_SHAPES:
        raise click.BadParameter(f"unknown preset {preset!r}; known: {', '.join(PRESET_SHAPES)}", param_hint="--preset")
    if via_daemon and preset:
        raise click.UsageError("give --preset (resolve here) or --daemon (ask the daemon), not both")
    if via_daemon:
        report, preset = inspect_via_daemon(file, socket_path)
    else:
        report = inspect_lora(file, layout=preset_model_layout(preset) if preset else None)
    if as_json:
        out = report.to_dict()
        out["preset"] = preset
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(format_report(report))
    if report.resolved and report.keys_applied == 0:
        # the report on stdout is the result (keys_applied 0): the error goes to stderr only
        from client.lorafile.resolve import corrupt_error

        broken = corrupt_error(report)
        if broken is not None:
            raise failure(broken, as_json=False)
        why = f": {report.explanation}" if report.explanation else ""
        raise failure(LoraZeroMatch(f"{file} matches zero keys of the {preset} model{why}", path=file), as_json=False)


@lora.command("remap")
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

    summary = remap_file(source, output, keymap)
    click.echo(f"{summary.output}: {summary.line()} (keymap {summary.keymap_name} v{summary.keymap_version})")


@lora.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--prompt", default=None, help="Prompt of the gate renders.")
@click.option("--control-prompt", default=None, help="Prompt without the trigger (default: --prompt).")
@click.option("--trigger", default=None, help="The LoRA's trigger word (enables check 3).")
@click.option("--seed", type=SEED, default=ConfigDefault(lambda: _verify_config().seed), show_default=True)
@click.option("--tier", default=None, help="Render tier (its size/steps), e.g. portrait.")
@size_options
@click.option(
    "--scale",
    type=Finite(),
    default=ConfigDefault(lambda: _verify_config().scale),
    show_default=True,
    help="LoRA scale for the gate renders.",
)
@click.option(
    "--min-match",
    type=Finite(0, maximum=1),
    default=ConfigDefault(lambda: _verify_config().thresholds.min_match_ratio),
    show_default=True,
    help="Check 1: minimum fraction of keys that must reach the model.",
)
@click.option(
    "--max-ssim-lora",
    type=Finite(-1, maximum=1),
    default=ConfigDefault(lambda: _verify_config().thresholds.max_ssim_lora),
    show_default=True,
    help="Check 2: SSIM(LoRA, no LoRA) must be below this.",
)
@click.option(
    "--max-ssim-trigger",
    type=Finite(-1, maximum=1),
    default=ConfigDefault(lambda: _verify_config().thresholds.max_ssim_trigger),
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
@packs_option
@lora_root_option
@socket_option
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
    socket_path: Path | None,
) -> None:
    """Gate FILE before it ships: key match, visible effect, trigger effect; exit 0 on pass, 1 on fail."""
    from client.client import RenderClient
    from client.lora_tools.promote import promote as do_promote
    from client.lora_tools.verify import DEFAULT_PROMPT, Thresholds, VerifyConfig, run_verification
    from client.telemetry.client_spans import setup_command_telemetry

    if promote and not genre:
        raise click.UsageError("--promote needs --genre")
    if promote:  # where it would ship is checked before the gate's renders, not after them
        from client.packs import genre_dir, pack_name

        genre_dir(packs_root, genre or "")
        pack_name("name", name or Path(file).stem)
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
    setup_command_telemetry()
    with RenderClient(socket_path) as client:
        result = run_verification(client, file, config, out_dir)
    for check in result.checks:
        click.echo(f"check {check.number} {check.name}: {check.verdict} — {check.detail}")
    click.echo(f"report: {out_dir / 'report.html'} ({out_dir / 'report.md'})")
    click.echo(f"{Path(file).name}: {'PASS' if result.passed else 'FAIL'}")
    if promote and result.passed:
        done = do_promote(result, genre=genre or "", packs_root=packs_root, name=name, lora_root=lora_root)
        click.echo(f"promoted to {done.shipped}; recorded in {done.manifest}")
    elif promote:
        click.echo("not promoted: the gate failed", err=True)
    sys.exit(ExitStatus.OK if result.passed else ExitStatus.FAILED)


@lora.command("grid")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeat for more rows).")
@click.option(
    "--strengths",
    "strengths",
    type=str,
    multiple=True,
    default=ConfigDefault(lambda: (" ".join(map(str, _grid_defaults().strengths)),)),
    show_default=True,
    help="LoRA scales, space- or comma-separated (repeatable).",
)
@click.option("--seed", type=SEED, default=ConfigDefault(lambda: _grid_defaults().seed), show_default=True)
@click.option("--tier", default=None)
@size_options
@click.option(
    "--baseline/--no-baseline",
    default=ConfigDefault(lambda: _grid_defaults().baseline),
    show_default=True,
    help="A first column without the LoRA.",
)
@click.option(
    "-o",
    "--out",
    "output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    callback=lambda _ctx, _param, value: None if value is None else writable_png(value),
    help="PNG to write (default: ./<file stem>-grid.png).",
)
@socket_option
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
    socket_path: Path | None,
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
    setup_command_telemetry()
    with RenderClient(socket_path) as client:
        image = render_grid(client, file, spec, on_cell=lambda i, n: click.echo(f"  rendered {i}/{n}", err=True))
    write_grid(image, target)
    click.echo(f"{target}: {len(spec.prompts)} prompt(s) x {len(spec.columns)} column(s), {image.width}x{image.height}")
