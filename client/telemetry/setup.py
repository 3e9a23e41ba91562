"""Build the tracer and meter providers from a TelemetryConfig; flush and close them on shutdown.

Exporting never runs on the render's thread: every exporter sits behind a BatchSpanProcessor (or the
periodic metric reader), whose bounded queue drops spans rather than block when a collector is down,
and OTLP requests time out after a few seconds (config.DEFAULT_EXPORT_TIMEOUT_S).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.version import __version__ as sdk_version
from opentelemetry.trace import Tracer

from client.telemetry.config import OtlpTarget, TelemetryConfig, config_from_env
from client.telemetry.jsonl import JsonlSpanExporter
from client.telemetry.metrics import Metrics

log = logging.getLogger("easel.telemetry")

INSTRUMENTATION_SCOPE = "easel"
JSONL_SCHEDULE_DELAY_MS = 200  # the tail should see a render within a fraction of a second


def _otlp_span_exporter(target: OtlpTarget) -> SpanExporter:
    if target.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return GrpcSpanExporter(endpoint=target.endpoint, timeout=target.timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

    return HttpSpanExporter(endpoint=target.endpoint, timeout=target.timeout_s)


def _otlp_metric_exporter(target: OtlpTarget):
    if target.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

        return GrpcMetricExporter(endpoint=target.endpoint, timeout=target.timeout_s)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

    return HttpMetricExporter(endpoint=target.endpoint, timeout=target.timeout_s)


def _resource(config: TelemetryConfig) -> Resource:
    return Resource(
        {
            "telemetry.sdk.language": "python",
            "telemetry.sdk.name": "opentelemetry",
            "telemetry.sdk.version": sdk_version,
            **config.resource_attributes,
        }
    )


@dataclass
class Telemetry:
    """The daemon's (or a command's) telemetry: a tracer, a meter, named metrics, and a flushing shutdown.

    With OTEL_SDK_DISABLED=true the providers are None and tracer/meter are the API's no-op ones, so
    callers never need to check.
    """

    config: TelemetryConfig
    tracer: Tracer
    meter: Meter
    metrics: Metrics
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    _closed: bool = field(default=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.tracer_provider is not None

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        """Export what is buffered now; False if something did not make it within the timeout."""
        ok = True
        if self.tracer_provider is not None:
            ok = self.tracer_provider.force_flush(int(timeout_s * 1000)) and ok
        if self.meter_provider is not None:
            ok = self.meter_provider.force_flush(int(timeout_s * 1000)) and ok
        return ok

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush, then close exporters. Idempotent; bounded by the exporters' own request timeouts."""
        if self._closed:
            return
        self._closed = True
        try:
            self.force_flush(timeout_s)
        finally:
            if self.tracer_provider is not None:
                self.tracer_provider.shutdown()
            if self.meter_provider is not None:
                self.meter_provider.shutdown(timeout_millis=timeout_s * 1000)


def setup_telemetry(
    service_name: str = "easel-daemon",
    *,
    env: Mapping[str, str] | None = None,
    config: TelemetryConfig | None = None,
    span_processors: Sequence[SpanProcessor] = (),
    metric_readers: Sequence[MetricReader] = (),
    set_global: bool = False,
) -> Telemetry:
    """Configure tracing and metrics from OTEL_* variables (or `config`).

    `span_processors` / `metric_readers` add to what the environment asks for (tests pass an in-memory
    exporter here). `set_global=True` also installs the providers as the process's global ones, so
    library code using `opentelemetry.trace.get_tracer` (the client library) reports through them.
    """
    config = config or config_from_env(service_name, env)
    if config.disabled:
        tracer = trace_api.NoOpTracer()
        meter = metrics_api.NoOpMeter(INSTRUMENTATION_SCOPE)
        return Telemetry(config=config, tracer=tracer, meter=meter, metrics=Metrics(meter))

    resource = _resource(config)
    tracer_provider = TracerProvider(resource=resource)
    for name in config.trace_exporters:
        if name == "otlp":
            assert config.traces_otlp is not None
            tracer_provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter(config.traces_otlp)))
        elif name == "console":
            tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        elif name == "jsonl":
            assert config.traces_file is not None
            exporter = JsonlSpanExporter(config.traces_file, max_bytes=config.traces_file_max_bytes)
            tracer_provider.add_span_processor(
                BatchSpanProcessor(exporter, schedule_delay_millis=JSONL_SCHEDULE_DELAY_MS)
            )
    for processor in span_processors:
        tracer_provider.add_span_processor(processor)

    readers: list[MetricReader] = []
    for name in config.metric_exporters:
        if name == "otlp":
            assert config.metrics_otlp is not None
            exporter = _otlp_metric_exporter(config.metrics_otlp)
            timeout_ms = config.metrics_otlp.timeout_s * 1000
        else:
            exporter = ConsoleMetricExporter(out=sys.stderr)
            timeout_ms = 5000
        readers.append(
            PeriodicExportingMetricReader(
                exporter, export_interval_millis=config.metric_interval_ms, export_timeout_millis=timeout_ms
            )
        )
    readers.extend(metric_readers)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)

    if set_global:
        trace_api.set_tracer_provider(tracer_provider)
        metrics_api.set_meter_provider(meter_provider)
    tracer = tracer_provider.get_tracer(INSTRUMENTATION_SCOPE)
    meter = meter_provider.get_meter(INSTRUMENTATION_SCOPE)
    log.debug("telemetry: traces=%s metrics=%s", config.trace_exporters, config.metric_exporters)
    return Telemetry(
        config=config,
        tracer=tracer,
        meter=meter,
        metrics=Metrics(meter),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )
