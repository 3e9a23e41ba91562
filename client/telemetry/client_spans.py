"""The client's side of a trace: a CLIENT span per request and the W3C context carried in the message.

The client library uses only the OpenTelemetry API: whatever SDK the application (the game server) set
up receives these spans; with none set up they cost nothing. The `easel` commands set one up from the
OTEL_* variables through client.telemetry.setup_telemetry(..., set_global=True).

    with client_span("render", message, socket_path=path) as span:   # adds message["trace_context"]
        response = send(message)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from client.wire.errors import EaselError

RPC_SYSTEM = "easel"
RPC_SERVICE = "easel.Daemon"
TRACER_NAME = "easel.client"

_W3C = TraceContextTextMapPropagator()


def inject_trace_context(message: dict[str, Any]) -> dict[str, Any]:
    """Set `message["trace_context"]` to the current span's traceparent/tracestate (no-op with no span)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    if carrier:
        message["trace_context"] = carrier
    return message


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, EaselError):
        return exc.code
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


@contextmanager
def client_span(
    method: str,
    message: dict[str, Any] | None = None,
    *,
    socket_path: str | None = None,
    tracer: Tracer | None = None,
) -> Iterator[Span]:
    """A CLIENT span `easel.Daemon/<method>` (RPC conventions); injects its context into `message`.

    An exception leaving the block is recorded with `error.type` (easel's wire code for EaselError).
    """
    tracer = tracer or trace.get_tracer(TRACER_NAME)
    full = f"{RPC_SERVICE}/{method}"
    attrs: dict[str, Any] = {"rpc.system.name": RPC_SYSTEM, "rpc.method": full, "network.transport": "unix"}
    if socket_path:
        attrs["server.address"] = str(socket_path)
    with tracer.start_as_current_span(
        full, kind=SpanKind.CLIENT, attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as span:
        if message is not None:
            inject_trace_context(message)
        try:
            yield span
        except BaseException as exc:
            etype = _error_type(exc)
            span.record_exception(exc)
            span.set_attribute("error.type", etype)
            span.set_status(Status(StatusCode.ERROR, str(exc) or etype))
            raise


def setup_command_telemetry(service_name: str = "easel-client") -> None:
    """For an `easel` command that talks to the daemon: export its client spans as the OTEL_* variables
    say (as the process's global SDK), flushed when the command ends. Nothing configured: nothing set up."""
    import click

    from client.telemetry.config import config_from_env
    from client.telemetry.setup import setup_telemetry

    config = config_from_env(service_name)
    if config.disabled or not (config.trace_exporters or config.metric_exporters):
        return
    tel = setup_telemetry(config=config, set_global=True)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(tel.shutdown)
    else:
        import atexit

        atexit.register(tel.shutdown)
