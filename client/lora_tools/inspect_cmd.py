"""`easel lora inspect FILE [--preset P | --daemon] [--json]`: a LoRA file's format and key accounting, no render.

Without --preset it reads the file only (numpy, no MLX); with --preset it resolves every key against
that preset's layer layout (an mflux transformer built lazily: no weights are read), exactly as the
daemon would when applying it. With --daemon the running daemon does it (its `inspect` operation)
against the model it has loaded, under its own LoRA-root confinement.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from client.wire.errors import EaselError


def format_report(report) -> str:
    """The human-readable form of a FileReport."""
    lines = [f"{report.path}"]
    naming = f" (naming: {report.naming})" if report.naming and report.naming != report.format else ""
    lines.append(f"  format:   {report.format}{naming}")
    ranks = f" (ranks {', '.join(map(str, report.ranks))})" if len(report.ranks) > 1 else ""
    lines.append(f"  rank:     {report.rank if report.rank is not None else '-'}{ranks}")
    alpha = "none stored (factor 1)" if report.alpha is None else f"{report.alpha:g}"
    if len(report.alphas) > 1:
        alpha += f" (alphas {', '.join(f'{a:g}' for a in report.alphas)})"
    lines.append(f"  alpha:    {alpha}")
    lines.append(f"  size:     {report.nbytes / 1e6:.1f} MB of tensors")
    if report.resolved:
        lines.append(f"  keys:     {report.keys_applied}/{report.keys_total} applied")
        lines.append(f"  layers:   {report.layers_patched} patched")
        if report.fused_styles:
            styles = ", ".join(f"{k} {v}" for k, v in sorted(report.fused_styles.items()))
            lines.append(f"  modules:  {styles}")
    else:
        lines.append(f"  keys:     {report.keys_total} (not resolved: pass --preset to match against a model)")
    if report.leftover:
        lines.append(f"  leftover: {len(report.leftover)} key(s)")
        by_reason = Counter(reason for _, reason in report.leftover)
        for reason, count in by_reason.most_common():
            example = next(k for k, r in report.leftover if r == reason)
            lines.append(f"    {count:4d} x {reason}")
            lines.append(f"           e.g. {example}")
    return "\n".join(lines)


def _inspect_via_daemon(file: str, socket_path: Path | None):
    from client.client import RenderClient

    local = Path(file).expanduser()
    with RenderClient(socket_path) as c:
        model = c.status().preset
        return c.inspect(str(local.resolve()) if local.exists() else file), model


@click.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--preset", default=None, help="Resolve keys against this preset's layers (tiny, dev, schnell...).")
@click.option(
    "--daemon",
    "via_daemon",
    is_flag=True,
    help="Ask the running daemon: resolve against the model it has loaded (its LoRA roots apply).",
)
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_command(file: str, preset: str | None, via_daemon: bool, socket_path: Path | None, as_json: bool) -> None:
    """Show FILE's LoRA format, rank, alpha and which keys reach the model (and why others do not)."""
    from client.lorafile.inspect import inspect_lora
    from client.lorafile.layout import PRESET_SHAPES, preset_layout

    if preset is not None and preset not in PRESET_SHAPES:
        raise click.BadParameter(f"unknown preset {preset!r}; known: {', '.join(PRESET_SHAPES)}", param_hint="--preset")
    if via_daemon and preset:
        raise click.UsageError("give --preset (resolve here) or --daemon (ask the daemon), not both")
    try:
        if via_daemon:
            report, preset = _inspect_via_daemon(file, socket_path)
        else:
            layout = preset_layout(preset) if preset else None
            report = inspect_lora(file, layout=layout)
    except EaselError as exc:
        if as_json:
            click.echo(json.dumps({"error": exc.to_wire()}, indent=2))
        raise click.ClickException(f"{exc.code}: {exc.message}") from exc
    if as_json:
        out = report.to_dict()
        out["preset"] = preset
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(format_report(report))
    if report.resolved and report.keys_applied == 0:
        raise click.ClickException(f"{file} matches zero keys of the {preset} model")
