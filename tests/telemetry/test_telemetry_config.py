"""OTEL_* resolution (pure) and what setup_telemetry builds from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from client.telemetry.config import parse_resource_attributes
from daemon.telemetry import JsonlSpanExporter, TelemetryConfigError, config_from_env, setup_telemetry


def test_defaults_export_nothing_and_name_the_service():
    c = config_from_env("easel-daemon", {})
    assert c.service_name == "easel-daemon"
    assert c.resource_attributes == {"service.name": "easel-daemon"}
    assert c.trace_exporters == () and c.metric_exporters == ()
    assert not c.disabled


def test_service_name_and_resource_attributes():
    env = {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod, team=art%20dept,service.name=x"}
    c = config_from_env("easel-daemon", env)
    assert c.resource_attributes == {"deployment.environment": "prod", "team": "art dept", "service.name": "x"}
    c = config_from_env("easel-daemon", {**env, "OTEL_SERVICE_NAME": "renderer-eu"})
    assert c.service_name == "renderer-eu" and c.resource_attributes["service.name"] == "renderer-eu"
    with pytest.raises(TelemetryConfigError, match="OTEL_RESOURCE_ATTRIBUTES"):
        parse_resource_attributes("novalue")


def test_otlp_means_http_protobuf_by_default_as_the_spec_says():
    c = config_from_env("s", {"OTEL_TRACES_EXPORTER": "otlp"})
    assert c.traces_otlp is not None
    assert c.traces_otlp.protocol == "http/protobuf"
    assert c.traces_otlp.endpoint == "http://localhost:4318/v1/traces"
    assert c.traces_otlp.timeout_s == 3.0


def test_otlp_protocol_grpc_and_endpoints():
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:9999/custom",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1.5",
    }
    c = config_from_env("s", env)
    assert (c.traces_otlp.protocol, c.traces_otlp.endpoint, c.traces_otlp.timeout_s) == (
        "grpc",
        "http://collector:4317",
        1.5,
    )
    # signal-specific variables win; a signal endpoint is used as-is
    assert (c.metrics_otlp.protocol, c.metrics_otlp.endpoint) == ("http/protobuf", "http://m:9999/custom")


def test_http_base_endpoint_gets_the_signal_path():
    c = config_from_env("s", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://col:4318/"})
    # an endpoint alone turns OTLP on for both signals
    assert c.trace_exporters == ("otlp",) and c.metric_exporters == ("otlp",)
    assert c.traces_otlp.endpoint == "http://col:4318/v1/traces"
    assert c.metrics_otlp.endpoint == "http://col:4318/v1/metrics"


def test_traces_file_turns_on_jsonl(tmp_path):
    c = config_from_env("s", {"EASEL_TRACES_FILE": str(tmp_path / "t.jsonl")})
    assert c.trace_exporters == ("jsonl",) and c.traces_file == tmp_path / "t.jsonl"
    c = config_from_env("s", {"OTEL_TRACES_EXPORTER": "jsonl,console", "XDG_STATE_HOME": str(tmp_path)})
    assert c.trace_exporters == ("jsonl", "console")
    assert c.traces_file == tmp_path / "easel" / "traces.jsonl"


def test_none_and_disabled():
    c = config_from_env("s", {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"})
    assert c.trace_exporters == ()
    assert config_from_env("s", {"OTEL_SDK_DISABLED": "TRUE"}).disabled


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_METRICS_EXPORTER": "jsonl"}, "OTEL_METRICS_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "none,otlp"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "soon"},
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        ),
        ({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED"),
        ({"EASEL_TRACES_FILE": "/tmp/x", "EASEL_TRACES_FILE_MAX_BYTES": "-1"}, "EASEL_TRACES_FILE_MAX_BYTES"),
    ],
)
def test_bad_values_name_the_variable(env, variable):
    with pytest.raises(TelemetryConfigError) as info:
        config_from_env("s", env)
    assert variable in str(info.value)
    assert info.value.details["variable"] == variable


def _exporters(tel):
    procs = tel.tracer_provider._active_span_processor._span_processors
    assert all(isinstance(p, BatchSpanProcessor) for p in procs)  # never synchronous export on a render
    return [p._batch_processor._exporter for p in procs]


def test_setup_builds_the_configured_exporters(tmp_path: Path):
    tel = setup_telemetry(
        env={
            "OTEL_TRACES_EXPORTER": "otlp,console,jsonl",
            "EASEL_TRACES_FILE": str(tmp_path / "spans.jsonl"),
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
        }
    )
    try:
        kinds = [type(e) for e in _exporters(tel)]
        assert kinds == [HttpSpanExporter, ConsoleSpanExporter, JsonlSpanExporter]
        assert tel.tracer_provider.resource.attributes["service.name"] == "easel-daemon"
    finally:
        tel.shutdown()
    tel = setup_telemetry(env={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    try:
        assert [type(e) for e in _exporters(tel)] == [GrpcSpanExporter]
    finally:
        tel.shutdown()
