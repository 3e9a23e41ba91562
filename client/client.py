"""RenderClient and AsyncRenderClient: the daemon's protocol from the caller's side (no MLX, no mflux).

Both twins share the request builders, the reply interpretation and the retry policy; they differ only in
transport (a blocking socket vs asyncio streams). Errors come back as the daemon's typed exceptions
(client.wire.errors, rebuilt by wire code); a daemon that is absent, refuses or is too slow raises
DaemonUnavailable or Timeout instead of hanging.

    with RenderClient() as c:
        r = c.send_render("a saloon at dusk", width=512, height=512, steps=4,
                          lora_paths=["/loras/western.safetensors"], lora_scales=[0.8])
        print(r.image_path, r.matched_keys)
        c.preload(["/loras/night.safetensors"], [0.7])   # built now, so a later render switches at once
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import select
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from opentelemetry import context, trace
from opentelemetry.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from client.address import default_socket_path  # one rule for both ends
from client.telemetry import TRACER_NAME, client_span, inject_trace_context
from client.wire import framing
from client.wire.errors import (
    Busy,
    Cancelled,
    DaemonUnavailable,
    DuplicateId,
    EaselError,
    InvalidRequest,
    ProtocolError,
    Timeout,
    error_from_wire,
)
from client.wire.messages import (
    Cancel,
    CancelResult,
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
    Result,
    Shutdown,
    ShutdownResult,
    Status,
    StatusResult,
    check_request,
    decode_reply,
    encode,
)
from client.wire.report import FileReport

ProgressCallback = Callable[[Event], Any]
RequestT = TypeVar("RequestT", Render, Preload)

_W3C = TraceContextTextMapPropagator()

DEFAULT_TIMEOUT_S = 10.0  # ping, status, inspect, cancel, shutdown
DEFAULT_RENDER_TIMEOUT_S = 900.0  # one render, including its time in the queue
PARTING_READ_S = 1.0  # how long to look for the daemon's last word on a connection it closed


def _greeting(reply: Reply, path: Path) -> Hello:
    """The first frame of a connection: the daemon's greeting (accepted), or its refusal (raised)."""
    if isinstance(reply, Hello):
        return reply
    if isinstance(reply, Error):
        raise error_from_wire(msgspec.to_builtins(reply.error))
    raise ProtocolError(f"the daemon at {path} did not greet the connection (first frame: {type(reply).__name__})")


def _connection_error(reply: Error) -> EaselError:
    return error_from_wire(msgspec.to_builtins(reply.error))


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for `busy` only (a full queue); every other error is final. Exponential backoff + jitter."""

    attempts: int = 6
    initial_s: float = 0.25
    max_s: float = 5.0

    def delay(self, attempt: int) -> float:
        base = min(self.max_s, self.initial_s * (2**attempt))
        return base * (0.5 + random.random() / 2)


def build_render(
    prompt: str,
    *,
    lora_paths: Sequence[str | os.PathLike[str]] = (),
    lora_scales: Sequence[float] = (),
    lora_names: Sequence[str] | None = None,
    id: int | str = 0,
    **fields: Any,
) -> Render:
    """A checked Render message: wrong types, NaN/inf, mismatched stacks fail here, before any I/O."""
    for old in ("lora_path", "lora_scale"):
        if old in fields:
            raise InvalidRequest(
                f"`{old}` is not accepted: pass lists lora_paths=[...] and lora_scales=[...]", field=old
            )
    return _checked(Render, {"op": "render", "id": id, "prompt": prompt}, lora_paths, lora_scales, lora_names, fields)


def build_preload(
    lora_paths: Sequence[str | os.PathLike[str]],
    lora_scales: Sequence[float],
    *,
    lora_names: Sequence[str] | None = None,
    id: int | str = 0,
    **fields: Any,
) -> Preload:
    """A checked Preload message (a stack of at least one LoRA, as a render carries it), before any I/O."""
    return _checked(Preload, {"op": "preload", "id": id}, lora_paths, lora_scales, lora_names, fields)


def _checked(
    kind: type[RequestT],
    head: dict[str, Any],
    lora_paths: Sequence[str | os.PathLike[str]],
    lora_scales: Sequence[float],
    lora_names: Sequence[str] | None,
    fields: dict[str, Any],
) -> RequestT:
    """`kind` built from its head fields, its LoRA stack and the caller's other fields (None: left out),
    with the checks the daemon makes: a wrong type, NaN/inf, mismatched stacks fail here, before any I/O."""
    if isinstance(lora_paths, (str, os.PathLike)) or isinstance(lora_scales, (int, float)):
        raise InvalidRequest("lora_paths and lora_scales must be lists (one entry per LoRA)", field="lora_paths")
    raw: dict[str, Any] = {
        **head,
        "lora_paths": [os.fspath(p) for p in lora_paths],
        "lora_scales": list(lora_scales),
        **{k: v for k, v in fields.items() if v is not None},
    }
    if lora_names is not None:
        raw["lora_names"] = list(lora_names)
    try:
        req = msgspec.convert(raw, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"{head['op']}: {exc}") from None
    check_request(req)
    return req


def _connect_error(path: Path, exc: OSError) -> DaemonUnavailable:
    if isinstance(exc, FileNotFoundError):
        return DaemonUnavailable(f"no easel daemon socket at {path}; start one with `easel serve`", socket=str(path))
    if isinstance(exc, ConnectionRefusedError):
        with contextlib.suppress(OSError):
            if not stat.S_ISSOCK(path.stat().st_mode):  # a directory or a file, not a socket nobody listens on
                return DaemonUnavailable(f"{path} is not a socket (the daemon's socket path?)", socket=str(path))
        return DaemonUnavailable(
            f"nothing accepts connections on {path} (the daemon is not running; stale socket?)", socket=str(path)
        )
    if isinstance(exc, PermissionError):
        return DaemonUnavailable(f"no permission to connect to {path}", socket=str(path))
    return DaemonUnavailable(f"cannot connect to {path}: {exc}", socket=str(path))


def _readable(sock: socket.socket) -> bool:
    """Whether `sock` has something to read now (EOF included), without waiting or reading it."""
    try:
        ready, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):  # closed under us: as good as ended
        return True
    return bool(ready)


def check_timeout(name: str, value: Any) -> float:
    """`value` as a timeout: a positive, finite number of seconds (a socket takes 0 as "never block" and
    refuses a negative one with a bare ValueError; asyncio takes either as "already expired")."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


class _Shared:
    """What both twins share: ids, request construction, reply interpretation."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None,
        timeout: float,
        render_timeout: float,
        retry: RetryPolicy,
        max_frame: int,
        tracer_provider: TracerProvider | None,
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket_path()
        self._tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
        self.timeout = check_timeout("timeout", timeout)
        self.render_timeout = check_timeout("render_timeout", render_timeout)
        self.retry = retry
        self.max_frame = max_frame
        self._ids = itertools.count(1)
        self.hello: Hello | None = None  # the greeting of the current connection (protocol, version, limits)

    def _render_wait(self, timeout: float | None) -> float:
        """A render's or preload's own timeout, else the client's (0 is refused by `_call`, not defaulted)."""
        return self.render_timeout if timeout is None else timeout

    def _next_id(self) -> int:
        return next(self._ids)

    @contextlib.contextmanager
    def _traced(self, msg: Any) -> Iterator[Any]:
        """A CLIENT span around one request; yields the message carrying that span's W3C context.

        The span's parent is the caller's current span, or the `trace_context` the caller put in the
        message itself. With no OpenTelemetry SDK set up this costs next to nothing."""
        token = context.attach(_W3C.extract(msg.trace_context)) if msg.trace_context else None
        try:
            with client_span(type(msg).__struct_config__.tag, socket_path=str(self.socket_path), tracer=self._tracer):
                carrier = inject_trace_context({}).get("trace_context")
                yield msgspec.structs.replace(msg, trace_context=carrier) if carrier else msg
        finally:
            if token is not None:
                context.detach(token)

    def _no_greeting(self, waited_s: float) -> Timeout:
        return Timeout(
            f"the daemon at {self.socket_path} sent no greeting within {waited_s}s (a daemon older than "
            "protocol 2, or one too busy to answer)"
        )

    @staticmethod
    def _interpret(reply: Reply, on_progress: ProgressCallback | None) -> tuple[bool, Any]:
        """(done, value) for one reply to our request; raises the typed error of an error reply."""
        if isinstance(reply, Event):
            if on_progress is not None:
                on_progress(reply)
            return False, None
        if isinstance(reply, Error):
            raise error_from_wire(msgspec.to_builtins(reply.error))
        assert isinstance(reply, Result)
        return True, reply.result  # already its op's struct (decode_reply)


class RenderClient(_Shared):
    """Blocking client over one connection (opened lazily, reopened after a failure). Not thread-safe:
    use one per thread, or AsyncRenderClient for concurrency on one connection."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        render_timeout: float = DEFAULT_RENDER_TIMEOUT_S,
        retry: RetryPolicy = RetryPolicy(),
        max_frame: int = framing.DEFAULT_MAX_FRAME,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        super().__init__(socket_path, timeout, render_timeout, retry, max_frame, tracer_provider)
        self._sock: socket.socket | None = None

    def __enter__(self) -> RenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _connect(self, timeout: float | None = None) -> socket.socket:
        """The open connection, or a new one once the daemon has greeted it (within `timeout`, at most the
        client's own). A refused connection raises the daemon's reason (busy, peer_not_allowed). A kept
        connection the daemon has closed since the last call (it restarted, or closed an idle connection to
        make room) is replaced: between calls nothing is due on it, so anything readable there is its end."""
        if self._sock is not None and _readable(self._sock):
            self.close()
        if self._sock is None:
            wait = min(self.timeout, timeout) if timeout is not None else self.timeout
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(wait)
            try:
                s.connect(str(self.socket_path))
            except TimeoutError:
                s.close()
                raise Timeout(f"connecting to {self.socket_path} timed out after {self.timeout}s") from None
            except OSError as exc:
                s.close()
                raise _connect_error(self.socket_path, exc) from None
            try:  # accepted (a greeting) or refused (an error, then EOF): told before anything is written
                self.hello = _greeting(decode_reply(framing.recv_frame(s, self.max_frame)), self.socket_path)
            except TimeoutError:
                s.close()
                raise self._no_greeting(wait) from None
            except (framing.PeerClosed, ConnectionError):
                s.close()
                raise DaemonUnavailable(f"the daemon at {self.socket_path} closed the connection at once") from None
            except BaseException:
                s.close()
                raise
            self._sock = s
        return self._sock

    def _call(self, msg: Any, timeout: float, on_progress: ProgressCallback | None = None) -> Any:
        timeout = check_timeout("timeout", timeout)
        with self._traced(msg) as traced:
            return self._send(traced, timeout, on_progress)

    def _send(self, msg: Any, timeout: float, on_progress: ProgressCallback | None) -> Any:
        sock = self._connect(timeout)
        deadline = time.monotonic() + timeout
        try:
            sock.settimeout(timeout)
            sock.sendall(framing.encode_frame(encode(msg), self.max_frame))
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                reply = decode_reply(framing.recv_frame(sock, self.max_frame))
                if isinstance(reply, Error) and reply.id is None:  # connection-level
                    if reply.closing:  # the daemon closes this connection
                        self.close()
                    raise _connection_error(reply)  # else about our frame, the only one in flight
                if isinstance(reply, Hello) or reply.id != msg.id:
                    continue
                done, value = self._interpret(reply, on_progress)
                if done:
                    return value
        except TimeoutError:
            self.close()  # the stream position is unknown now; the daemon drops our jobs when we go
            raise Timeout(f"no answer from the daemon within {timeout}s", op=type(msg).__struct_config__.tag) from None
        except (framing.PeerClosed, ConnectionError, BrokenPipeError):
            parting = self._parting_error(sock)
            self.close()
            raise parting or DaemonUnavailable(f"the daemon at {self.socket_path} closed the connection") from None
        except ProtocolError:
            self.close()
            raise
        except EaselError:  # the daemon's answer to this request: the connection is fine
            raise
        except BaseException:  # interrupted (Ctrl-C), or the caller's progress callback raised: the daemon
            self.close()  # drops this connection's jobs as it goes, instead of rendering on for nobody
            raise

    def _parting_error(self, sock: socket.socket) -> EaselError | None:
        """The reason the daemon sent as it closed this connection (`busy`, `peer_not_allowed`), if any:
        a refused connection may be closed before our request is even written."""
        try:
            sock.settimeout(PARTING_READ_S)
            reply = decode_reply(framing.recv_frame(sock, self.max_frame))
        except (OSError, EaselError, framing.PeerClosed):
            return None
        if isinstance(reply, Error) and reply.id is None:
            return _connection_error(reply)
        return None

    def _with_retry(self, fn: Callable[[], Any]) -> Any:
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except Busy:
                if attempt == self.retry.attempts - 1:
                    raise
                time.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    # ---- operations -----------------------------------------------------------------------------

    def ping(self) -> PingResult:
        return self._call(Ping(id=self._next_id()), self.timeout)

    def status(self) -> StatusResult:
        return self._call(Status(id=self._next_id()), self.timeout)

    def inspect(self, path: str | os.PathLike[str]) -> FileReport:
        return self._call(Inspect(id=self._next_id(), path=os.fspath(path)), max(self.timeout, 60.0))

    def cancel(self, target: int | str | None = None, *, job: str | None = None) -> CancelResult:
        return self._call(Cancel(id=self._next_id(), target=target, job=job), self.timeout)

    def shutdown(self, drain_timeout_s: float | None = None) -> ShutdownResult:
        return self._call(Shutdown(id=self._next_id(), drain_timeout_s=drain_timeout_s), self.timeout)

    def send_render(
        self,
        prompt: str,
        *,
        lora_paths: Sequence[str | os.PathLike[str]] = (),
        lora_scales: Sequence[float] = (),
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> RenderResult:
        """Render one picture; fields as in docs/protocol.md (width, height, steps, seed, tier, ...).
        Retries with backoff while the daemon answers `busy`."""
        req = build_render(
            prompt, lora_paths=lora_paths, lora_scales=lora_scales, progress=on_progress is not None, **fields
        )

        def once() -> RenderResult:
            msg = msgspec.structs.replace(req, id=self._next_id())
            return self._call(msg, self._render_wait(timeout), on_progress)

        return self._with_retry(once)

    def preload(
        self,
        lora_paths: Sequence[str | os.PathLike[str]],
        lora_scales: Sequence[float],
        *,
        timeout: float | None = None,
        **fields: Any,
    ) -> PreloadResult:
        """Build a LoRA stack into the daemon's resident stacks without rendering, so the first render with
        it switches in one assignment; fields: lora_names, zero_match, deadline_s (docs/protocol.md). The
        daemon runs it when no render is queued or running; `timeout` (default: the render timeout)
        includes that wait."""
        req = build_preload(lora_paths, lora_scales, **fields)
        return self._with_retry(
            lambda: self._call(msgspec.structs.replace(req, id=self._next_id()), self._render_wait(timeout))
        )


class RenderClientPool:
    """A Renderer (client/renderer.py) that threads share: each calling thread renders on a RenderClient
    (a connection) of its own, made on its first render. What keeps several renders in flight from worker
    threads (`run_batch(..., workers=N)`): through a cluster gateway's socket they reach several replicas
    at once; a plain daemon queues them and renders one at a time. `options` go to each RenderClient."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, **options: Any) -> None:
        self.socket_path, self._options = socket_path, options
        self._local = threading.local()
        self._clients: list[RenderClient] = []
        self._lock = threading.Lock()

    def _client(self) -> RenderClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = RenderClient(self.socket_path, **self._options)
            with self._lock:
                self._clients.append(client)
        return client

    def send_render(self, prompt: str, **fields: Any) -> RenderResult:
        """`RenderClient.send_render` on this thread's connection."""
        return self._client().send_render(prompt, **fields)

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def __enter__(self) -> RenderClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_JOBS = ("render", "preload")  # requests that queue a job on the daemon, which a caller giving up cancels


class AsyncRenderClient(_Shared):
    """asyncio twin: many requests in flight on one connection, matched by id by a reader task."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        render_timeout: float = DEFAULT_RENDER_TIMEOUT_S,
        retry: RetryPolicy = RetryPolicy(),
        max_frame: int = framing.DEFAULT_MAX_FRAME,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        super().__init__(socket_path, timeout, render_timeout, retry, max_frame, tracer_provider)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task | None = None
        self._waiting: dict[Any, asyncio.Queue] = {}
        self._lock: asyncio.Lock | None = None
        self._broken: EaselError | None = None
        self._cancelling: set[asyncio.Task] = set()  # cancels of requests whose callers gave up, being sent
        self._connecting = asyncio.Lock()  # one connection at a time, however many calls need it at once

    async def __aenter__(self) -> AsyncRenderClient:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection. Calls still waiting on it end at once with `Cancelled`: the daemon cancels
        what a closed connection waited for. The client connects again on its next call."""
        await self._disconnect()
        if self._waiting:
            self._broken = Cancelled("the client was closed while this request waited for its answer")
            for q in self._waiting.values():
                q.put_nowait(None)

    async def _disconnect(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(BaseException):
                await self._pump
            self._pump = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None

    async def _connect(self) -> None:
        async with self._connecting:  # calls at once on a new (or broken) client share one connection
            if self._writer is None or self._broken is not None:
                await self._open()

    async def _open(self) -> None:
        await self._disconnect()
        self._broken = None
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path), limit=2**16), self.timeout
            )
        except TimeoutError:
            raise Timeout(f"connecting to {self.socket_path} timed out after {self.timeout}s") from None
        except OSError as exc:
            raise _connect_error(self.socket_path, exc) from None
        try:  # accepted (a greeting) or refused (an error, then EOF): told before anything is written
            first = await asyncio.wait_for(framing.read_frame(self._reader, self.max_frame), self.timeout)
            self.hello = _greeting(decode_reply(first), self.socket_path)
        except BaseException as exc:
            self._writer.close()
            self._writer = None
            if isinstance(exc, TimeoutError):
                raise self._no_greeting(self.timeout) from None
            if isinstance(exc, (framing.PeerClosed, ConnectionError)):
                raise DaemonUnavailable(f"the daemon at {self.socket_path} closed the connection at once") from None
            raise
        self._lock = asyncio.Lock()
        self._pump = asyncio.create_task(self._read_replies())

    async def _read_replies(self) -> None:
        assert self._reader is not None
        try:
            while True:
                reply = decode_reply(await framing.read_frame(self._reader, self.max_frame))
                if isinstance(reply, Error) and reply.id is None:
                    if reply.closing:  # the daemon closes this connection: every waiter gets this error
                        raise _connection_error(reply)
                    continue  # about a frame this client never sends (it checks ids before sending)
                q = self._waiting.get(getattr(reply, "id", None))
                if q is not None:
                    q.put_nowait(reply)
        except asyncio.CancelledError:
            raise
        except (framing.PeerClosed, ConnectionError):
            self._broken = DaemonUnavailable(f"the daemon at {self.socket_path} closed the connection")
        except EaselError as err:
            self._broken = err
        for q in self._waiting.values():
            q.put_nowait(None)

    async def _call(self, msg: Any, timeout: float, on_progress: ProgressCallback | None = None) -> Any:
        timeout = check_timeout("timeout", timeout)
        with self._traced(msg) as traced:
            return await self._send(traced, timeout, on_progress)

    async def _send(self, msg: Any, timeout: float, on_progress: ProgressCallback | None) -> Any:
        await self._connect()
        if msg.id in self._waiting:  # the daemon would refuse it; refusing here keeps the replies uncrossed
            raise DuplicateId(f"request id {msg.id!r} is already in flight on this connection", field="id", id=msg.id)
        q: asyncio.Queue = asyncio.Queue()
        self._waiting[msg.id] = q
        op = type(msg).__struct_config__.tag
        sent = answered = False
        try:
            async with asyncio.timeout(timeout):
                assert self._writer is not None and self._lock is not None
                async with self._lock:
                    self._writer.write(framing.encode_frame(encode(msg), self.max_frame))
                    sent = True
                    await self._writer.drain()
                while True:
                    reply = await q.get()
                    if reply is None:
                        raise self._broken or DaemonUnavailable("connection to the daemon lost")
                    if isinstance(reply, Event):
                        if on_progress is not None:
                            ret = on_progress(reply)
                            if asyncio.iscoroutine(ret):
                                await ret
                        continue
                    answered = True  # its result, or its error raised by _interpret
                    done, value = self._interpret(reply, None)
                    if done:
                        return value
        except TimeoutError:
            if op in _JOBS:  # do not leave a job behind that nobody waits for
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._send_only(Cancel(id=self._next_id(), target=msg.id)), 1.0)
            raise Timeout(f"no answer from the daemon within {timeout}s", op=op) from None
        except (ConnectionError, BrokenPipeError):
            if self._pump is not None:  # it reads the reason the daemon sent as it closed, if it sent one
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._pump), PARTING_READ_S)
            self._broken = self._broken or DaemonUnavailable(f"the daemon at {self.socket_path} closed the connection")
            raise self._broken from None
        except BaseException:
            # The caller gave up (its task cancelled, `asyncio.wait_for` timed out) or its progress callback
            # raised: the connection stays open, so the daemon would render on for nobody and hold up the
            # renders behind it. The cancel is sent from a task of its own, which this task's cancellation
            # cannot interrupt.
            if sent and not answered and op in _JOBS and self._broken is None:
                self._cancel_later(msg.id)
            raise
        finally:
            self._waiting.pop(msg.id, None)

    def _cancel_later(self, target: Any) -> None:
        """Send a `cancel` of request `target` from a task of its own (kept until it is written)."""

        async def send() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send_only(Cancel(id=self._next_id(), target=target)), 1.0)

        task = asyncio.get_running_loop().create_task(send())
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    async def _send_only(self, msg: Any) -> None:
        assert self._writer is not None and self._lock is not None
        async with self._lock:
            self._writer.write(framing.encode_frame(encode(msg)))
            await self._writer.drain()

    async def _with_retry(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        for attempt in range(self.retry.attempts):
            try:
                return await fn()
            except Busy:
                if attempt == self.retry.attempts - 1:
                    raise
                await asyncio.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    # ---- operations -----------------------------------------------------------------------------

    async def ping(self) -> PingResult:
        return await self._call(Ping(id=self._next_id()), self.timeout)

    async def status(self) -> StatusResult:
        return await self._call(Status(id=self._next_id()), self.timeout)

    async def inspect(self, path: str | os.PathLike[str]) -> FileReport:
        return await self._call(Inspect(id=self._next_id(), path=os.fspath(path)), max(self.timeout, 60.0))

    async def cancel(self, target: int | str | None = None, *, job: str | None = None) -> CancelResult:
        return await self._call(Cancel(id=self._next_id(), target=target, job=job), self.timeout)

    async def shutdown(self, drain_timeout_s: float | None = None) -> ShutdownResult:
        return await self._call(Shutdown(id=self._next_id(), drain_timeout_s=drain_timeout_s), self.timeout)

    async def send_render(
        self,
        prompt: str,
        *,
        lora_paths: Sequence[str | os.PathLike[str]] = (),
        lora_scales: Sequence[float] = (),
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        request_id: int | str | None = None,
        **fields: Any,
    ) -> RenderResult:
        """Render one picture; concurrent calls share the connection. `request_id` lets the caller
        cancel it with `cancel(request_id)` from another task."""
        req = build_render(
            prompt, lora_paths=lora_paths, lora_scales=lora_scales, progress=on_progress is not None, **fields
        )

        async def once() -> RenderResult:
            rid = request_id if request_id is not None else self._next_id()
            return await self._call(msgspec.structs.replace(req, id=rid), self._render_wait(timeout), on_progress)

        return await self._with_retry(once)

    async def preload(
        self,
        lora_paths: Sequence[str | os.PathLike[str]],
        lora_scales: Sequence[float],
        *,
        timeout: float | None = None,
        request_id: int | str | None = None,
        **fields: Any,
    ) -> PreloadResult:
        """As `RenderClient.preload`; concurrent calls share the connection (the daemon runs them in turn).
        `request_id` lets the caller cancel it with `cancel(request_id)` from another task while it waits."""
        req = build_preload(lora_paths, lora_scales, **fields)

        async def once() -> PreloadResult:
            msg = msgspec.structs.replace(req, id=request_id if request_id is not None else self._next_id())
            return await self._call(msg, self._render_wait(timeout))

        return await self._with_retry(once)
