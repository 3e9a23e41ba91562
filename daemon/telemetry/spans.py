"""The spans the daemon emits: one server span per request, one `flux_mlx.render` span per render.
A `preload` is told on its server span (`record_preload`).

Integration is a few lines in the server and the render worker:

    # server, when a request is decoded (a render is answered later, from the worker):
    call = start_server_call(tel, req_op, trace_context=req.trace_context, request_id=req.id,
                             socket_path=str(socket_path))
    runner.submit(req, listener, trace_parent=call.context)  # call.context parents the render span
    ...                                                 # on an error reply: call.set_error(err)
    call.end()                                          # after the reply (result or error) was sent

    # render worker:
    with render_span(tel, spec, tier=tier, parent=job.trace_parent, enqueued_ns=job.enqueued_ns) as r:
        with r.phase("stack_switch"):
            report = patcher.apply_stack(entries)
        r.set_stack(report.files, switched=True)        # sets ERROR if any LoRA matched 0 keys
        out = model.render(spec)
        r.record_phases(out.timings)                    # text_encode, denoise, decode (seconds)
        with r.phase("write"):
            write_png(...)

For a request answered within one block, `with server_span(...) as call:` does start and end.

Span attributes follow the OpenTelemetry RPC conventions plus easel's own `render.*` set; docs/operations.md
lists them all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from client.telemetry.setup import Telemetry
from client.wire.errors import EaselError
from client.wire.messages import PreloadResult
from client.wire.report import FileReport, display_name
from daemon.render_spec import RenderSpec

RENDER_SPAN = "flux_mlx.render"
RPC_SYSTEM = "easel"
RPC_SERVICE = "easel.Daemon"
PHASES = ("queue_wait", "stack_switch", "text_encode", "denoise", "decode", "write")

_W3C = TraceContextTextMapPropagator()
_MAX_TRACEPARENT = 55  # version-traceid-spanid-flags, W3C Trace Context level 1
_MAX_TRACESTATE = 512


def error_type(exc: BaseException | str) -> str:
    """`error.type`: easel's stable wire code for its own errors, else the exception's qualified class name."""
    if isinstance(exc, str):
        return exc
    if isinstance(exc, EaselError):
        return exc.code
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def extract_context(trace_context: object) -> Context:
    """The W3C context a request carried in its `trace_context` field; malformed or absent gives a root context.

    Per W3C Trace Context, an invalid traceparent is ignored, never an error: tracing must not fail a request.
    """
    if not isinstance(trace_context, Mapping):
        return Context()
    carrier: dict[str, str] = {}
    tp = trace_context.get("traceparent")
    if isinstance(tp, str) and len(tp) <= _MAX_TRACEPARENT:
        carrier["traceparent"] = tp
        ts = trace_context.get("tracestate")
        if isinstance(ts, str) and len(ts) <= _MAX_TRACESTATE:
            carrier["tracestate"] = ts
    return _W3C.extract(carrier) if carrier else Context()


def inject_context(message: dict[str, Any], ctx: Context | None = None) -> dict[str, Any]:
    """Put the current (or given) span's W3C context into `message["trace_context"]`; returns the message."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=ctx)
    if carrier:
        message["trace_context"] = carrier
    return message


# --------------------------------------------------------------------------------------------------- server


class ServerCall:
    """Handle of one request's server span. `context` is what to carry to work done for it elsewhere.

    For a request answered later (a queued render), keep the handle with the job and call `end()` when
    the reply is sent; `server_span` does both for a request answered in one block.
    """

    def __init__(self, tel: Telemetry, span: Span, method: str) -> None:
        self.tel = tel
        self.span = span
        self.method = method
        self.context: Context = trace_api.set_span_in_context(span)
        self.error_type: str | None = None
        self._t0 = time.perf_counter()
        self._ended = False

    def set_error(self, error: BaseException | str, message: str | None = None) -> None:
        """Mark the call failed (an error response was sent): `error.type`, response code, status ERROR."""
        etype = error_type(error)
        self.error_type = etype
        self.span.set_attribute("error.type", etype)
        self.span.set_attribute("rpc.response.status_code", etype)
        if isinstance(error, BaseException):
            self.span.record_exception(error)
            message = message or str(error)
        self.span.set_status(Status(StatusCode.ERROR, message or etype))

    def end(self) -> None:
        """End the span and record the call's duration (and its error, if any). Idempotent."""
        if self._ended:
            return
        self._ended = True
        self.span.end()
        full = f"{RPC_SERVICE}/{self.method}"
        attrs = {"rpc.system.name": RPC_SYSTEM, "rpc.method": full}
        if self.error_type:
            attrs["error.type"] = self.error_type
            self.tel.metrics.error(self.error_type, full)
        self.tel.metrics.rpc_duration.record(time.perf_counter() - self._t0, attrs)


def start_server_call(
    tel: Telemetry,
    method: str,
    *,
    trace_context: object = None,
    request_id: object = None,
    socket_path: str | None = None,
) -> ServerCall:
    """Open a SERVER span for one request, child of the caller's span when it carried `trace_context`."""
    full = f"{RPC_SERVICE}/{method}"
    attrs: dict[str, Any] = {"rpc.system.name": RPC_SYSTEM, "rpc.method": full, "network.transport": "unix"}
    if socket_path:
        attrs["server.address"] = str(socket_path)
    if isinstance(request_id, (str, int)) and not isinstance(request_id, bool):
        attrs["easel.request.id"] = str(request_id)
    span = tel.tracer.start_span(full, context=extract_context(trace_context), kind=SpanKind.SERVER, attributes=attrs)
    return ServerCall(tel, span, method)


@contextmanager
def server_span(
    tel: Telemetry,
    method: str,
    *,
    trace_context: object = None,
    request_id: object = None,
    socket_path: str | None = None,
) -> Iterator[ServerCall]:
    """start_server_call + end() around a block; an exception leaving the block marks the call failed."""
    call = start_server_call(tel, method, trace_context=trace_context, request_id=request_id, socket_path=socket_path)
    token = context_api.attach(call.context)
    try:
        yield call
    except BaseException as exc:
        call.set_error(exc)
        raise
    finally:
        context_api.detach(token)
        call.end()


# --------------------------------------------------------------------------------------------------- render


def zero_match_message(files: Sequence[FileReport]) -> str | None:
    """The ERROR message when any LoRA matched zero keys (names them all), else None."""
    zeros = [f for f in files if f.keys_applied == 0]
    if not zeros:
        return None
    named = ", ".join(f"{f.display_name!r} ({f.path})" for f in zeros)
    return f"LoRA {named} matched 0 keys" if len(zeros) == 1 else f"LoRAs {named} matched 0 keys"


def stack_attributes(files: Sequence[FileReport], prefix: str) -> dict[str, Any]:
    """A stack's per-file accounting as span attributes under `prefix` (`render.lora`, `preload.lora`):
    names, files, scales, and how many keys of each file reached the model."""
    attrs: dict[str, Any] = {
        f"{prefix}.stack_size": len(files),
        f"{prefix}.names": [f.display_name for f in files],
        f"{prefix}.files": [f.path for f in files],
        f"{prefix}.scales": [float(f.scale) for f in files],
        f"{prefix}.matched_keys": [int(f.keys_applied) for f in files],
        f"{prefix}.total_keys": [int(f.keys_total) for f in files],
    }
    text_encoder_keys = [sum(n for p, n in f.keys_applied_by_part.items() if p != "transformer") for f in files]
    if any(text_encoder_keys):  # of matched_keys, those that reached CLIP-L / T5-XXL
        attrs[f"{prefix}.text_encoder_keys"] = text_encoder_keys
    return attrs


def record_preload(span: Span, result: PreloadResult) -> None:
    """What a `preload` did, on its server span: built or found, resident, its bytes and build time, and
    what each file matched (`preload.lora.*`, as a render's `render.lora.*`)."""
    span.set_attributes(
        {
            "preload.resident": result.resident,
            "preload.built": result.built,
            "preload.live": result.live,
            "preload.bytes": result.bytes,
            "preload.build_ms": result.build_ms,
            **stack_attributes(result.stack, "preload.lora"),
        }
    )


class RenderSpan:
    """Handle of one render's span: set the applied stack, time phases."""

    def __init__(self, tel: Telemetry, span: Span, start_ns: int) -> None:
        self.tel = tel
        self.span = span
        self.start_ns = start_ns
        self.context: Context = trace_api.set_span_in_context(span)
        self.phases: dict[str, float] = {}
        self.stack: list[FileReport] = []
        self.failed = False

    def set_attribute(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def set_requested(self, entries: Sequence[tuple[str | None, str, float]]) -> None:
        """The stack the request asked for, as (name, file, scale) in stack order, before the patcher has
        reported on it: a render whose stack fails to build still shows which stack it was. `set_stack`
        replaces these with the applied stack's attributes."""
        if entries:
            self.span.set_attributes(
                {
                    "render.lora.stack_size": len(entries),
                    "render.lora.names": [display_name(name, path) for name, path, _ in entries],
                    "render.lora.files": [path for _, path, _ in entries],
                    "render.lora.scales": [float(scale) for _, _, scale in entries],
                }
            )

    def set_stack(self, files: Sequence[FileReport], *, switched: bool | None = None) -> list[FileReport]:
        """Record the stack the patcher really applied (its per-file reports, in stack order); any zero
        in matched_keys sets status ERROR."""
        files = list(files)
        for f in files:
            if not isinstance(f, FileReport):
                raise TypeError(f"a render span's stack is a list of FileReport, not {type(f).__name__}")
        self.stack = files
        s = self.span
        s.set_attributes(stack_attributes(files, "render.lora"))
        if switched is not None:
            s.set_attribute("render.lora.stack_switched", switched)
            if switched:
                self.tel.metrics.stack_switched()
        message = zero_match_message(files)
        if message:
            for f in files:
                if f.keys_applied == 0:
                    s.add_event("lora.zero_match", {"lora.name": f.display_name, "lora.file": f.path})
            s.set_attribute("error.type", "lora_zero_match")
            self._fail(message)
        return files

    def _fail(self, message: str) -> None:
        if not self.failed:  # the first cause is the one the status names
            self.failed = True
            self.span.set_status(Status(StatusCode.ERROR, message))

    def record_phase(self, name: str, seconds: float, *, end_ns: int | None = None) -> None:
        """A phase that already happened: a child span `flux_mlx.<name>` ending at `end_ns` (default now)."""
        seconds = max(0.0, float(seconds))
        end = end_ns if end_ns is not None else time.time_ns()
        start = end - int(seconds * 1e9)
        child = self.tel.tracer.start_span(
            f"flux_mlx.{name}", context=self.context, start_time=start, attributes={"render.phase": name}
        )
        child.end(end_time=end)
        self.phases[name] = self.phases.get(name, 0.0) + seconds
        self.span.set_attribute(f"render.phase.{name}.duration", self.phases[name])

    def record_phases(self, timings: Mapping[str, float], *, end_ns: int | None = None) -> None:
        """Phases that ran back to back, in `timings`' order, the last ending at `end_ns` (default now)."""
        end = end_ns if end_ns is not None else time.time_ns()
        items = [(k, max(0.0, float(v))) for k, v in timings.items()]
        for name, seconds in reversed(items):
            self.record_phase(name, seconds, end_ns=end)
            end -= int(seconds * 1e9)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase as it runs (the phase is recorded even when it raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record_phase(name, time.perf_counter() - t0)


@contextmanager
def render_span(
    tel: Telemetry,
    spec: RenderSpec,
    *,
    tier: str | None = None,
    stack: Sequence[FileReport] | None = None,
    parent: Context | None = None,
    enqueued_ns: int | None = None,
    request_id: object = None,
) -> Iterator[RenderSpan]:
    """The `flux_mlx.render` span for one render.

    `parent` is the ServerCall.context the job carried (default: the current context). `enqueued_ns`
    (time.time_ns() when the job was queued) starts the span there and records the `queue_wait` phase.
    `stack` may be given now or later with `set_stack`. Exceptions are recorded, set status ERROR and
    `error.type`, and propagate.
    """
    now = time.time_ns()
    start = enqueued_ns if enqueued_ns is not None and enqueued_ns <= now else now
    attrs: dict[str, Any] = {
        "render.seed": spec.seed,
        "render.model": spec.preset,
        "render.width": spec.width,
        "render.height": spec.height,
        "render.steps": spec.steps,
        "render.guidance": spec.guidance,
    }
    if tier is not None:
        attrs["render.tier"] = str(tier)
    if isinstance(request_id, (str, int)) and not isinstance(request_id, bool):
        attrs["easel.request.id"] = str(request_id)
    span = tel.tracer.start_span(RENDER_SPAN, context=parent, start_time=start, attributes=attrs)
    handle = RenderSpan(tel, span, start)
    if enqueued_ns is not None:
        handle.record_phase("queue_wait", (now - start) / 1e9, end_ns=now)
    if stack is not None:
        handle.set_stack(stack)
    token = context_api.attach(handle.context)
    error: str | None = None
    try:
        yield handle
    except BaseException as exc:
        error = error_type(exc)
        span.record_exception(exc)
        span.set_attribute("error.type", error)
        handle._fail(str(exc) or error)
        tel.metrics.error(error, RENDER_SPAN)
        raise
    finally:
        context_api.detach(token)
        end = time.time_ns()
        span.end(end_time=end)
        metric_attrs: dict[str, Any] = {k: attrs[k] for k in ("render.model", "render.tier") if k in attrs}
        if handle.failed and not error:
            error = "lora_zero_match"  # rendered under a warn policy: still an error to count
            tel.metrics.error(error, RENDER_SPAN)
        if error:
            metric_attrs["error.type"] = error
        tel.metrics.record_render((end - start) / 1e9, metric_attrs)
