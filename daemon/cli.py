"""The commands that need the model stack: `easel serve`, and the renderer behind `easel render --in-process`.

They join the `easel` program through entry points declared in pyproject.toml (`easel.commands`,
`easel.renderers`), so the thin client's command line never imports the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import logging
import sys
import time
from pathlib import Path

import click

from client.cli.errors import fail
from client.cli.options import ByteSize, Finite, log_level_option, seconds, socket_option
from client.sizes import format_byte_size
from client.wire.errors import EaselError
from client.wire.messages import Render, check_render
from daemon.config import DaemonConfig, ServerConfig, ServiceConfig, default_of
from daemon.engine.presets import PRESETS
from daemon.render_spec import Limits
from daemon.scheduler import Policy


@click.command("serve")
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS), case_sensitive=False),
    default=default_of(ServiceConfig, "preset"),
    show_default=True,
    help="Model preset to keep loaded.",
)
@click.option(
    "--model-path",
    default=None,
    help="A checkpoint: a Hugging Face snapshot, an mflux-saved folder, or an easel-model.yaml (docs/models.md).",
)
@click.option(
    "--transformer",
    "transformer_path",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="A single-file transformer (BFL names, bf16/fp16/fp8) used with --model-path's other parts.",
)
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the weights at load.")
@click.option(
    "--force",
    "force_load",
    is_flag=True,
    help="Load even if the memory estimate says it will not fit, and accept every size up to --max-size.",
)
@socket_option
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
@click.option(
    "--queue-capacity", type=click.IntRange(1), default=default_of(ServiceConfig, "queue_capacity"), show_default=True
)
@click.option(
    "--interactive-reserve",
    type=click.IntRange(0),
    default=default_of(ServiceConfig, "interactive_reserve"),
    help="Queue slots batch jobs may not take, kept for interactive renders (default: a quarter of the queue).",
)
@click.option(
    "--max-connections", type=click.IntRange(1), default=default_of(ServerConfig, "max_connections"), show_default=True
)
@click.option(
    "--drain-timeout",
    type=seconds(zero=True),
    default=default_of(ServerConfig, "drain_timeout_s"),
    show_default=True,
    help="Seconds queued and running renders get on SIGTERM/SIGINT or `easel stop`; a second signal stops at once.",
)
@click.option(
    "--max-frame",
    type=ByteSize(1024),
    default=format_byte_size(default_of(ServerConfig, "max_frame")),  # shown as written; parsed by ByteSize
    show_default=True,
    help="Largest accepted frame (bytes, or with K/M/G: 16M).",
)
@click.option(
    "--max-size",
    type=click.IntRange(64),
    default=None,
    help=f"Largest width/height accepted (default {Limits.max_size}).",
)
@click.option(
    "--max-steps", type=click.IntRange(1), default=None, help=f"Most steps accepted (default {Limits.max_steps})."
)
@click.option(
    "--lora-cache-bytes",
    type=ByteSize(0),
    default=format_byte_size(default_of(ServiceConfig, "lora_cache_bytes")),
    show_default=True,
    help="Bound of the parsed-LoRA-file cache (bytes, or with K/M/G/T: 2GiB).",
)
@click.option(
    "--resident-stack-bytes",
    type=ByteSize(0),
    default=format_byte_size(default_of(ServiceConfig, "resident_stack_bytes")),
    show_default=True,
    help="Bound of the built LoRA stacks kept for instant switches back to them (bytes, or with K/M/G/T).",
)
@click.option(
    "--lowrank-form",
    type=click.Choice(["stacked", "per-file"]),
    default=default_of(ServiceConfig, "lowrank_form").replace("_", "-"),
    show_default=True,
    help="How a LoRA stack's low-rank terms run: stacked (one pair of products a layer: the cheapest step) "
    "or per-file (each file's blocks used where its read put them: a cold switch about half as long, "
    "each step about a point dearer on a CPU).",
)
@click.option(
    "--heap-retain-bytes",
    type=ByteSize(0),
    default=format_byte_size(default_of(ServiceConfig, "heap_retain_bytes")),
    show_default=True,
    help="Freed memory the daemon keeps for reuse, so a stack build does not fault fresh pages in "
    "(0: malloc's defaults).",
)
@click.option(
    "--lora-content-hash",
    is_flag=True,
    help="Identify LoRA files by a digest of their bytes too (for network filesystems with unreliable times).",
)
@click.option("--no-warmup", is_flag=True, help="Skip the warm-up render (ready sooner, first render slower).")
@click.option(
    "--no-preempt",
    is_flag=True,
    help="Let a running batch render finish before an interactive one starts (default: it yields at its next step).",
)
@click.option(
    "--max-preemptions",
    type=click.IntRange(0),
    default=default_of(ServiceConfig, "max_preemptions"),
    show_default=True,
    help="How many times one batch render may yield to interactive ones.",
)
@click.option(
    "--fair-slack",
    type=Finite(0),
    default=Policy().fair_slack,
    show_default=True,
    help="How many renders one client's batch work may get ahead of another's for fewer stack switches.",
)
@log_level_option
def serve_command(
    preset, model_path, transformer_path, quantize, force_load,
    socket_path, lora_roots, output_root, queue_capacity, interactive_reserve, max_connections,
    drain_timeout, max_frame, max_size, max_steps, lora_cache_bytes, resident_stack_bytes, lowrank_form,
    heap_retain_bytes, lora_content_hash, no_warmup, no_preempt, max_preemptions, fair_slack, log_level,
) -> None:  # fmt: skip
    """Run the render daemon in the foreground until SIGTERM/SIGINT or `easel stop`."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # A crash in native code (MLX, numpy, msgspec) then leaves every thread's Python stack on stderr:
    # the one record an operator has of what the daemon was doing when it died.
    with contextlib.suppress(ValueError, OSError):  # a stderr with no file descriptor (a test's capture)
        faulthandler.enable(all_threads=True)
    server: dict = {"max_connections": max_connections, "drain_timeout_s": drain_timeout, "max_frame": max_frame}
    if socket_path is not None:
        server["socket_path"] = socket_path
    service: dict = {"preset": preset, "model_path": model_path, "queue_capacity": queue_capacity}
    service |= {"transformer_path": transformer_path, "quantize": int(quantize) if quantize else None}
    service["force_load"] = force_load
    service |= {"interactive_reserve": interactive_reserve, "warmup": not no_warmup}
    service |= {"preempt": not no_preempt, "max_preemptions": max_preemptions}
    service["policy"] = dataclasses.replace(Policy(), fair_slack=fair_slack)
    service |= {
        "lora_cache_bytes": lora_cache_bytes,
        "resident_stack_bytes": resident_stack_bytes,
        "lowrank_form": lowrank_form.replace("-", "_"),
        "heap_retain_bytes": heap_retain_bytes,
        "lora_content_hash": lora_content_hash,
    }
    if lora_roots:
        service["lora_roots"] = tuple(lora_roots)
    if output_root is not None:
        service["output_root"] = output_root
    limits = Limits()
    if max_size is not None:
        limits = dataclasses.replace(limits, max_size=max_size, max_pixels=max_size * max_size)
    if max_steps is not None:
        limits = dataclasses.replace(limits, max_steps=max_steps)
    service["limits"] = limits

    def announce(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    try:
        config = DaemonConfig(server=ServerConfig(**server), service=ServiceConfig(**service))
    except ValueError as exc:  # options that are fine alone but not together (a reserve as big as the queue)
        raise click.UsageError(str(exc)) from None
    try:
        from daemon.startup import run_daemon
        from daemon.telemetry import setup_telemetry

        tel = setup_telemetry("easel-daemon")  # OTEL_* / EASEL_TRACES_FILE; flushed when the server stops
        rc = run_daemon(config, tel=tel, announce=announce)
    except EaselError as err:
        fail(err)
    sys.exit(rc)


def render_in_process(prompt, paths, scales, zero_match, output, fields, *, log=print):
    """The same request, rendered by this process through the daemon's own runner and engine (no socket):
    for comparison and debugging."""
    if output is None:  # the default file is this command's own: each run replaces it
        fields = {**fields, "overwrite": True}
    output = str(Path(output or "easel-render.png").resolve())  # in-process: relative to the working dir
    roots = tuple({str(Path(p).resolve().parent) for p in paths}) or (str(Path.cwd()),)
    config = ServiceConfig(
        preset=fields.get("preset") or default_of(ServiceConfig, "preset"),
        lora_roots=roots,
        output_root=Path(output).resolve().parent,
    )
    req = Render(
        id=0,
        prompt=prompt,
        lora_paths=list(paths),
        lora_scales=list(scales),
        zero_match=zero_match,
        output_path=output,
        **{k: v for k, v in fields.items() if v is not None},
    )
    check_render(req)
    from daemon.engine.presets import get_preset
    from daemon.runner import RenderRunner
    from daemon.service import RenderService, admit_render

    # what the daemon would refuse is refused before the model loads (minutes for a real preset)
    preset = get_preset(config.preset)
    admit_render(req, config, preset.name, preset.default_steps, preset.default_guidance)
    t0 = time.perf_counter()
    service = RenderService.load(config)
    log(f"model loaded in {time.perf_counter() - t0:.1f}s")

    async def render_once():
        runner = RenderRunner(service, config)
        try:
            return await runner.render(req)
        finally:
            await runner.close()

    try:
        return asyncio.run(render_once())
    finally:
        service.release_thread()  # this thread loaded the model
