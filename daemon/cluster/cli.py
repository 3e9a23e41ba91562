"""`easel gateway`, `easel cluster up|down`, and the `cluster` renderer behind `easel batch --cluster`.

They join the `easel` program through entry points (pyproject.toml), like `easel serve`: the thin
client never imports Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from client import env
from client.cli.errors import EaselGroup, fail
from client.cli.options import ByteSize, Finite, log_level_option, seconds, socket_option
from client.wire.errors import ClusterUnavailable, EaselError
from daemon.config import ServerConfig, ServiceConfig, default_of
from daemon.engine.presets import PRESETS

log = logging.getLogger("easel.cluster.cli")

ADDRESS_HELP = 'The Ray cluster: "auto" (a cluster started on this machine), host:6379, or ray://host:10001.'


def _service_config(**kw: Any) -> ServiceConfig:
    settings = {k: v for k, v in kw.items() if v not in (None, ())}
    if "lora_roots" in settings:
        settings["lora_roots"] = tuple(settings["lora_roots"])
    try:
        return ServiceConfig(**settings)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _lora_roots_option(default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--lora-roots",
        "lora_roots",
        multiple=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory LoRA paths must resolve into (repeatable; the same path on every machine) "
        f"[default: {default}].",
    )


_lora_roots = _lora_roots_option("$EASEL_LORA_ROOTS, else the working directory")


@click.command("gateway")
@click.option("--cluster", "address", required=True, help=ADDRESS_HELP)
@socket_option
@_lora_roots_option("$EASEL_LORA_ROOTS, else the roots the replicas were deployed with")
@click.option(
    "--queue-capacity",
    type=click.IntRange(1),
    default=default_of(ServiceConfig, "queue_capacity") * 4,
    show_default=True,
    help="Renders the gateway forwards at once; more are refused `busy`.",
)
@click.option(
    "--max-connections", type=click.IntRange(1), default=default_of(ServerConfig, "max_connections"), show_default=True
)
@click.option("--drain-timeout", type=seconds(zero=True), default=default_of(ServerConfig, "drain_timeout_s"))
@log_level_option
def gateway_command(address, socket_path, lora_roots, queue_capacity, max_connections, drain_timeout, log_level):
    """Serve the daemon's socket and protocol over a Ray cluster's render replicas (`easel cluster up`)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server: dict[str, Any] = {"max_connections": max_connections, "drain_timeout_s": drain_timeout}
    if socket_path is not None:
        server["socket_path"] = socket_path
    config = _service_config(lora_roots=lora_roots, queue_capacity=queue_capacity)
    roots_given = bool(lora_roots) or env.LORA_ROOTS.is_set()
    try:
        sys.exit(run_gateway(address, ServerConfig(**server), config, replica_roots=not roots_given))
    except EaselError as err:
        fail(err)


def run_gateway(
    address: str,
    server_config: ServerConfig,
    config: ServiceConfig,
    announce=click.echo,
    *,
    replica_roots: bool = False,
) -> int:
    """The gateway process: join Ray, bind the socket (refusing a live daemon there), serve until stopped.
    With `replica_roots` it takes LoRA paths from the roots its replicas report instead of `config`'s
    (a gateway started elsewhere than `cluster up` would otherwise refuse every path the replicas take)."""
    from daemon.cluster import app
    from daemon.cluster.gateway import ClusterRunner, GatewayServer
    from daemon.security import bind_unix_socket, clear_stale_socket, ensure_private_dir, remove_socket, socket_inode
    from daemon.startup import EXIT_SIGNALS, on_exit_signal
    from daemon.telemetry import setup_telemetry

    path = server_config.socket_path
    ensure_private_dir(path.parent)
    clear_stale_socket(path)
    app.init(address)
    handle, board = app.connect()
    if replica_roots and (roots := app.replica_lora_roots(board)):
        config = dataclasses.replace(config, lora_roots=tuple(Path(r) for r in roots))
    tel = setup_telemetry("easel-gateway")
    sock = bind_unix_socket(path)
    inode = socket_inode(path)

    async def serve() -> GatewayServer:
        server = GatewayServer(server_config, ClusterRunner(handle, config, tel, board=board))
        loop = asyncio.get_running_loop()
        for sig in EXIT_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_exit_signal, server, sig)
        ready = f"easel: gateway to {address} ready on {path} (pid {os.getpid()})"
        try:
            await server.serve(sock, on_ready=lambda: (announce(ready), sys.stdout.flush()))
        finally:
            tel.shutdown()
        return server

    try:
        server = asyncio.run(serve())
    finally:
        remove_socket(path, inode)
        sock.close()
    announce("easel: gateway stopped (forced)" if server.forced else "easel: gateway stopped")
    return 1 if server.forced else 0


@click.group("cluster", cls=EaselGroup)
def cluster_group() -> None:
    """Render replicas on a Ray cluster (docs/cluster.md)."""


@cluster_group.command("up")
@click.option("--replicas", type=click.IntRange(1), default=2, show_default=True)
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS), case_sensitive=False),
    default=default_of(ServiceConfig, "preset"),
    show_default=True,
)
@click.option("--model-path", default=None, help="A checkpoint at the same path on every machine.")
@click.option("--address", default=None, help=f"{ADDRESS_HELP} Default: start a Ray head on this machine.")
@click.option(
    "--num-cpus", type=Finite(0, above=True), default=1, show_default=True, help="CPUs each replica reserves."
)
@click.option("--num-gpus", type=Finite(0), default=0, show_default=True, help="GPUs each replica reserves.")
@click.option(
    "--blas-threads", type=click.IntRange(1), default=None, help="BLAS threads per replica [default: --num-cpus]."
)
@click.option(
    "--stacks-per-replica",
    type=click.IntRange(1),
    default=None,
    help="LoRA stacks a replica keeps (Serve's max_num_models_per_replica) [default: what --resident-stack-bytes "
    "holds at --stack-bytes, else 4].",
)
@click.option("--stack-bytes", type=ByteSize(1), default=None, help="A built stack's size, for the default.")
@click.option("--resident-stack-bytes", type=ByteSize(0), default=None, help="Each replica's bound (bytes, or 2GiB).")
@click.option(
    "--lora-cache-bytes",
    type=ByteSize(0),
    default=None,
    help="Each replica's bound on parsed LoRA files (bytes, or 2GiB) [default: `easel serve`'s].",
)
@_lora_roots
@click.option(
    "--output-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory the replicas write into (the same path on every machine) [default: $EASEL_OUTPUT_ROOT, "
    "else ./easel-output].",
)
@click.option(
    "--no-warmup", is_flag=True, help="Replicas skip their warm-up render (ready sooner, first render slower)."
)
@click.option(
    "--http",
    "http",
    default=None,
    metavar="HOST:PORT",
    help="Also start Serve's HTTP proxy there: POST /easel/render for clients on other machines, with the Ray "
    "cluster's token (needs RAY_AUTH_MODE=token) [default: no HTTP proxy].",
)
def up_command(
    replicas, preset, model_path, address, num_cpus, num_gpus, blas_threads, stacks_per_replica, stack_bytes,
    resident_stack_bytes, lora_cache_bytes, lora_roots, output_root, no_warmup, http,
) -> None:  # fmt: skip
    """Deploy N replicas of a preset (starting a one-machine Ray cluster unless --address names one, or one
    already runs on this machine)."""
    from daemon.cluster import app

    config = _service_config(
        preset=preset, model_path=model_path, lora_roots=lora_roots, output_root=output_root,
        resident_stack_bytes=resident_stack_bytes, lora_cache_bytes=lora_cache_bytes, warmup=not no_warmup,
    )  # fmt: skip
    try:
        joined = address is None and app.local_cluster_runs()
        if address is None and not joined:
            missing = app.missing_token()
            if missing is not None:  # before `ray start`, which would fail on it with a traceback
                raise ClusterUnavailable(missing, address="(a head on this machine)")
            need = max(1, int(replicas * num_cpus + 0.999))
            _ray_cli("start", "--head", f"--num-cpus={need}", "--include-dashboard=false", "--disable-usage-stats")
        address = address or "auto"
        app.init(address)
        if joined:  # an earlier `cluster up` left its head running: deploy onto it rather than fail to start one
            click.echo("easel: using the Ray cluster already running on this machine")
            app.check_room(replicas * num_cpus, replicas * num_gpus)
        try:
            app.start_serve(http)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        n = stacks_per_replica or app.stacks_for(config, stack_bytes)
        env_vars = _memory_shares(replicas)
        click.echo(f"easel: deploying {replicas} replica(s) of {config.preset} ({n} stacks each) ...")
        app.deploy(
            config, replicas=replicas, stacks_per_replica=n, num_cpus=num_cpus, num_gpus=num_gpus,
            blas_threads=blas_threads, env_vars=env_vars,
        )  # fmt: skip
    except EaselError as err:
        fail(err)
    click.echo(f"easel: {replicas} replica(s) ready; serve them on a socket with: easel gateway --cluster {address}")
    if http is not None:
        click.echo(f"easel: HTTP route: POST http://{http}/easel/render (Authorization: Bearer <the Ray token>)")


def _memory_shares(replicas: int) -> dict[str, str] | None:
    """The replicas' EASEL_MEMORY_LIMIT when they share this machine (app.memory_share), said on the way."""
    import psutil

    from daemon.cluster import app

    available = int(psutil.virtual_memory().available)
    share = app.memory_share(
        replicas, nodes=app.alive_nodes(), available=available, limit_set=env.MEMORY_LIMIT.is_set()
    )
    if share is None:
        return None
    click.echo(
        f"easel: the {replicas} replicas share this machine's memory: each may use {share / 2**30:.1f} GiB "
        f"({available / 2**30:.1f} GiB available / {replicas}; EASEL_MEMORY_LIMIT sets it)"
    )
    if app.deployed():  # the replicas being replaced hold their memory until the new ones are up
        click.echo(
            "easel: warning: an easel application already runs here and its replicas' memory counted as taken; "
            "`easel cluster down` first gives the new replicas all of it"
        )
    return {env.MEMORY_LIMIT.name: str(share)}


@cluster_group.command("down")
@click.option("--address", default="auto", show_default=True, help=ADDRESS_HELP)
@click.option("--stop-ray", is_flag=True, help="Also stop the Ray processes of this machine (`ray stop`).")
def down_command(address, stop_ray) -> None:
    """Delete the render application (and with --stop-ray, this machine's Ray cluster)."""
    from daemon.cluster import app

    missing = app.missing_token()
    if missing is not None:  # whether a cluster runs here cannot be asked without one
        fail(ClusterUnavailable(missing, address=address))
    try:
        app.init(address)
    except ClusterUnavailable as err:
        said = f"easel: no Ray cluster at {err.details['address']!r}: no application to remove"
    else:
        said = "easel: cluster application removed" if app.deployed() else "easel: no easel application was deployed"
        app.undeploy()
    if stop_ray:
        _ray_cli("stop")
        said += "; this machine's Ray processes stopped"
    click.echo(said)


def _ray_cli(*args: str) -> None:
    """Run Ray's own command line (`ray start`, `ray stop`); ClusterUnavailable with the last line it wrote
    (its error, not the traceback above it) when it fails."""
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    proc = subprocess.run([ray_bin, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        said = _last_line(proc.stderr) or _last_line(proc.stdout) or "it said nothing"
        raise ClusterUnavailable(f"`ray {' '.join(args)}` failed (exit {proc.returncode}): {said}",
                                 address="(this machine)")  # fmt: skip


def _last_line(text: str) -> str:
    """The last non-empty line of a command's output, its terminal colours removed (an error's own line,
    under the traceback that led to it)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in text.splitlines()]
    return next((line for line in reversed(lines) if line), "")


# ---- `easel batch ... --cluster ADDRESS` --------------------------------------------------------------


class ClusterRenderer:
    """A Renderer (client/renderer.py) over the cluster: a ClusterRunner on its own event-loop thread.
    Thread-safe, so a batch can keep every replica busy (`run_batch(..., workers=N)`)."""

    def __init__(self, address: str) -> None:
        from daemon.cluster import app
        from daemon.cluster.gateway import ClusterRunner
        from daemon.telemetry import setup_telemetry

        app.init(address)
        handle, board = app.connect()
        config = ServiceConfig(lora_roots=(Path("/"),))  # the replicas confine paths to their own roots
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="easel-cluster-renderer", daemon=True)
        self.thread.start()
        self.runner = ClusterRunner(handle, config, setup_telemetry("easel-batch", env={}), board=board)
        self._ids = iter(range(1, 2**62))
        self._lock = threading.Lock()

    def send_render(self, prompt, *, lora_paths=(), lora_scales=(), on_progress=None, **fields):
        from client.client import build_render

        with self._lock:
            rid = next(self._ids)
        req = build_render(prompt, lora_paths=lora_paths, lora_scales=lora_scales, progress=True, **fields)
        req = _with_id(req, rid)
        return asyncio.run_coroutine_threadsafe(self._render(req, on_progress), self.loop).result()

    async def _render(self, req, on_progress):
        from daemon.cluster.gateway import ClusterJob  # noqa: F401 (the job type the listener hears about)

        listener = _FutureListener(req.id, on_progress)
        job = self.runner.submit(req, listener, owner="batch")
        try:
            return await listener.result
        except asyncio.CancelledError:
            self.runner.cancel(job)
            raise

    def close(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.runner.close(), self.loop)
        with contextlib.suppress(Exception):
            fut.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _with_id(req, rid):
    import msgspec

    return msgspec.structs.replace(req, id=rid)


class _FutureListener:
    def __init__(self, rid, on_progress) -> None:
        self.rid, self.on_progress = rid, on_progress
        self.result = asyncio.get_running_loop().create_future()

    def queued(self, job, position, estimate) -> None:
        pass

    def started(self, job) -> None:
        pass

    def progress(self, job, step, steps, elapsed_s) -> None:
        if self.on_progress is not None:
            from client.wire.messages import Event

            with contextlib.suppress(Exception):
                self.on_progress(Event(id=self.rid, event="progress", step=step, steps=steps, elapsed_s=elapsed_s))

    def finished(self, job, result) -> None:
        if not self.result.done():
            self.result.set_result(result)

    def failed(self, job, error) -> None:
        if not self.result.done():
            self.result.set_exception(error)


def cluster_renderer(address: str) -> ClusterRenderer:
    """The `easel.renderers` entry point `cluster`: what `easel batch --cluster ADDRESS` renders through."""
    return ClusterRenderer(address)
