"""`easel batch poi|portrait|creature --genre G --world W`: pre-render a world's content through the daemon."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from client import env
from client.cli.errors import EaselGroup, ExitStatus
from client.cli.options import (
    Finite,
    lora_root_option,
    option,
    packs_option,
    size_options,
    socket_option,
    timeout_option,
)
from client.client import DEFAULT_RENDER_TIMEOUT_S

STATUS_TIMEOUT_S = 5.0  # asking the daemon where its output root is


def default_out() -> Path:
    """Inside the daemon's default output root (`$EASEL_OUTPUT_ROOT`, else ./easel-output), which is the
    only place a daemon started with defaults will write to."""
    return env.OUTPUT_ROOT.get() / "batch"


def daemon_out(socket_path: str | None) -> Path:
    """`batch` inside the output root the daemon at `socket_path` reports, the one folder it writes to
    (`easel serve --output-root`); `default_out()` when no daemon answers or it reports none (a cluster
    gateway whose replicas write to different places), so a dry run needs no daemon and an unreachable one
    is reported by the run itself."""
    from client.client import RenderClient
    from client.wire.errors import EaselError

    try:
        with RenderClient(socket_path, timeout=STATUS_TIMEOUT_S) as client:
            root = client.status().output_root
    except EaselError:
        return default_out()
    return default_out() if root is None else Path(root) / "batch"


def register(group: click.Group) -> None:
    group.add_command(batch)


@click.group(cls=EaselGroup)
def batch() -> None:
    """Batch renders of a genre pack's POIs, portraits and creatures (resumable, shardable)."""


def _options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--genre", required=True, help="Genre pack name (a directory under --packs)."),
        click.option("--world", required=True, help="World of the genre (a directory under <genre>/worlds)."),
        packs_option,
        option(
            "--out",
            "out_root",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Outputs go to OUT/<genre>/<world>/<kind>/ [default: batch/ in the output root the daemon "
            f"reports, else ${env.OUTPUT_ROOT.name}/batch, else ./easel-output/batch]; must lie inside the "
            "daemon's output root.",
        ),
        lora_root_option,
        click.option("--tier", default=None, help="Render tier [default: landscape/portrait/scene by kind]."),
        click.option(
            "--shard", default=None, metavar="I/N", callback=_shard, help="Render only share I of N (1-based)."
        ),
        click.option(
            "--seed",
            "base_seed",
            type=int,
            default=0,
            show_default=True,
            help="Base of the per-item seeds (each item's seed is derived from it and the item).",
        ),
        size_options,
        click.option("--guidance", type=Finite(), default=None, help="Guidance strength [default: the tier's]."),
        click.option("--preset", default=None, help="Model preset [default: the tier's, else the pack's]."),
        click.option("--limit", type=click.IntRange(0), default=None, help="Only the first N items (before sharding)."),
        click.option("--dry-run", is_flag=True, help="Print prompts and stacks; render nothing."),
        click.option("--no-resume", is_flag=True, help="Render items again even if already done."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
        socket_option,
        timeout_option(DEFAULT_RENDER_TIMEOUT_S, "Seconds to wait for one render, time in the queue included."),
        click.option(
            "--cluster",
            "cluster",
            default=None,
            metavar="ADDRESS",
            help="Render on a Ray cluster's replicas (`easel cluster up`) instead of through a daemon's socket; "
            "needs easel[cluster].",
        ),
        click.option(
            "--workers",
            type=click.IntRange(1),
            default=None,
            help="Renders kept in flight [default: 4 with --cluster, else 1]. Through a cluster gateway's socket, "
            "more than 1 keeps several replicas busy (each render on a connection of its own); a daemon renders "
            "them one at a time. Items of one LoRA stack go together.",
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _shard(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, int]:
    """`--shard i/n` checked as the command line is read: a bad one is a usage error."""
    from client.batch import parse_shard
    from client.wire.errors import InvalidRequest

    try:
        return parse_shard(value)
    except InvalidRequest as exc:
        raise click.BadParameter(exc.message) from None


def _run(kind: str, **kw: Any) -> None:
    from client.batch import describe_plan, plan_batch, run_batch, summary_lines

    out_root = kw["out_root"]
    if out_root is None:
        out_root = default_out() if kw["cluster"] is not None else daemon_out(kw["socket_path"])
    plan = plan_batch(
        kw["packs_root"], kw["genre"], kw["world"], kind, out_root,
        tier=kw["tier"], shard=kw["shard"], base_seed=kw["base_seed"],
        width=kw["width"], height=kw["height"], steps=kw["steps"], guidance=kw["guidance"],
        preset=kw["preset"], limit=kw["limit"], lora_root=kw["lora_root"],
    )  # fmt: skip
    if kw["dry_run"]:
        click.echo(describe_plan(plan))
        return
    from client.client import RenderClient, RenderClientPool
    from client.contact_sheet import write_contact_sheet
    from client.telemetry.client_spans import setup_command_telemetry

    setup_command_telemetry()
    opts = {"resume": not kw["no_resume"], "progress": not kw["no_progress"]}
    if kw["cluster"] is not None:
        renderer = _cluster_renderer(kw["cluster"])
        try:
            result = run_batch(plan, renderer, workers=kw["workers"] or 4, **opts)
        finally:
            renderer.close()
    elif (kw["workers"] or 1) > 1:
        with RenderClientPool(kw["socket_path"], render_timeout=kw["timeout"]) as pool:
            result = run_batch(plan, pool, workers=kw["workers"], **opts)
    else:
        with RenderClient(kw["socket_path"], render_timeout=kw["timeout"]) as client:
            result = run_batch(plan, client, **opts)
    result.contact_sheet_path = write_contact_sheet(result)
    for line in summary_lines(result):
        click.echo(line)
    if not result.ok:
        sys.exit(ExitStatus.FAILED)


def _cluster_renderer(address: str) -> Any:
    """The cluster's Renderer, from the daemon side through the `easel.renderers` entry point (the thin
    client never imports Ray or the daemon)."""
    from importlib.metadata import entry_points

    from client.wire.errors import EaselError

    found = entry_points(group="easel.renderers", name="cluster")
    if not found:
        raise EaselError("--cluster needs Ray Serve and the model stack: install easel[daemon,cluster]")
    return next(iter(found)).load()(address)


def _kind_command(kind: str, help_text: str) -> click.Command:
    @_options
    def command(**kw: Any) -> None:
        _run(kind, **kw)

    return batch.command(name=kind, help=help_text)(command)


_kind_command("poi", "Render a world's points of interest (tier landscape by default).")
_kind_command("portrait", "Render a world's portraits (tier portrait by default).")
_kind_command("creature", "Render a world's creatures (tier scene by default).")
