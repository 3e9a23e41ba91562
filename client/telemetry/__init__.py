"""OpenTelemetry shared by every easel process: OTEL_* configuration, provider set-up, the span file,
the metric instruments, and the client's side of a trace (a CLIENT span + W3C context in the message).

The daemon adds its own server and render spans on top of this (daemon/telemetry).
"""

from client.telemetry.client_spans import (
    RPC_SERVICE,
    RPC_SYSTEM,
    TRACER_NAME,
    client_span,
    inject_trace_context,
    setup_command_telemetry,
)
from client.telemetry.config import TelemetryConfig, TelemetryConfigError, config_from_env, default_traces_file
from client.telemetry.jsonl import JsonlSpanExporter, span_to_record
from client.telemetry.metrics import RENDER_DURATION_BUCKETS_S, Metrics
from client.telemetry.setup import Telemetry, setup_telemetry

__all__ = [
    "RENDER_DURATION_BUCKETS_S",
    "RPC_SERVICE",
    "RPC_SYSTEM",
    "TRACER_NAME",
    "JsonlSpanExporter",
    "Metrics",
    "Telemetry",
    "TelemetryConfig",
    "TelemetryConfigError",
    "client_span",
    "config_from_env",
    "default_traces_file",
    "inject_trace_context",
    "setup_command_telemetry",
    "setup_telemetry",
    "span_to_record",
]
