"""The socket server: connections, framing and a dispatch table over a RenderRunner.

The event loop only reads frames, validates, hands renders to the runner (daemon/runner.py) and answers;
the runner's render thread draws. One connection may carry many requests (matched by `id`); replies to
different requests may interleave. `RenderReplies` turns one render's runner events into reply frames.

Stopping (`request_stop`: SIGTERM, SIGINT or the `shutdown` op): stop accepting connections and renders,
let queued and running renders finish within the drain timeout, cancel what is left (a running render
stops at its next step), close connections. `force_stop` (a second signal) cuts the drain short.
Process start-up (socket, model, signals, announce lines) is daemon/startup.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import msgspec

from client.wire import framing
from client.wire.errors import (
    Busy,
    Cancelled,
    DuplicateId,
    EaselError,
    FrameTooLarge,
    PeerNotAllowed,
    ProtocolError,
)
from client.wire.messages import (
    MAX_ID_CHARS,
    MAX_STACK,
    PROTOCOL_VERSION,
    Cancel,
    CancelResult,
    ConnectionLimits,
    Error,
    Event,
    Hello,
    Inspect,
    Ping,
    PingResult,
    Preload,
    PreloadResult,
    Render,
    RenderResult,
    Reply,
    Request,
    RequestId,
    Result,
    Shutdown,
    ShutdownResult,
    Status,
    StatusResult,
    decode_request,
    encode,
    request_of,
)
from client.wire.messages import error_reply as wire_error_reply
from daemon.config import ServerConfig
from daemon.runner import Estimate, RenderJob, RenderRunner
from daemon.security import peer_uid
from daemon.telemetry import ServerCall, Telemetry, record_preload, start_server_call

log = logging.getLogger("easel.server")


def easel_version() -> str:
    try:
        return version("easel")
    except PackageNotFoundError:
        return "0.0.0+unknown"


LIMITED_OPS = (Ping, Status, Cancel, Shutdown)  # what a connection let in over the limit may ask
MAX_NESTING = 32  # container levels a request body may nest (a request needs 3)
MAX_MESSAGE_CHARS = 4096  # of an error message, middle elided beyond
MAX_ECHO_CHARS = 1024  # of any one string an error reply's details carry
_CONTAINER_BYTES = bytes(range(0x80, 0xA0)) + b"\xdc\xdd\xde\xdf"  # msgpack map/array headers (and other bytes)


def _nests_deeper_than(payload: bytes, limit: int) -> bool:
    """Whether the msgpack `payload` nests maps/arrays more than `limit` deep. Without `limit` bytes that
    could be container headers it cannot (the common case, decided at C speed); else the decoded value
    is walked without recursion, visiting containers only."""
    if len(payload) - len(payload.translate(None, _CONTAINER_BYTES)) < limit:
        return False
    stack: list[tuple[Any, int]] = [(msgspec.msgpack.decode(payload), 1)]
    while stack:
        value, depth = stack.pop()
        items = value.values() if isinstance(value, dict) else value
        if isinstance(value, dict):
            stack.extend((k, depth + 1) for k in value if isinstance(k, tuple))
        for item in items:
            if isinstance(item, (dict, list, tuple)):
                if depth + 1 > limit:
                    return True
                stack.append((item, depth + 1))
    return False


def decode_body(payload: bytes) -> Request:
    """One frame's body as a typed request. Whatever is wrong with it (not msgpack, invalid UTF-8, nested
    too deep, not a request) raises an EaselError: `protocol_error` unless decode_request says better."""
    try:
        if _nests_deeper_than(payload, MAX_NESTING):
            raise ProtocolError(f"the message nests maps/arrays more than {MAX_NESTING} levels deep")
        return decode_request(payload)
    except EaselError:
        raise
    except RecursionError:
        raise ProtocolError(f"the message nests maps/arrays more than {MAX_NESTING} levels deep") from None
    except Exception as exc:  # msgspec.DecodeError, UnicodeDecodeError, anything else a decoder raises
        raise ProtocolError(f"frame body is not a valid msgpack message: {type(exc).__name__}: {exc}") from None


def elide(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters, keeping its start and its end (what a reader needs)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}...[{len(text) - 2 * half} characters omitted]...{text[-half:]}"


def _bounded(value: Any) -> Any:
    if isinstance(value, str):
        return elide(value, MAX_ECHO_CHARS)
    if isinstance(value, dict):
        return {k: _bounded(v) for k, v in list(value.items())[:64]}
    if isinstance(value, (list, tuple)):
        return [_bounded(v) for v in value[:64]]
    return value


def error_reply(rid: RequestId | None, err: EaselError, *, op: str | None = None, closing: bool = False) -> Error:
    """The wire error for `err`, with whatever it echoes bounded: a request can make the daemon repeat a
    value (an unknown op, a path) but never make a reply bigger than a few KiB. `rid` None: a
    connection-level error (sent without `id`); `closing`: the connection is closed after it."""
    reply = wire_error_reply(rid, err, op=op, closing=closing)
    body = reply.error
    body.message = elide(body.message, MAX_MESSAGE_CHARS)
    body.details = _bounded(body.details)
    return reply


_conn_ids = itertools.count(1)
ANSWERED_MEMORY = 1024  # finished renders a connection remembers (request id -> job id) for `cancel`
SEND_TIMEOUT_S = 30.0
FORCED_SEND_TIMEOUT_S = 1.0  # after a forced stop, replies already posted get this long to go out


@dataclass(eq=False)
class Connection:
    """One client connection: serialised writes, and the render jobs it still waits for."""

    writer: asyncio.StreamWriter
    max_frame: int
    conn_id: int = field(default_factory=lambda: next(_conn_ids))
    jobs: dict[Any, RenderJob] = field(default_factory=dict)  # request id -> job
    in_flight: dict[Any, str] = field(default_factory=dict)  # request id -> op, until its final answer is posted
    answered: OrderedDict[Any, str] = field(default_factory=OrderedDict)  # request id -> job id of a finished render
    closed: bool = False
    limited: bool = False  # admitted over the connection limit: ping, status, cancel and shutdown only
    last_active: float = field(default_factory=time.monotonic)  # last frame read or request answered
    dispatching: int = 0  # requests being answered right now
    unstarted_preloads: set[Any] = field(default_factory=set)  # request ids of preloads whose work has not begun
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
        self.spawn(self.send(msg))

    def begin(self, rid: RequestId, op: str) -> None:
        """Hold `rid` for a request until its final answer: ids are unique among the requests in flight."""
        self.in_flight[rid] = op

    def end(self, rid: RequestId) -> None:
        """Free `rid`, just before its final answer is written: a client may reuse an id once it has the
        answer, never earlier, so the reuse cannot be refused as a duplicate."""
        self.in_flight.pop(rid, None)

    def remember(self, rid: RequestId, job_id: str) -> None:
        self.answered[rid] = job_id
        self.answered.move_to_end(rid)
        while len(self.answered) > ANSWERED_MEMORY:
            self.answered.popitem(last=False)

    @property
    def idle(self) -> bool:
        """Nothing in flight: no render waiting, no inspect or reply pending, no request being answered."""
        return not self.jobs and not self._tasks and not self.dispatching and not self.closed

    def spawn(self, work: Awaitable[None]) -> None:
        """Run `work` for this connection in the background; shutdown waits for it before closing."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class RenderReplies:
    """A runner listener for one render request: its events become reply frames on its connection, and
    its answer ends the request's server span."""

    def __init__(self, conn: Connection, req: Render, call: ServerCall, answered: Callable[[str], None]) -> None:
        self.conn, self.req, self.call = conn, req, call
        self._answered = answered  # the server's memory of answered job ids (for `cancel` by job)

    def queued(self, job: RenderJob, position: int, estimate: Estimate) -> None:
        self._place("queued", position, estimate)

    def queue_update(self, job: RenderJob, position: int, estimate: Estimate) -> None:
        self._place("queue_update", position, estimate)

    def _place(self, event: Literal["queued", "queue_update"], position: int, estimate: Estimate) -> None:
        if self.req.progress:
            self.conn.post(
                Event(
                    id=self.req.id,
                    event=event,
                    position=position,
                    estimated_start_s=estimate.start_s,
                    estimated_finish_s=estimate.finish_s,
                )
            )

    def started(self, job: RenderJob) -> None:
        if self.req.progress:
            self.conn.post(Event(id=self.req.id, event="started", steps=job.shape.steps))

    def suspended(self, job: RenderJob, step: int, steps: int) -> None:
        if self.req.progress:
            self.conn.post(Event(id=self.req.id, event="suspended", step=step, steps=steps))

    def resumed(self, job: RenderJob, step: int, steps: int) -> None:
        if self.req.progress:
            self.conn.post(Event(id=self.req.id, event="resumed", step=step, steps=steps))

    def progress(self, job: RenderJob, step: int, steps: int, elapsed_s: float) -> None:
        if self.req.progress:
            self.conn.post(Event(id=self.req.id, event="progress", step=step, steps=steps, elapsed_s=elapsed_s))

    def finished(self, job: RenderJob, result: RenderResult) -> None:
        self._done(job)
        self.conn.post(Result(id=self.req.id, op="render", result=result))
        self._ended()

    def failed(self, job: RenderJob, error: EaselError) -> None:
        self._done(job)
        self.conn.post(error_reply(self.req.id, error, op="render"))
        self._ended(error)

    def _done(self, job: RenderJob) -> None:
        """The render is answered: its id is free again (before the answer goes out), `cancel` now says `done`."""
        if self.conn.jobs.get(self.req.id) is job:
            del self.conn.jobs[self.req.id]
        self.conn.end(self.req.id)  # held by this render until now (ids are unique while in flight)
        self.conn.remember(self.req.id, job.job_id)
        self._answered(job.job_id)

    def _ended(self, error: EaselError | None = None) -> None:
        if error is not None:
            self.call.set_error(error)
        self.call.end()


Handler = Callable[[Connection, Any, ServerCall], Awaitable[Reply | None]]


class DaemonServer:
    def __init__(self, config: ServerConfig, runner: RenderRunner) -> None:
        self.config = config
        self.runner = runner
        self.started = time.monotonic()
        self.version = easel_version()
        self.connections: set[Connection] = set()
        self.forced = False
        self.shutdown_requested = False  # set before the `shutdown` reply is written: `status` says so at once
        self.answered_jobs: OrderedDict[str, None] = OrderedDict()  # recently answered job ids, for `cancel`
        self._stop = asyncio.Event()
        self._forced = asyncio.Event()
        self._drain_timeout = config.drain_timeout_s
        self._server: asyncio.AbstractServer | None = None
        # op -> handler: returns the reply to send now, or None when it answers by itself (then or later)
        # and ends the call itself
        self._handlers: dict[type, Handler] = {
            Ping: self._ping,
            Status: self._status,
            Render: self._render,
            Preload: self._preload,
            Inspect: self._inspect,
            Cancel: self._cancel,
            Shutdown: self._shutdown,
        }

    @property
    def tel(self) -> Telemetry:
        return self.runner.service.tel

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def drain_timeout_s(self) -> float:
        return self._drain_timeout

    def request_stop(self, drain_timeout_s: float | None = None) -> None:
        """Begin a graceful stop: no new renders from now on, then the drain (see `serve`)."""
        if drain_timeout_s is not None:
            self._drain_timeout = drain_timeout_s
        self.runner.stop_accepting()
        self._stop.set()

    def force_stop(self) -> None:
        """Stop now: answer queued and running renders (shutting_down / cancelled) and stop waiting for them."""
        self.forced = True
        self.runner.abort(force=True)
        self._forced.set()
        self._stop.set()

    async def serve(self, sock: socket.socket, on_ready: Callable[[], None] | None = None) -> None:
        """Serve on the bound, listening `sock` until a stop is requested, then drain and close."""
        self._server = await asyncio.start_unix_server(self._handle, sock=sock, limit=2**16)
        self.runner.start()
        if on_ready is not None:
            on_ready()
        try:
            await self._stop.wait()
        finally:
            await self._close()

    async def _close(self) -> None:
        self._server.close()  # no new connections; existing ones still get their results
        await self.runner.drain(self._drain_timeout)
        pending = [t for conn in self.connections for t in conn._tasks]
        # replies already posted (last results, cancellations) reach their clients first
        await self._wait_unless_forced(pending, SEND_TIMEOUT_S)
        for conn in list(self.connections):
            conn.closed = True
            conn.writer.close()
        await self._wait_unless_forced([asyncio.ensure_future(self._server.wait_closed())], 5.0)
        await self.runner.close()

    async def _wait_unless_forced(self, tasks: list[asyncio.Future], timeout_s: float) -> None:
        """Wait for `tasks` up to `timeout_s`, or FORCED_SEND_TIMEOUT_S once a stop is forced."""
        if not tasks:
            return
        settled = asyncio.ensure_future(asyncio.wait(tasks, timeout=timeout_s))
        forced = asyncio.ensure_future(self._forced.wait())
        await asyncio.wait({settled, forced}, return_when=asyncio.FIRST_COMPLETED)
        if not settled.done():
            await asyncio.wait({settled}, timeout=FORCED_SEND_TIMEOUT_S)
        settled.cancel()  # stops waiting; the tasks themselves go on (or end with the loop)
        forced.cancel()

    # ---- connections ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer, self.config.max_frame)
        refusal = self._admit(conn, writer.get_extra_info("socket"))
        if refusal is not None:  # the first and only frame: a connection-level error, then EOF
            self.tel.metrics.error(refusal.code)
            await conn.send(error_reply(None, refusal, closing=True))
            writer.close()
            return
        self.connections.add(conn)
        try:
            await conn.send(self.hello(conn))  # the first frame of an accepted connection, before any read
            await self._read_loop(conn, reader)
        finally:
            conn.closed = True
            self.connections.discard(conn)
            for job in list(conn.jobs.values()):  # dropped if queued, stopped at its next step if running
                self.runner.cancel(job, Cancelled("the client that sent it went away"))
            conn.jobs.clear()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _admit(self, conn: Connection, sock: socket.socket | None) -> EaselError | None:
        """Why a new connection may not be served (another user's process, or no room), else None.

        At `max_connections` the connection idle the longest is closed to make room (`_evict`). When
        every connection is busy, a peer of the daemon's own uid is still let in, *limited* (ping, status,
        cancel and shutdown; other requests get `busy`), up to `max_connections` more: a full daemon can
        always be asked what it is doing, and stopped. Beyond that, `busy` and the connection is closed."""
        uid = peer_uid(sock) if sock is not None else None
        if not self.config.allow_any_uid and uid is not None and uid != os.getuid():
            return PeerNotAllowed(f"peer uid {uid} is not the daemon's uid", uid=uid)
        limit = self.config.max_connections
        if sum(not c.limited for c in self.connections) < limit:
            return None
        victim = self._oldest_idle(limited=False)
        if victim is not None:
            self._evict(victim)
            return None
        own_uid = uid is None or uid == os.getuid()
        if own_uid and len(self.connections) >= 2 * limit:
            victim = self._oldest_idle(limited=True)
            if victim is not None:
                self._evict(victim)
        if own_uid and len(self.connections) < 2 * limit:
            conn.limited = True
            return None
        return Busy(
            f"the daemon already serves {len(self.connections)} connections (the limit is {limit}) and none "
            "is idle; retry later",
            connections=len(self.connections),
        )

    def _oldest_idle(self, *, limited: bool) -> Connection | None:
        idle = [c for c in self.connections if c.limited == limited and c.idle]
        return min(idle, key=lambda c: c.last_active, default=None)

    def _evict(self, conn: Connection) -> None:
        """Close an idle connection to make room: it is told why (`busy`, id null; a client reconnects)."""
        idle_s = time.monotonic() - conn.last_active
        log.info("closing connection %d, idle for %.1fs, to make room", conn.conn_id, idle_s)
        self.tel.metrics.error(Busy.code)
        self.connections.discard(conn)
        parting = Busy(
            f"this connection was the one idle the longest and was closed to make room for a new one (the "
            f"daemon serves at most {self.config.max_connections}); reconnect",
            evicted=True,
        )

        data = framing.encode_frame(encode(error_reply(None, parting, closing=True)))
        conn.closed = True  # from now on nothing more of this connection is read or answered

        async def part() -> None:
            with contextlib.suppress(Exception):
                conn.writer.write(data)
                await asyncio.wait_for(conn.writer.drain(), FORCED_SEND_TIMEOUT_S)
            conn.writer.close()

        conn.spawn(part())

    async def _read_loop(self, conn: Connection, reader: asyncio.StreamReader) -> None:
        while not conn.closed:
            try:
                payload = await framing.read_frame(reader, self.config.max_frame, self.config.frame_timeout_s)
            except framing.PeerClosed:
                return
            except (FrameTooLarge, ProtocolError) as err:  # the stream cannot be resynchronised: answer, close
                self.tel.metrics.error(err.code)
                await conn.send(error_reply(None, err, closing=True))
                return
            except ConnectionError:
                return
            if conn.closed:  # evicted while this frame arrived
                return
            conn.last_active = time.monotonic()
            try:
                req = decode_body(payload)
            except EaselError as err:  # the framing is intact: answer, and keep the connection
                rid, op = request_of(err)
                if rid is not None and rid in conn.in_flight:  # answering it by id would cross the replies
                    err = self._duplicate(conn, rid, op)
                    rid = None
                self.tel.metrics.error(err.code)
                await conn.send(error_reply(rid, err, op=op))  # rid None: a connection-level error
                continue
            conn.dispatching += 1
            try:
                await self._dispatch(conn, req)
            finally:
                conn.dispatching -= 1
                conn.last_active = time.monotonic()

    def _duplicate(self, conn: Connection, rid: RequestId, op: str | None) -> DuplicateId:
        held = conn.in_flight[rid]
        return DuplicateId(
            f"request id {rid!r} is already in flight on this connection (a {held} request); this {op or 'request'} "
            "was not run. Ids must be unique among a connection's requests until their final answer",
            field="id",
            id=rid,
            in_flight_op=held,
        )

    async def _dispatch(self, conn: Connection, req: Request) -> None:
        """Answer `req` through its op's handler, under its server span; errors become error replies.
        Its id is held from here until its final answer (`Connection.begin`/`end`): a request reusing an
        id still in flight is refused with a connection-level `duplicate_id` and never run."""
        op = type(req).__struct_config__.tag
        if req.id in conn.in_flight:
            err = self._duplicate(conn, req.id, op)
            self.tel.metrics.error(err.code)
            await conn.send(error_reply(None, err, op=op))
            return
        call = start_server_call(
            self.tel,
            op,
            trace_context=req.trace_context,
            request_id=req.id,
            socket_path=str(self.config.socket_path),
        )
        conn.begin(req.id, op)
        answered_later = False
        try:
            self._check_limited(conn, req)
            reply = await self._handlers[type(req)](conn, req, call)
            if reply is None:  # a render / inspect ends its span (and frees its id) when its reply is sent
                answered_later = True
            else:
                conn.end(req.id)
                await conn.send(reply)
        except EaselError as err:
            call.set_error(err)
            conn.end(req.id)
            await conn.send(error_reply(req.id, err, op=op))
        except Exception as exc:  # a bug must not take the daemon down
            log.exception("request %r failed", req.id)
            call.set_error(exc)
            conn.end(req.id)
            await conn.send(error_reply(req.id, EaselError(f"internal error: {type(exc).__name__}: {exc}"), op=op))
        finally:
            if not answered_later:
                call.end()

    def _check_limited(self, conn: Connection, req: Request) -> None:
        """A connection let in over the limit becomes a full one once there is room; until then it may
        only ping, ask status, cancel and shut down."""
        if not conn.limited:
            return
        if sum(not c.limited for c in self.connections) < self.config.max_connections:
            conn.limited = False
        elif not isinstance(req, LIMITED_OPS):
            raise Busy(
                f"the daemon is at its limit of {self.config.max_connections} busy connections; this one may "
                "only ping, ask status, cancel and shut down until one closes; retry later",
                connections=len(self.connections),
            )

    # ---- operations -----------------------------------------------------------------------------

    async def _ping(self, conn: Connection, req: Ping, call: ServerCall) -> Reply:
        return Result(id=req.id, op="ping", result=PingResult(pong=True, version=self.version))

    async def _status(self, conn: Connection, req: Status, call: ServerCall) -> Reply:
        return Result(id=req.id, op="status", result=self.status())

    async def _render(self, conn: Connection, req: Render, call: ServerCall) -> None:
        replies = RenderReplies(conn, req, call, self._answered)
        job = self.runner.submit(req, replies, owner=conn.conn_id, trace_parent=call.context)
        if job.state != "done":  # a job answered inside `submit` has freed its id already
            conn.jobs[req.id] = job

    def _answered(self, job_id: str) -> None:
        self.answered_jobs[job_id] = None
        self.answered_jobs.move_to_end(job_id)
        while len(self.answered_jobs) > 16 * ANSWERED_MEMORY:
            self.answered_jobs.popitem(last=False)

    async def _preload(self, conn: Connection, req: Preload, call: ServerCall) -> None:
        """Waits for an idle render thread: in the background, not holding up this connection. A preload
        whose client goes away still runs (its stack is for the daemon's later renders). One cancelled
        before its work began (its cancel read with it, in one read) answers `cancelled` and does nothing."""

        async def work() -> PreloadResult:
            if req.id not in conn.unstarted_preloads:  # `_cancel` took it out
                raise Cancelled("preload cancelled before it ran")
            conn.unstarted_preloads.discard(req.id)
            return await self.runner.preload(req, owner=conn.conn_id)

        conn.unstarted_preloads.add(req.id)
        conn.spawn(self._answer(conn, req, call, "preload", work, record_preload))

    async def _inspect(self, conn: Connection, req: Inspect, call: ServerCall) -> None:
        """Reads a file: off the loop, and not holding up this connection."""
        work = functools.partial(
            asyncio.get_running_loop().run_in_executor, None, self.runner.service.inspect, req.path
        )
        conn.spawn(self._answer(conn, req, call, "inspect", work))

    async def _answer(
        self,
        conn: Connection,
        req: Request,
        call: ServerCall,
        op: str,
        work: Callable[[], Awaitable[Any]],
        record: Callable[[Any, Any], None] | None = None,
    ) -> None:
        """Answer `req` (in the background) with what `work()` gives, or with its error; `record(span,
        result)` tells the call's span what was done. Every path frees the id just before its answer,
        never after (it may be reused)."""
        try:
            result = await work()
        except EaselError as err:
            call.set_error(err)
            conn.end(req.id)
            await conn.send(error_reply(req.id, err, op=op))
        except Exception as exc:
            log.exception("%s %r failed", op, req.id)
            call.set_error(exc)
            conn.end(req.id)
            await conn.send(error_reply(req.id, EaselError(f"{op} failed: {type(exc).__name__}: {exc}"), op=op))
        else:
            if record is not None:
                record(call.span, result)
            conn.end(req.id)
            await conn.send(Result(id=req.id, op=op, result=result))
        finally:
            call.end()

    async def _cancel(self, conn: Connection, req: Cancel, call: ServerCall) -> Reply:
        """One result shape: `cancelled` true only for the cancel that stopped the job; `state` where the
        job was (queued, running, suspended, cancelling: an earlier cancel is stopping it, done: already answered,
        unknown: no such job); `job` its id, "" when the request named no job this daemon knows. A `preload`
        in flight on this connection, named by its request id, is dropped while it waits (it answers
        `cancelled`; state queued, job ""); one whose build runs stops at its next chunk (state running)."""
        if req.job is not None:
            job, answered = self.runner.get(req.job), req.job if req.job in self.answered_jobs else None
        else:
            job, answered = conn.jobs.get(req.target), conn.answered.get(req.target)
            if job is None and conn.in_flight.get(req.target) == "preload":
                if req.target in conn.unstarted_preloads:  # its work not begun (read in the same read): dropped
                    conn.unstarted_preloads.discard(req.target)
                    state = "queued"
                else:
                    state = self.runner.cancel_preload(conn.conn_id, req.target)
                return Result(id=req.id, op="cancel", result=CancelResult(state in ("queued", "running"), state, ""))
        if job is not None and job.state != "done":
            if job.cancel_event.is_set():
                result = CancelResult(cancelled=False, state="cancelling", job=job.job_id)
            else:
                state = await self.runner.cancel_verdict(job, self.runner.cancel(job))
                result = CancelResult(cancelled=state != "done", state=state, job=job.job_id)
        elif job is not None or answered is not None:
            result = CancelResult(cancelled=False, state="done", job=job.job_id if job is not None else answered)
        else:
            result = CancelResult(cancelled=False, state="unknown", job=req.job or "")
        return Result(id=req.id, op="cancel", result=result)

    async def _shutdown(self, conn: Connection, req: Shutdown, call: ServerCall) -> None:
        self.shutdown_requested = True  # before the reply: a `status` its client sends next says so
        self.runner.stop_accepting()
        conn.end(req.id)
        await conn.send(Result(id=req.id, op="shutdown", result=ShutdownResult(accepted=True)))
        call.end()
        self.request_stop(req.drain_timeout_s)  # once the reply is out

    # ---- greeting and status ---------------------------------------------------------------------

    def hello(self, conn: Connection) -> Hello:
        """The greeting every accepted connection gets first: protocol, version and what is accepted."""
        limits = self.runner.config.limits
        return Hello(
            protocol=PROTOCOL_VERSION,
            version=self.version,
            connection=conn.conn_id,
            limited=conn.limited,
            limits=ConnectionLimits(
                max_frame=self.config.max_frame,
                frame_timeout_s=self.config.frame_timeout_s,
                max_id_chars=MAX_ID_CHARS,
                max_stack=MAX_STACK,
                max_size=limits.max_size,
                max_steps=limits.max_steps,
                max_prompt_chars=limits.max_prompt_chars,
                queue_capacity=self.runner.queue.capacity,
                max_pixels=self.runner.max_pixels(),
            ),
        )

    def status(self) -> StatusResult:
        run = self.runner.status()
        return StatusResult(
            version=self.version,
            protocol=PROTOCOL_VERSION,
            preset=run.preset,
            model_loaded=True,
            warm=run.warm,
            uptime_s=time.monotonic() - self.started,
            pid=os.getpid(),
            socket=str(self.config.socket_path),
            active_stack=run.active_stack,
            lora_cache=run.lora_cache,
            resident_stacks=run.resident_stacks,
            lowrank_form=run.lowrank_form,
            queue_depth=run.queue_depth,
            queue_capacity=run.queue_capacity,
            interactive_reserve=run.interactive_reserve,
            queue=run.queue,
            step_times=run.step_times,
            shutting_down=run.shutting_down or self.shutdown_requested or self.stopping,
            renders_done=run.renders_done,
            stack_switches=run.stack_switches,
            in_flight=run.in_flight,
            suspended=run.suspended,
            model=run.model,
            preloads_waiting=run.preloads_waiting,
            preloads_yielded=run.preloads_yielded,
            preemptions=run.preemptions,
            heap=run.heap,
            output_root=run.output_root,
            lora_roots=run.lora_roots,
            max_pixels=run.max_pixels,
        )
