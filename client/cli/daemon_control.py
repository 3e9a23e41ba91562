"""`easel status`, `easel cancel`, `easel stop`: talk to the running daemon about itself and its jobs (`easel serve` is
the daemon's own command)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import msgspec

from client.cli.errors import EaselCommand
from client.cli.options import json_option, seconds, socket_option, timeout_option
from client.client import RenderClient, default_socket_path
from client.sizes import describe_byte_size
from client.telemetry.client_spans import setup_command_telemetry
from client.wire.errors import Timeout
from client.wire.messages import HeapStats, JobInfo, LoraCacheStats

STATUS_TIMEOUT_S = 5.0  # `easel status` answers quickly or says so: shorter than the library's default

__all__ = ["cancel_command", "register", "status_command", "stop_command"]


def heap_line(heap: HeapStats) -> str:
    """The daemon's malloc heap in words: what a leak would grow, apart from freed memory kept for reuse."""
    retain = heap.retain_bytes
    policy = f"up to {describe_byte_size(retain)} kept at its top" if retain else "malloc's defaults"
    return (
        f"heap: in use {describe_byte_size(heap.in_use_bytes)}, freed and kept for reuse "
        f"{describe_byte_size(heap.free_bytes)} ({policy})"
    )


def cache_line(name: str, stats: LoraCacheStats) -> str:
    """A bounded cache in words; `--json` keeps the exact counts for scripts."""
    return (
        f"{name}: {stats.entries} entries, {describe_byte_size(stats.bytes)} of {describe_byte_size(stats.max_bytes)}"
        f"  hits {stats.hits}  misses {stats.misses}  evictions {stats.evictions}"
    )


@click.command("status", cls=EaselCommand)
@socket_option
@json_option("Print the raw status as JSON.")
@timeout_option(STATUS_TIMEOUT_S, "Seconds to wait for the daemon's answer.")
def status_command(socket_path, as_json, timeout) -> None:
    """Show what the daemon is doing: preset, active stack, queue with estimates."""
    setup_command_telemetry()
    with RenderClient(socket_path, timeout=timeout) as c:
        st = c.status()
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(st), indent=2))
        return
    click.echo(f"easel {st.version} (protocol {st.protocol}) pid {st.pid} on {st.socket}")
    click.echo(f"preset {st.preset}  warm={st.warm}  uptime {st.uptime_s:.0f}s  renders {st.renders_done}")
    if st.model is not None:
        m = st.model
        bits = f"{m.quantization}-bit" if m.quantization else "not quantized"
        click.echo(
            f"model: {m.layout} checkpoint {m.source}  {bits}, {m.dtype} on {m.device}, "
            f"{describe_byte_size(m.resident_bytes)} resident, loaded in {m.load_s:.1f}s"
        )
    if st.output_root is not None:
        click.echo(f"writes into {st.output_root}  reads LoRAs from {', '.join(st.lora_roots) or '(nowhere)'}")
    if st.max_pixels is not None:
        side = math.isqrt(st.max_pixels) // 16 * 16
        click.echo(f"renders up to {st.max_pixels / 1e6:.2f} megapixels (e.g. {side}x{side})")
    stack = ", ".join(f"{Path(s.path).name}@{s.scale:g}" for s in st.active_stack) or "(none)"
    click.echo(f"active stack: {stack}  (switches so far: {st.stack_switches})")
    if st.lora_cache is not None:
        click.echo(cache_line("lora cache", st.lora_cache))
    if st.resident_stacks is not None:
        click.echo(cache_line("resident stacks", st.resident_stacks))
    if st.lowrank_form is not None:
        click.echo(f"low-rank form: {st.lowrank_form.replace('_', '-')}")
    if st.heap is not None:
        click.echo(heap_line(st.heap))
    if st.in_flight is not None:
        j = st.in_flight
        left = "?" if j.estimated_finish_s is None else f"{j.estimated_finish_s:.1f}s"
        click.echo(f"rendering {j.job} ({j.width}x{j.height}, step {j.step}/{j.steps}), about {left} left")
    for r in st.replicas:  # behind a cluster gateway
        j = r.in_flight
        job = "" if j is None else f"  rendering {j.job} step {j.step}/{j.steps}"
        steps = ", ".join(f"{t.width}x{t.height} {t.step_s:.2f}s/step" for t in r.step_times) or "no step time yet"
        click.echo(
            f"replica {r.replica} (pid {r.pid}, node {r.node}): stacks [{', '.join(r.stacks) or '-'}] "
            f"loads {r.stack_loads}  queue {r.queue_depth}  renders {r.renders_done}  {steps}{job}  "
            f"(reported {r.report_age_s:.0f}s ago)"
        )
        if r.heap is not None:
            click.echo(f"  {heap_line(r.heap)}")
    if st.gateway is not None:
        g = st.gateway
        click.echo(
            f"gateway: retries {g.retries}  cancels of replicas' renders: stopped {g.cancels_stopped}, "
            f"too late {g.cancels_too_late}, no word {g.cancels_no_word}"
        )
    reserve = f" ({st.interactive_reserve} kept for interactive)" if st.interactive_reserve else ""
    preloads = f"  preloads waiting {st.preloads_waiting}" if st.preloads_waiting else ""
    if st.preloads_yielded:
        preloads += f"  preload builds yielded to renders {st.preloads_yielded}"
    if st.preemptions:
        preloads += f"  batch renders preempted {st.preemptions}"
    click.echo(
        f"queue {st.queue_depth}/{st.queue_capacity}{reserve}{preloads}"
        + ("  (shutting down)" if st.shutting_down else "")
    )
    for j in st.queue:
        stack = ",".join(j.stack) or "-"
        click.echo(f"  {j.job:>8} {j.priority:<11} {j.width}x{j.height}x{j.steps} [{stack}] {_where(j)}")


def _where(j: JobInfo) -> str:
    """A listed job's progress: a gateway lists the renders its replicas run beside those still waiting."""
    if j.state == "running":
        left = "" if j.estimated_finish_s is None else f", done~{j.estimated_finish_s:.1f}s"
        return f"running, step {j.step or 0}/{j.steps}{left}"
    start = "?" if j.estimated_start_s is None else f"{j.estimated_start_s:.1f}s"
    finish = "?" if j.estimated_finish_s is None else f"{j.estimated_finish_s:.1f}s"
    return f"start~{start} done~{finish}"


CANCEL_OUTCOMES = {  # where a job was when its cancel arrived -> what became of it, in words
    "queued": "cancelled (it was queued)",
    "running": "cancelled (it stops at its next step)",
    "suspended": "cancelled (it was suspended behind an interactive render)",
    "cancelling": "already being cancelled",
    "done": "already answered",
    "unknown": "no such job",
}


@click.command("cancel", cls=EaselCommand)
@click.argument("jobs", nargs=-1, required=True, metavar="JOB...")
@socket_option
@json_option("Print the cancels' results as a JSON list.")
@timeout_option(STATUS_TIMEOUT_S, "Seconds to wait for each answer.")
def cancel_command(jobs, socket_path, as_json, timeout) -> None:
    """Cancel renders by the job ids `easel status` lists, whichever client sent them; fails if one is unknown."""
    setup_command_telemetry()
    with RenderClient(socket_path, timeout=timeout) as c:
        results = [c.cancel(job=job) for job in jobs]
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(results), indent=2))
    for r in [] if as_json else results:
        click.echo(f"{r.job}: {CANCEL_OUTCOMES[r.state]}")
    unknown = [r.job for r in results if r.state == "unknown"]
    if unknown:
        raise click.ClickException(f"no job {', '.join(map(repr, unknown))} on this daemon (`easel status` lists them)")


@click.command("stop", cls=EaselCommand)
@socket_option
@click.option("--drain-timeout", type=seconds(zero=True), default=None, help="Override the daemon's drain timeout.")
@click.option("--wait", "wait_s", type=seconds(), default=120.0, show_default=True, help="Seconds to wait for exit.")
def stop_command(socket_path, drain_timeout, wait_s) -> None:
    """Ask the daemon to drain and exit; wait until its socket is gone."""
    path = socket_path or default_socket_path()
    setup_command_telemetry()
    with RenderClient(path) as c:
        c.shutdown(drain_timeout)
    deadline = time.monotonic() + wait_s
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if path.exists():
        raise Timeout(f"asked the daemon to stop, but {path} is still there after {wait_s}s")
    click.echo("easel: daemon stopped")


def register(group: click.Group) -> None:
    group.add_command(status_command)
    group.add_command(cancel_command)
    group.add_command(stop_command)
