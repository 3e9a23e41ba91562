"""`easel serve`, `easel status`, `easel stop`: run the daemon and talk to it about itself.

Importing this module stays cheap: the daemon's model stack is imported inside `serve` only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import msgspec

from client.client import RenderClient, default_socket_path
from client.telemetry import setup_command_telemetry
from daemon.errors import EaselError

_socket_option = click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Daemon socket (default: $EASEL_SOCKET, else $XDG_RUNTIME_DIR/easel/easel.sock).",
)


def _fail(err: EaselError) -> None:
    click.echo(f"easel: {err.code}: {err.message}", err=True)
    sys.exit(1)


@click.command("serve")
@click.option("--preset", default="tiny", show_default=True, help="Model preset to keep loaded.")
@click.option("--model-path", default=None, help="Local weights of a real preset.")
@_socket_option
@click.option(
    "--lora-root",
    "lora_roots",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory LoRA paths must resolve into (repeatable; default $EASEL_LORA_ROOTS or the working dir).",
)
@click.option(
    "--output-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory outputs must be written into (default $EASEL_OUTPUT_ROOT or ./easel-output).",
)
@click.option("--queue-capacity", type=click.IntRange(1), default=64, show_default=True)
@click.option(
    "--interactive-reserve",
    type=click.IntRange(0),
    default=None,
    help="Queue slots batch jobs may not take, kept for interactive renders (default: a quarter of the queue).",
)
@click.option("--max-connections", type=click.IntRange(1), default=128, show_default=True)
@click.option("--drain-timeout", type=click.FloatRange(0), default=30.0, show_default=True, help="Seconds.")
@click.option("--max-frame", type=click.IntRange(1024), default=None, help="Largest accepted frame in bytes.")
@click.option("--max-size", type=click.IntRange(64), default=None, help="Largest width/height accepted.")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Most steps accepted.")
@click.option("--no-warmup", is_flag=True, help="Skip the warm-up render (ready sooner, first render slower).")
@click.option("--log-level", default="WARNING", show_default=True)
def serve_command(
    preset, model_path, socket_path, lora_roots, output_root, queue_capacity, interactive_reserve, max_connections,
    drain_timeout, max_frame, max_size, max_steps, no_warmup, log_level,
) -> None:  # fmt: skip
    """Run the render daemon in the foreground until SIGTERM/SIGINT or `easel stop`."""
    import dataclasses
    import logging

    from daemon.config import DaemonConfig
    from daemon.engine.request import Limits
    from daemon.server import run_daemon
    from daemon.telemetry import setup_telemetry

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    kwargs: dict = {"preset": preset, "model_path": model_path, "queue_capacity": queue_capacity}
    kwargs |= {"interactive_reserve": interactive_reserve, "max_connections": max_connections}
    kwargs["drain_timeout_s"] = drain_timeout
    kwargs["warmup"] = not no_warmup
    if socket_path is not None:
        kwargs["socket_path"] = socket_path
    if lora_roots:
        kwargs["lora_roots"] = tuple(lora_roots)
    if output_root is not None:
        kwargs["output_root"] = output_root
    if max_frame is not None:
        kwargs["max_frame"] = max_frame
    limits = Limits()
    if max_size is not None:
        limits = dataclasses.replace(limits, max_size=max_size, max_pixels=max_size * max_size)
    if max_steps is not None:
        limits = dataclasses.replace(limits, max_steps=max_steps)
    kwargs["limits"] = limits

    def announce(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    try:
        config = DaemonConfig(**kwargs)
    except ValueError as exc:  # options that are fine alone but not together (a reserve as big as the queue)
        raise click.UsageError(str(exc)) from None
    try:
        tel = setup_telemetry("easel-daemon")  # OTEL_* / EASEL_TRACES_FILE; flushed when the server stops
        rc = run_daemon(config, tel=tel, announce=announce)
    except EaselError as err:
        _fail(err)
    sys.exit(rc)


@click.command("status")
@_socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@click.option("--timeout", type=float, default=5.0, show_default=True)
def status_command(socket_path, as_json, timeout) -> None:
    """Show what the daemon is doing: preset, active stack, queue with estimates."""
    try:
        setup_command_telemetry()
        with RenderClient(socket_path, timeout=timeout) as c:
            st = c.status()
    except EaselError as err:
        _fail(err)
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(st), indent=2))
        return
    click.echo(f"easel {st.version} (protocol {st.protocol}) pid {st.pid} on {st.socket}")
    click.echo(f"preset {st.preset}  warm={st.warm}  uptime {st.uptime_s:.0f}s  renders {st.renders_done}")
    stack = ", ".join(f"{Path(s['path']).name}@{s['scale']:g}" for s in st.active_stack) or "(none)"
    click.echo(f"active stack: {stack}  (switches so far: {st.stack_switches})")
    if st.lora_cache:
        click.echo("lora cache: " + "  ".join(f"{k}={v}" for k, v in st.lora_cache.items()))
    if st.in_flight is not None:
        j = st.in_flight
        left = "?" if j.estimated_finish_s is None else f"{j.estimated_finish_s:.1f}s"
        click.echo(f"rendering {j.job} ({j.width}x{j.height}, step {j.step}/{j.steps}), about {left} left")
    reserve = f" ({st.interactive_reserve} kept for interactive)" if st.interactive_reserve else ""
    click.echo(
        f"queue {st.queue_depth}/{st.queue_capacity}{reserve}" + ("  (shutting down)" if st.shutting_down else "")
    )
    for j in st.queue:
        start = "?" if j.estimated_start_s is None else f"{j.estimated_start_s:.1f}s"
        finish = "?" if j.estimated_finish_s is None else f"{j.estimated_finish_s:.1f}s"
        stack = ",".join(j.stack) or "-"
        click.echo(
            f"  {j.job:>8} {j.priority:<11} {j.width}x{j.height}x{j.steps} [{stack}] start~{start} done~{finish}"
        )


@click.command("stop")
@_socket_option
@click.option("--drain-timeout", type=click.FloatRange(0), default=None, help="Override the daemon's drain timeout.")
@click.option("--wait", "wait_s", type=float, default=120.0, show_default=True, help="Seconds to wait for exit.")
def stop_command(socket_path, drain_timeout, wait_s) -> None:
    """Ask the daemon to drain and exit; wait until its socket is gone."""
    path = socket_path or default_socket_path()
    try:
        setup_command_telemetry()
        with RenderClient(path) as c:
            c.shutdown(drain_timeout)
    except EaselError as err:
        _fail(err)
    deadline = time.monotonic() + wait_s
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if path.exists():
        click.echo(f"easel: asked the daemon to stop, but {path} is still there after {wait_s}s", err=True)
        sys.exit(1)
    click.echo("easel: daemon stopped")


def register(group: click.Group) -> None:
    group.add_command(serve_command)
    group.add_command(status_command)
    group.add_command(stop_command)
