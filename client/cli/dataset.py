"""`easel dataset check DIR` and `easel dataset jsonl DIR`: preflight a LoRA training set."""

from __future__ import annotations

import sys

import click

from client.cli.errors import EaselGroup, ExitStatus
from client.cli.options import ConfigDefault, json_option


@click.group("dataset", cls=EaselGroup)
def dataset_group() -> None:
    """Check a LoRA training set and write the train.jsonl mlx-examples expects."""


@dataset_group.command("check")
@click.argument("directory", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--min-images",
    type=click.IntRange(min=0),
    default=ConfigDefault(lambda: _dataset().DEFAULT_MIN_IMAGES),
    show_default=True,
    help="Minimum number of image/caption pairs (150 for style LoRAs).",
)
@click.option("--trigger", default=None, help="Style-LoRA caption purity: every caption must be exactly this.")
@click.option(
    "--min-side",
    type=click.IntRange(min=1),
    default=ConfigDefault(lambda: _dataset().DEFAULT_MIN_SIDE),
    show_default=True,
    help="Warn about images whose shorter side is below this many pixels.",
)
@json_option("Print the report as JSON.")
def check(directory: str, min_images: int, trigger: str | None, min_side: int, as_json: bool) -> None:
    """Report every problem of the dataset in DIRECTORY; exit 1 if any is blocking."""
    from client.dataset import check_dataset, render_report

    report = check_dataset(directory, min_images=min_images, trigger=trigger, min_side=min_side)
    click.echo(report.to_json() if as_json else render_report(report))
    sys.exit(ExitStatus.OK if report.ok else ExitStatus.FAILED)


@dataset_group.command("jsonl")
@click.argument("directory", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--out",
    "output",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="Where to write (default: DIRECTORY/train.jsonl).",
)
def jsonl(directory: str, output: str | None) -> None:
    """Write train.jsonl ({"image", "prompt"} per line) from the image/caption pairs in DIRECTORY."""
    from client.dataset import render_report, write_jsonl

    result = write_jsonl(directory, output)
    if not result.written:
        click.echo(render_report(result.report), err=True)
        raise click.ClickException(f"{result.path} not written: fix the errors above first")
    click.echo(f"{result.path}: {result.pairs} pairs")


def _dataset():
    import client.dataset

    return client.dataset


def register(group: click.Group) -> None:
    group.add_command(dataset_group)
