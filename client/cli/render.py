"""`easel render`: one picture through the running daemon (or `--in-process`, straight through the engine)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import msgspec

from client.cli.errors import EaselCommand
from client.cli.options import SEED, Finite, json_option, seconds, size_options, socket_option, timeout_option
from client.client import DEFAULT_RENDER_TIMEOUT_S, RenderClient
from client.telemetry.client_spans import setup_command_telemetry
from client.wire.errors import EaselError


def parse_lora(spec: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (absolute path if it exists here, scale; default 1.0)."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:  # a path with a colon in it, unless it reads as a file and a mistyped scale
            if head.endswith(".safetensors") and not Path(spec).expanduser().exists():
                raise click.BadParameter(
                    f"{spec!r}: the scale after ':' must be a number, got {tail!r}", param_hint="--lora"
                ) from None
    p = Path(path).expanduser()
    return (str(p.resolve()) if p.exists() else path), scale


def choice_option(name: str, choices: list[str], help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An option taking one of `choices`, the first by default."""
    return click.option(name, type=click.Choice(choices), default=choices[0], show_default=True, help=help_text)


@click.command("render", cls=EaselCommand)
@click.argument("prompt")
@socket_option
@click.option("--tier", default=None, help="Render tier giving default size/steps/guidance.")
@size_options
@click.option("--guidance", type=Finite(), default=None, help="Guidance strength [default: the tier's].")
@click.option(
    "--seed",
    type=SEED,
    default=None,
    help="Noise seed; the same seed and settings give the same image [default: the daemon picks one].",
)
@click.option("--preset", default=None, help="Must match the daemon's preset (default: the daemon's).")
@click.option("--lora", "loras", multiple=True, help="PATH[:SCALE], repeatable, in stack order.")
@choice_option("--zero-match", ["error", "warn"], "A LoRA matching no key of the model: refuse, or render and warn.")
@choice_option("--priority", ["interactive", "batch"], "Interactive renders go first (a batch one may pause for them).")
@click.option("--deadline", type=seconds(), default=None, help="Seconds after which the daemon abandons the job.")
@click.option("-o", "--output", default=None, help="Output PNG; relative paths are inside the daemon's output root.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file at --output (without it: output_exists).")
@timeout_option(DEFAULT_RENDER_TIMEOUT_S, "Seconds to wait for the render, time in the queue included.")
@click.option("--in-process", is_flag=True, help="Load the model here and render without a daemon.")
@json_option()
@click.option("--quiet", is_flag=True, help="No progress line.")
def render_command(
    prompt, socket_path, tier, width, height, steps, guidance, seed, preset, loras, zero_match, priority,
    deadline, output, overwrite, timeout, in_process, as_json, quiet,
) -> None:  # fmt: skip
    """Render PROMPT and print where the PNG went and what the LoRA stack matched."""
    stack = [parse_lora(s) for s in loras]
    paths, scales = [p for p, _ in stack], [s for _, s in stack]
    fields = dict(tier=tier, width=width, height=height, steps=steps, guidance=guidance, seed=seed, preset=preset,
                  overwrite=overwrite or None)  # fmt: skip
    if in_process:
        result = _render_in_process(prompt, paths, scales, zero_match, output, fields)
    else:
        live = not quiet and sys.stderr.isatty()  # a log file gets no carriage-return redraws

        def progress(ev) -> None:
            if live and ev.event == "progress":
                click.echo(f"\rstep {ev.step}/{ev.steps}", nl=False, err=True)

        setup_command_telemetry()
        with RenderClient(socket_path, render_timeout=timeout) as c:
            result = c.send_render(
                prompt,
                lora_paths=paths,
                lora_scales=scales,
                zero_match=zero_match,
                priority=priority,
                deadline_s=deadline,
                output_path=output,
                on_progress=progress if live else None,
                **fields,
            )
        if live:
            click.echo("", err=True)
    data = msgspec.to_builtins(result)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{result.image_path}  {result.width}x{result.height} seed {result.seed} steps {result.steps}")
    for f in result.stack:
        click.echo(f"  {f.name or Path(f.path).name} @ {f.scale:g}: {f.keys_applied}/{f.keys_total} keys, "
                   f"{f.layers_patched} layers ({f.format})")  # fmt: skip
    click.echo("  " + "  ".join(f"{k}={v:.2f}s" for k, v in result.timings.items()))


def _render_in_process(prompt, paths, scales, zero_match, output, fields):
    """The same request rendered by this process through the engine: provided by the daemon package,
    found through the `easel.renderers` entry point so the thin client never imports it."""
    from importlib.metadata import entry_points

    found = entry_points(group="easel.renderers", name="in-process")
    if not found:
        raise EaselError("--in-process needs the model stack: install easel with its daemon extra (easel[daemon])")
    render_in_process = next(iter(found)).load()
    return render_in_process(prompt, paths, scales, zero_match, output, fields, log=lambda s: click.echo(s, err=True))


def register(group: click.Group) -> None:
    group.add_command(render_command)
