"""The daemon process: an asyncio Unix-socket server over one render thread.

The event loop only reads frames, validates, queues and answers; the blocking MLX render runs in one
worker thread, so ping/status/cancel stay answered while a picture is being drawn. One connection may
carry many requests (matched by `id`); replies to different requests may interleave.

Shutdown (SIGTERM, SIGINT or the `shutdown` op): stop accepting connections and renders, let queued and
running renders finish within the drain timeout, cancel what is left (a running render stops at its next
step), close connections, remove the socket, return 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from client.wire import framing
from client.wire.errors import (
    Busy,
    Cancelled,
    DeadlineExceeded,
    EaselError,
    FrameTooLarge,
    InvalidRequest,
    PeerNotAllowed,
    ProtocolError,
    RenderFailed,
    ShuttingDown,
)
from client.wire.messages import (
    PROTOCOL_VERSION,
    Cancel,
    CancelResult,
    Event,
    Inspect,
    JobInfo,
    Ping,
    PingResult,
    Render,
    Request,
    Result,
    Shutdown,
    ShutdownResult,
    Status,
    StatusResult,
    decode_request,
    encode,
    error_reply,
)
from daemon.config import DaemonConfig
from daemon.scheduler import PRIORITIES, Job, JobQueue, Shape, StepTimes, estimate_queue
from daemon.security import (
    bind_unix_socket,
    clear_stale_socket,
    ensure_private_dir,
    peer_uid,
    remove_socket,
    socket_inode,
)
from daemon.service import Prepared, RenderService
from daemon.telemetry import ServerCall, Telemetry, start_server_call

log = logging.getLogger("easel.server")


def easel_version() -> str:
    try:
        return version("easel")
    except PackageNotFoundError:
        return "0.0.0+unknown"


_conn_ids = itertools.count(1)
SEND_TIMEOUT_S = 30.0


@dataclass(eq=False)
class Connection:
    """One client connection: serialised writes, and the render jobs it still waits for."""

    writer: asyncio.StreamWriter
    max_frame: int
    conn_id: int = field(default_factory=lambda: next(_conn_ids))
    jobs: dict[Any, Job] = field(default_factory=dict)  # request id -> job
    closed: bool = False
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    _tasks: set[asyncio.Task] = field(default_factory=set)

    async def send(self, msg: Any) -> None:
        """Write one reply. A peer that stops reading for SEND_TIMEOUT_S is disconnected, so a stuck
        client can never stall the render worker or anyone else."""
        if self.closed:
            return
        data = framing.encode_frame(encode(msg))
        async with self._lock:
            try:
                self.writer.write(data)
                await asyncio.wait_for(self.writer.drain(), SEND_TIMEOUT_S)
            except (ConnectionError, RuntimeError, TimeoutError):
                self.closed = True
                self.writer.transport.abort()

    def post(self, msg: Any) -> None:
        """Queue a reply without waiting (replies of one connection keep their order: the lock is FIFO)."""
        task = asyncio.get_running_loop().create_task(self.send(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class DaemonServer:
    def __init__(self, config: DaemonConfig, service: RenderService) -> None:
        self.config = config
        self.service = service
        self.tel = service.tel
        self.queue = JobQueue(config.queue_capacity, config.policy, config.interactive_reserve)
        self.times = StepTimes()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="easel-render")
        self.started = time.monotonic()
        self.version = easel_version()
        self.connections: set[Connection] = set()
        self.jobs: dict[str, Job] = {}  # job id -> job (queued or running)
        self.running: Job | None = None
        self.renders_done = 0
        self._stop = asyncio.Event()
        self._drain_timeout = config.drain_timeout_s
        self._server: asyncio.AbstractServer | None = None
        self._job_seq = itertools.count(1)

    # ---- lifecycle ------------------------------------------------------------------------------

    def request_stop(self, drain_timeout_s: float | None = None) -> None:
        if drain_timeout_s is not None:
            self._drain_timeout = drain_timeout_s
        self.queue.close()
        self._stop.set()

    async def serve(self, sock: socket.socket, on_ready: Any = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.request_stop)
        self._server = await asyncio.start_unix_server(self._handle, sock=sock, limit=2**16)
        worker = asyncio.create_task(self._worker(), name="easel-worker")
        if on_ready is not None:
            on_ready()
        try:
            await self._stop.wait()
        finally:
            await self._drain(worker)
            self._server.close()
            pending = [t for conn in self.connections for t in conn._tasks]
            if pending:  # replies already posted (last results, cancellations) reach their clients first
                await asyncio.wait(pending, timeout=SEND_TIMEOUT_S)
            for conn in list(self.connections):
                conn.closed = True
                conn.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            with contextlib.suppress(Exception):  # the render thread frees its MLX streams before it ends
                await loop.run_in_executor(self.executor, self.service.release_thread)
            self.executor.shutdown(wait=True)
            self.tel.shutdown()  # flush spans and metrics; bounded by the exporters' own timeouts

    async def _drain(self, worker: asyncio.Task) -> None:
        """Stop accepting; finish queued + running work within the drain timeout; cancel the rest."""
        self._server.close()  # no new connections; existing ones still get their results
        self.queue.close()
        done, _ = await asyncio.wait({worker}, timeout=self._drain_timeout)
        if done:
            return
        log.warning("drain timeout (%.1fs) reached; cancelling %d queued job(s)", self._drain_timeout, len(self.queue))
        for job in self.queue.jobs:
            self.queue.remove(job)
            self._finish_error(job, ShuttingDown("the daemon shut down before this render started"))
        if self.running is not None:
            self.running.cancel_event.set()
        await asyncio.wait({worker}, timeout=max(60.0, self._drain_timeout))

    # ---- connections ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer, self.config.max_frame)
        refusal = self._refusal(writer.get_extra_info("socket"))
        if refusal is not None:  # answered on the connection (id null), which is then closed
            self.tel.metrics.error(refusal.code)
            await conn.send(error_reply(None, refusal))
            writer.close()
            return
        self.connections.add(conn)
        try:
            await self._read_loop(conn, reader)
        finally:
            conn.closed = True
            self.connections.discard(conn)
            for job in list(conn.jobs.values()):
                self._cancel_job(job)
            conn.jobs.clear()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _refusal(self, sock: socket.socket | None) -> EaselError | None:
        """Why a new connection may not be served: another user's process, or too many connections."""
        if not self.config.allow_any_uid and sock is not None:
            uid = peer_uid(sock)
            if uid is not None and uid != os.getuid():
                return PeerNotAllowed(f"peer uid {uid} is not the daemon's uid", uid=uid)
        if len(self.connections) >= self.config.max_connections:
            return Busy(
                f"the daemon already serves {len(self.connections)} connections (the limit); "
                "close idle ones or retry later",
                connections=len(self.connections),
            )
        return None

    async def _read_loop(self, conn: Connection, reader: asyncio.StreamReader) -> None:
        while not conn.closed:
            try:
                payload = await framing.read_frame(reader, self.config.max_frame, self.config.frame_timeout_s)
            except framing.PeerClosed:
                return
            except (FrameTooLarge, ProtocolError) as err:  # the stream cannot be resynchronised: answer, close
                self.tel.metrics.error(err.code)
                await conn.send(error_reply(None, err))
                return
            except ConnectionError:
                return
            try:
                req = decode_request(payload)
            except EaselError as err:
                self.tel.metrics.error(err.code)
                await conn.send(error_reply(err.details.get("id"), err))
                continue
            call = start_server_call(
                self.tel,
                type(req).__struct_config__.tag,
                trace_context=req.trace_context,
                request_id=req.id,
                socket_path=str(self.config.socket_path),
            )
            answered_later = False
            try:
                answered_later = await self._dispatch(conn, req, call)
            except EaselError as err:
                call.set_error(err)
                await conn.send(error_reply(req.id, err))
            except Exception as exc:  # a bug must not take the daemon down
                log.exception("request %r failed", req.id)
                call.set_error(exc)
                await conn.send(error_reply(req.id, EaselError(f"internal error: {type(exc).__name__}: {exc}")))
            finally:
                if not answered_later:  # a render / inspect ends its span when its reply is sent
                    call.end()

    # ---- operations -----------------------------------------------------------------------------

    async def _dispatch(self, conn: Connection, req: Request, call: ServerCall) -> bool:
        """Answer `req`, or hand it on; True when it was handed on (its reply, and `call.end()`, come later)."""
        if isinstance(req, Ping):
            await conn.send(Result(id=req.id, op="ping", result=PingResult(pong=True, version=self.version)))
        elif isinstance(req, Status):
            await conn.send(Result(id=req.id, op="status", result=self.status()))
        elif isinstance(req, Render):
            await self._submit(conn, req, call)
            return True
        elif isinstance(req, Inspect):  # reads a file: off the loop, and not holding up this connection
            task = asyncio.get_running_loop().create_task(self._inspect(conn, req, call))
            conn._tasks.add(task)
            task.add_done_callback(conn._tasks.discard)
            return True
        elif isinstance(req, Cancel):
            await conn.send(Result(id=req.id, op="cancel", result=await self._cancel(conn, req)))
        elif isinstance(req, Shutdown):
            await conn.send(Result(id=req.id, op="shutdown", result=ShutdownResult(accepted=True)))
            self.request_stop(req.drain_timeout_s)
        return False

    async def _inspect(self, conn: Connection, req: Inspect, call: ServerCall) -> None:
        try:
            report = await asyncio.get_running_loop().run_in_executor(None, self.service.inspect, req.path)
        except EaselError as err:
            call.set_error(err)
            await conn.send(error_reply(req.id, err))
        except Exception as exc:
            log.exception("inspect %r failed", req.path)
            call.set_error(exc)
            await conn.send(error_reply(req.id, EaselError(f"inspect failed: {type(exc).__name__}: {exc}")))
        else:
            await conn.send(Result(id=req.id, op="inspect", result=report))
        finally:
            call.end()

    async def _submit(self, conn: Connection, req: Render, call: ServerCall) -> None:
        if self.queue.closed:
            raise ShuttingDown("the daemon is shutting down and accepts no new renders")
        if req.id in conn.jobs:
            raise InvalidRequest(f"request id {req.id!r} is already in flight on this connection", field="id")
        prepared = self.service.prepare(req)
        spec = prepared.spec
        now = time.monotonic()
        prepared.call, prepared.enqueued_ns = call, time.time_ns()
        job = Job(
            job_id=f"{conn.conn_id}:{next(self._job_seq)}",
            priority=PRIORITIES[req.priority],
            stack_key=prepared.stack_key,
            shape=Shape(spec.preset, spec.width, spec.height, spec.steps),
            payload=(conn, req, prepared),
            request_id=req.id,
            conn_id=conn.conn_id,
            deadline=now + req.deadline_s if req.deadline_s is not None else None,
            enqueued_at=now,
            stack_label=[f"{it.path.name}@{it.scale:g}" for it in prepared.stack],
        )
        position = self.queue.submit(job)
        self.tel.metrics.set_queue_depth(len(self.queue))
        conn.jobs[req.id] = job
        self.jobs[job.job_id] = job
        if req.deadline_s is not None:
            asyncio.get_running_loop().call_later(req.deadline_s, self._expire, job)
        if req.progress:
            est = self._estimates().get(job.job_id, (None, None))
            await conn.send(
                Event(
                    id=req.id,
                    event="queued",
                    position=position,
                    estimated_start_s=est[0],
                    estimated_finish_s=est[1],
                )
            )

    async def _cancel(self, conn: Connection, req: Cancel) -> CancelResult:
        job = self.jobs.get(req.job) if req.job is not None else conn.jobs.get(req.target)
        if job is None:
            return CancelResult(cancelled=False, state="unknown")
        state = job.state
        if state == "queued":
            self.queue.remove(job)
            self._finish_error(job, Cancelled("cancelled while queued"))
        else:
            job.cancel_event.set()  # the render thread raises Cancelled at the next step
        return CancelResult(cancelled=True, state=state, job=job.job_id)

    def _cancel_job(self, job: Job) -> None:
        """The job's client went away: drop it if queued, stop it at the next step if running."""
        job.cancel_event.set()
        if self.queue.remove(job):
            self._forget(job, Cancelled("the client went away while the render was queued"))

    def _forget(self, job: Job, error: EaselError | None = None) -> None:
        """The job is done with (answered, or its client left): drop it and end its server span."""
        self.jobs.pop(job.job_id, None)
        conn, req, prepared = job.payload
        if conn.jobs.get(req.id) is job:
            del conn.jobs[req.id]
        self.tel.metrics.set_queue_depth(len(self.queue))
        call, prepared.call = prepared.call, None
        if call is not None:
            if error is not None:
                call.set_error(error)
            call.end()

    def _finish_error(self, job: Job, err: EaselError) -> None:
        conn, req, _ = job.payload
        conn.post(error_reply(req.id, err))
        self._forget(job, err)

    def _expire(self, job: Job) -> None:
        """A queued job's deadline passed: answer now instead of when it reaches the head of the queue."""
        if job.state == "queued" and self.queue.remove(job):
            _, req, _ = job.payload
            self._finish_error(job, DeadlineExceeded(f"deadline of {req.deadline_s}s passed while queued"))

    # ---- the render worker ----------------------------------------------------------------------

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.take(self.service.active_key)
            if job is None:
                return
            self.tel.metrics.set_queue_depth(len(self.queue))
            if job.cancel_event.is_set():
                self._forget(job, Cancelled("the client went away while the render was queued"))
                continue
            conn, req, prepared = job.payload
            now = time.monotonic()
            if job.deadline is not None and now > job.deadline:
                self._finish_error(
                    job,
                    DeadlineExceeded(f"deadline of {req.deadline_s}s passed while queued", deadline_s=req.deadline_s),
                )
                continue
            job.state, job.started_at, job.step = "running", now, 0
            self.running = job
            prepared.timings["queue_wait"] = now - job.enqueued_at
            if req.progress:
                conn.post(Event(id=req.id, event="started", steps=job.shape.steps))
            try:
                result = await loop.run_in_executor(self.executor, self._run_job, job, prepared, loop)
            except EaselError as err:
                self._finish_error(job, err)
            except Exception as exc:
                log.exception("render %s failed", job.job_id)
                self._finish_error(job, RenderFailed(f"render failed: {type(exc).__name__}: {exc}"))
            else:
                self.renders_done += 1
                result.job = job.job_id
                conn.post(Result(id=req.id, op="render", result=result))
                self._forget(job)
            finally:
                self.running = None

    def _run_job(self, job: Job, prepared: Prepared, loop: asyncio.AbstractEventLoop):
        """In the render thread. `on_step` stops the render at the next step when cancelled or late."""
        conn, req, _ = job.payload
        t0 = time.perf_counter()

        def on_step(i: int, n: int) -> None:
            job.step = i
            if job.cancel_event.is_set():
                raise Cancelled(f"render cancelled at step {i} of {n}", step=i)
            if job.deadline is not None and time.monotonic() > job.deadline:
                raise DeadlineExceeded(f"deadline of {req.deadline_s}s passed at step {i} of {n}", step=i)
            if req.progress:
                ev = Event(id=req.id, event="progress", step=i, steps=n, elapsed_s=time.perf_counter() - t0)
                loop.call_soon_threadsafe(conn.post, ev)

        result = self.service.run(prepared, on_step)
        t = result.timings
        t["total"] = time.perf_counter() - t0 + t.get("queue_wait", 0.0)
        other = t.get("text_encode", 0.0) + t.get("decode", 0.0) + t.get("write", 0.0)
        self.times.observe(job.shape, t.get("denoise", 0.0), other)
        if result.stack_switched:
            self.times.observe_switch(t.get("stack_switch", 0.0))
        return result

    # ---- status ---------------------------------------------------------------------------------

    def _estimates(self) -> dict[str, tuple[float | None, float | None]]:
        now = time.monotonic()
        left: float | None = 0.0
        active = self.service.active_key
        if self.running is not None:
            est = self.times.estimate(self.running.shape)
            left = None if est is None else max(0.0, est - (now - (self.running.started_at or now)))
            active = self.running.stack_key
        return estimate_queue(self.queue.jobs, active, now, self.times, left, self.config.policy)

    def _job_info(self, job: Job, now: float, est: tuple[float | None, float | None] | None) -> JobInfo:
        _, req, _ = job.payload
        return JobInfo(
            job=job.job_id,
            request_id=req.id,
            priority=req.priority,
            state=job.state,
            width=job.shape.width,
            height=job.shape.height,
            steps=job.shape.steps,
            stack=job.stack_label,
            waited_s=(job.started_at or now) - job.enqueued_at,
            step=job.step,
            estimated_start_s=None if est is None else est[0],
            estimated_finish_s=None if est is None else est[1],
        )

    def status(self) -> StatusResult:
        now = time.monotonic()
        ests = self._estimates()
        in_flight = None
        if self.running is not None:
            est = self.times.estimate(self.running.shape)
            left = None if est is None else max(0.0, est - (now - (self.running.started_at or now)))
            in_flight = self._job_info(self.running, now, (0.0, left))
        from daemon.scheduler import plan

        ordered = plan(self.queue.jobs, self.service.active_key, now, self.config.policy)
        return StatusResult(
            version=self.version,
            protocol=PROTOCOL_VERSION,
            preset=self.service.preset_name,
            model_loaded=True,
            warm=self.service.warm,
            uptime_s=now - self.started,
            pid=os.getpid(),
            socket=str(self.config.socket_path),
            active_stack=self.service.active_stack(),
            lora_cache=self.service.lora_cache_stats(),
            queue_depth=len(self.queue),
            queue_capacity=self.queue.capacity,
            interactive_reserve=self.queue.interactive_reserve,
            queue=[self._job_info(j, now, ests.get(j.job_id)) for j in ordered],
            step_times=self.times.table(),
            shutting_down=self.queue.closed,
            renders_done=self.renders_done,
            stack_switches=self.service.stack_switches,
            in_flight=in_flight,
        )


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
    `tel` (spans and metrics) is flushed and shut down when the server stops."""
    path = Path(config.socket_path)
    ensure_private_dir(path.parent)
    clear_stale_socket(path)  # refuse early (before minutes of model loading) if a daemon is live
    if service is None:
        t0 = time.perf_counter()
        service = RenderService.load(config, tel=tel)
        announce(f"easel: preset {service.preset_name} loaded in {time.perf_counter() - t0:.1f}s")
    elif tel is not None:
        service.use_telemetry(tel)
    if config.warmup and not service.warm:
        announce(f"easel: warmed up in {service.warm_up():.1f}s")
    else:
        service.warm = True
    sock = bind_unix_socket(path)
    inode = socket_inode(path)
    _event_loop_policy()
    try:
        asyncio.run(_serve(config, service, sock, announce))
    finally:
        remove_socket(path, inode)
        sock.close()
        service.release_thread()  # this thread loaded and warmed the model
    announce("easel: stopped")
    return 0


async def _serve(config: DaemonConfig, service: RenderService, sock: socket.socket, announce) -> None:
    server = DaemonServer(config, service)
    await server.serve(sock, on_ready=lambda: announce(f"easel: ready on {config.socket_path} (pid {os.getpid()})"))
