"""`easel traces tail`: follow renders live, from the daemon's span file or as an OTLP/HTTP receiver."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import click

from client import env
from client.cli.errors import EaselGroup
from client.cli.options import json_option


def stop_on_signal(stop: threading.Event) -> Callable[[int, FrameType | None], None]:
    """A SIGTERM/SIGINT handler that sets `stop` from a fresh thread.

    Handlers run on the main thread between bytecodes, possibly while that thread holds the event's own
    lock inside `stop.wait()`; `stop.set()` called there would wait on it forever and the tail would
    ignore the signal. A thread of its own just waits its turn.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=stop.set, name="easel-stop", daemon=True).start()

    return handler


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint="--listen")
    return host.strip("[]") or "127.0.0.1", int(port)


@click.group("traces", cls=EaselGroup)
def traces() -> None:
    """Look at what the renderer is doing, span by span."""


@traces.command("tail")
@click.option(
    "--file",
    "file_",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Span file to follow [default: ${env.TRACES_FILE.name}, else ~/.local/state/easel/traces.jsonl].",
)
@click.option("--listen", metavar="HOST:PORT", help="Receive OTLP/HTTP instead (e.g. 127.0.0.1:4318; port 0 = any).")
@json_option("Print every span as one JSON line (for scripts).")
@click.option("--from-start", is_flag=True, help="Start at the beginning of the span file, not its end.")
@click.option("--no-follow", is_flag=True, help="Print what the span file holds and exit.")
@click.option("--color/--no-color", default=None, help="Colour the status (default: only on a terminal).")
def tail(
    file_: Path | None, listen: str | None, as_json: bool, from_start: bool, no_follow: bool, color: bool | None
) -> None:
    """Follow renders live: one line per render with time, status, tier, model, stack as
    name:applied/total, phase durations and total time, and one per render refused before it rendered."""
    from client.traces import TailLines, follow_file
    from client.traces import listen as listen_otlp

    stop = threading.Event()
    if listen or not no_follow:  # a clean stop on Ctrl-C / SIGTERM (closes the receiver, no traceback)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop_on_signal(stop))

    if listen:
        if file_ or from_start or no_follow:
            raise click.UsageError("--listen receives spans; --file/--from-start/--no-follow are for the span file")
        host, port = _parse_listen(listen)

        try:
            (h, p), records = listen_otlp(host, port, stop)
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        click.echo(f"easel traces: listening for OTLP/HTTP on http://{h}:{p}/v1/traces", err=True)
    else:
        from client.telemetry.config import default_traces_file

        path = file_ or default_traces_file()
        if no_follow and not path.exists():
            raise click.ClickException(f"no span file at {path} (set {env.TRACES_FILE.name} on the daemon)")
        waiting = "" if no_follow or path.exists() else " (not there yet: waiting for the daemon to write it)"
        records = follow_file(path, from_start=from_start or no_follow, follow=not no_follow, stop=stop)
        click.echo(f"easel traces: {'reading' if no_follow else 'following'} {path}{waiting}", err=True)

    lines = TailLines()
    for rec in records:
        if as_json:
            click.echo(json.dumps(rec, separators=(",", ":")))
        elif (line := lines.line(rec)) is not None:
            click.echo(line, color=color)


def register(group: click.Group) -> None:
    group.add_command(traces)
