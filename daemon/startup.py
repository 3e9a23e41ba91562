"""Process start-up for `easel serve`: the socket, the model, signals and the lines the daemon announces.

    refuse if a daemon answers -> load the model -> warm up -> freeze start-up's objects out of the
    garbage collector's scans -> bind the socket -> serve -> remove the socket

The first SIGTERM/SIGINT asks the server for a graceful stop (drain within the drain timeout); a second
one during the drain forces the exit: queued renders are answered `shutting_down`, the running one
`cancelled`, connections close, and the process exits 1 (at once, if the render thread is still inside
a step).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from daemon.config import DaemonConfig
from daemon.engine.heap import freeze_long_lived
from daemon.runner import RenderRunner
from daemon.security import bind_unix_socket, clear_stale_socket, ensure_private_dir, remove_socket, socket_inode
from daemon.server import DaemonServer
from daemon.service import RenderService
from daemon.telemetry import Telemetry

log = logging.getLogger("easel.startup")

Announce = Callable[[str], None]
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_daemon(
    config: DaemonConfig, *, service: RenderService | None = None, tel: Telemetry | None = None, announce=print
) -> int:
    """`easel serve`: refuse if a daemon answers, load + warm the model, bind, serve until stopped.
    `tel` (spans and metrics) is flushed and shut down when the server stops. Returns the exit status:
    0 after a graceful stop, 1 after a forced one."""
    path = config.server.socket_path
    ensure_private_dir(path.parent)
    clear_stale_socket(path)  # refuse early (before minutes of model loading) if a daemon is live
    if service is None:
        t0 = time.perf_counter()
        service = RenderService.load(config.service, tel=tel)
        announce(f"easel: preset {service.preset_name} loaded in {time.perf_counter() - t0:.1f}s")
        announce(f"easel: {_memory_line(service, config)}")
    elif tel is not None:
        service.use_telemetry(tel)
    if config.service.warmup and not service.warm:
        announce(f"easel: warmed up in {service.warm_up():.1f}s")
    # with --no-warmup, `warm` stays false until the first render has run (service.run says so)
    frozen = freeze_long_lived()  # start-up's objects out of the collector's full scans (daemon/engine/heap.py)
    announce(f"easel: {frozen} start-up objects frozen (the garbage collector's full passes skip them)")
    sock = bind_unix_socket(path)
    inode = socket_inode(path)
    _event_loop_policy()
    try:
        server = asyncio.run(_serve(config, service, sock, announce))
    finally:
        remove_socket(path, inode)
        sock.close()
    if server.runner.rendering:  # forced while the render thread is inside a step: nothing will wait for it
        announce("easel: stopped (forced, a render was still running)")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    service.release_thread()  # this thread loaded and warmed the model
    announce("easel: stopped (forced)" if server.forced else "easel: stopped")
    return 1 if server.forced else 0


def _memory_line(service: RenderService, config: DaemonConfig) -> str:
    if service.memory is not None:
        return service.memory.describe()
    if config.service.force_load:
        return "renders are not checked against memory (--force)"
    return "renders are not checked against memory (the model is in the GPU's own)"


async def _serve(config: DaemonConfig, service: RenderService, sock: socket.socket, announce: Announce) -> DaemonServer:
    server = DaemonServer(config.server, RenderRunner(service, config.service))
    loop = asyncio.get_running_loop()
    for sig in EXIT_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_exit_signal, server, sig)
    ready = f"easel: ready on {server.config.socket_path} (pid {os.getpid()})"
    try:
        await server.serve(sock, on_ready=lambda: announce(ready))
    finally:  # the signal handlers stay until the loop closes: a signal now still means "stop at once"
        service.tel.shutdown()  # flush spans and metrics; bounded by the exporters' own timeouts
    return server


def on_exit_signal(server: DaemonServer, sig: signal.Signals) -> None:
    """First signal: drain gracefully. Another one while draining: stop now."""
    if server.stopping:
        log.warning("%s during the drain: stopping now", sig.name)
        server.force_stop()
    else:
        log.warning("%s: draining (up to %.0fs); send it again to stop at once", sig.name, server.drain_timeout_s)
        server.request_stop()
