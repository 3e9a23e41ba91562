"""The daemon's spans (server calls, `flux_mlx.render`) on top of the shared set-up in client.telemetry.

    tel = setup_telemetry("easel-daemon")      # reads OTEL_* / EASEL_TRACES_FILE
    with server_span(tel, "render", trace_context=msg.get("trace_context")) as call: ...
    with render_span(tel, spec, tier=tier, parent=call.context) as r: r.set_stack(report.files); ...
    tel.shutdown()                             # flushes

See daemon/telemetry/spans.py for the integration recipe and docs/operations.md for the variables.
"""

from client.telemetry.config import TelemetryConfig, TelemetryConfigError, config_from_env, default_traces_file
from client.telemetry.jsonl import JsonlSpanExporter, span_to_record
from client.telemetry.metrics import RENDER_DURATION_BUCKETS_S, Metrics
from client.telemetry.setup import Telemetry, setup_telemetry
from daemon.telemetry.spans import (
    PHASES,
    RENDER_SPAN,
    RenderSpan,
    ServerCall,
    error_type,
    extract_context,
    inject_context,
    record_preload,
    render_span,
    server_span,
    stack_attributes,
    start_server_call,
    zero_match_message,
)

__all__ = [
    "PHASES",
    "RENDER_DURATION_BUCKETS_S",
    "RENDER_SPAN",
    "JsonlSpanExporter",
    "Metrics",
    "RenderSpan",
    "ServerCall",
    "Telemetry",
    "TelemetryConfig",
    "TelemetryConfigError",
    "config_from_env",
    "default_traces_file",
    "error_type",
    "extract_context",
    "inject_context",
    "record_preload",
    "render_span",
    "stack_attributes",
    "server_span",
    "setup_telemetry",
    "span_to_record",
    "start_server_call",
    "zero_match_message",
]
