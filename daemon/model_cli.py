"""`easel model`: look at a checkpoint before loading it, save it quantized, write the miniature checkpoint.

Joins the `easel` program through the `easel.commands` entry point, like `easel serve`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from client.cli.errors import EaselCommand, EaselGroup
from client.cli.options import json_option
from client.sizes import describe_byte_size
from daemon.engine.presets import PRESETS


@click.group("model", cls=EaselGroup)
def model_group() -> None:
    """Checkpoints: inspect one (no weights read), save one quantized, write the miniature one."""


def _source(path: str, transformer: str | None):
    from daemon.engine.checkpoint.source import resolve_source

    return resolve_source(Path(path), transformer_file=Path(transformer) if transformer else None)


def _config(preset: str):
    from mflux.models.common.config.model_config import ModelConfig

    from daemon.engine.presets import get_preset

    return getattr(ModelConfig, get_preset(preset).mflux_config)()


_preset = click.option(
    "--preset",
    type=click.Choice(list(PRESETS), case_sensitive=False),
    default="dev",
    show_default=True,
    help="The preset whose model this is.",
)
_transformer = click.option(
    "--transformer", type=click.Path(dir_okay=False, exists=True), default=None, help="A single-file transformer."
)
_quantize = click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize to this many bits.")


@model_group.command("info", cls=EaselCommand)
@click.argument("path", type=click.Path(exists=True))
@_preset
@_transformer
@_quantize
@json_option()
def info_command(path: str, preset: str, transformer: str | None, quantize: str | None, as_json: bool) -> None:
    """What PATH is, what loading it would hold in memory, and whether it fits: headers only, no weights read."""
    import daemon.engine  # noqa: F401  (BLAS before MLX)
    from daemon.config import ServiceConfig
    from daemon.engine.checkpoint.estimate import Beside
    from daemon.engine.checkpoint.load import plan_load
    from daemon.engine.presets import get_preset

    serve = ServiceConfig()  # what `easel serve` keeps beside the weights by default
    beside = Beside(serve.held_bytes, get_preset(preset).text_tokens, serve.limits.min_size)
    plan = plan_load(
        _source(path, transformer), _config(preset), quantize=int(quantize) if quantize else None, beside=beside
    )
    summary = plan.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    stored = summary["stored_quantization"]
    kept = f", stored {stored}-bit quantized" if stored else ""
    click.echo(
        f"{summary['source']}: {summary['layout']} layout, {describe_byte_size(summary['stored_bytes'])} on disk{kept}"
    )
    for part, p in summary["parts"].items():
        depth = f" depth {p['depth']}" if p["depth"] else ""
        click.echo(f"  {part:<11} {p['naming']:<5} {','.join(p['stored_dtypes']):<12} {len(p['files'])} file(s){depth}")
    by = summary["resident_bytes_by_quantization"]
    if stored:  # it loads at its stored bits: there is no other choice to show
        weights = f"resident {describe_byte_size(by[str(stored)])}"
    else:
        weights = (
            f"resident as {summary['dtype']}: {describe_byte_size(by['None'])}; 8-bit {describe_byte_size(by['8'])}; "
            f"4-bit {describe_byte_size(by['4'])}"
        )
    click.echo(
        f"{weights}; beside them `easel serve` keeps {describe_byte_size(summary['held_bytes'])} for its LoRA caches "
        f"by default and {describe_byte_size(summary['render_bytes'])} for its smallest render"
    )
    verdict = "fits" if summary["fits"] else "does NOT fit"
    largest = summary["largest_pixels"]  # None on a CUDA GPU, where renders are not checked against memory
    sizes = f", renders up to {largest / 1e6:.2f} megapixels" if summary["fits"] and largest is not None else ""
    click.echo(
        f"this load ({_bits(summary['quantization'])}) needs {describe_byte_size(summary['needed_bytes'])}; "
        f"{describe_byte_size(summary['available_bytes'])} available: {verdict}{sizes}"
    )


def _bits(bits: int | None) -> str:
    return f"{bits}-bit quantized" if bits else "not quantized"


@model_group.command("save", cls=EaselCommand)
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@_preset
@_transformer
@_quantize
@click.option("--force", is_flag=True, help="Load even if the memory estimate says it will not fit.")
def save_command(src: str, dst: str, preset: str, transformer: str | None, quantize: str | None, force: bool) -> None:
    """Load SRC (any layout) and write it to DST as an mflux-saved folder, quantized with --quantize."""
    import daemon.engine  # noqa: F401
    from daemon.engine.checkpoint.load import load_checkpoint
    from daemon.engine.checkpoint.save import save_checkpoint
    from daemon.engine.checkpoint.staging import StagedFolder

    t0 = time.perf_counter()
    target = StagedFolder(Path(dst).resolve())  # a destination that cannot be written fails before the load
    try:
        loaded = load_checkpoint(
            _source(src, transformer), _config(preset), quantize=int(quantize) if quantize else None, force=force
        )
    except BaseException:
        target.discard()
        raise
    t1 = time.perf_counter()
    out = save_checkpoint(loaded, target)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    click.echo(
        f"{out}: mflux layout, {_bits(loaded.bits)}, {describe_byte_size(size)} "
        f"(loaded in {t1 - t0:.1f}s, written in {time.perf_counter() - t1:.1f}s)"
    )


@model_group.command("make-mini", cls=EaselCommand)
@click.argument("dst", type=click.Path())
@click.option("--layout", type=click.Choice(["hf", "mflux", "single-file"]), default="hf", show_default=True)
@_quantize
@click.option("--fp8", is_flag=True, help="single-file layout: store the transformer as fp8 e4m3.")
def make_mini_command(dst: str, layout: str, quantize: str | None, fp8: bool) -> None:
    """Write the miniature checkpoint (FLUX.1-dev's files at 1 + 1 blocks, random weights) to DST."""
    import daemon.engine  # noqa: F401
    from daemon.engine.checkpoint.mini import write_mini

    t0 = time.perf_counter()
    out = write_mini(
        Path(dst),
        layout=layout,  # type: ignore[arg-type]
        quantize=int(quantize) if quantize else None,
        transformer_dtype="fp8" if fp8 else "bf16",
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    click.echo(f"{out}: {layout} layout, {describe_byte_size(size)}, written in {time.perf_counter() - t0:.1f}s")
