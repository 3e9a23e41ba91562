"""Export paths: a collector that is down or hangs never holds a render up; the JSON-lines span file."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, Sequence

import pytest
from helpers.reports import file_report
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from daemon.render_spec import RenderSpec
from daemon.telemetry import JsonlSpanExporter, TelemetryConfig, render_span, server_span, setup_telemetry

SPEC = RenderSpec(prompt="a canyon", width=64, height=64, steps=2, seed=3, preset="tiny")
STACK = [file_report(name="canyon", path="/l/canyon.safetensors", scale=0.9, keys_applied=12, keys_total=12)]
# Generous: the exporters' own request timeout is 0.5 s here; shutdown must come back well within this.
SHUTDOWN_BOUND_S = 60


class HangingExporter(SpanExporter):
    """Blocks inside export until released: a collector that accepted the connection and never answers."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.exported: list[str] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait()
        self.exported.extend(s.name for s in spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_a_hanging_exporter_does_not_hold_renders_up():
    hang = HangingExporter()
    memory = InMemorySpanExporter()
    tel = setup_telemetry(
        config=TelemetryConfig(service_name="t"),
        span_processors=[BatchSpanProcessor(hang, schedule_delay_millis=10), SimpleSpanProcessor(memory)],
    )
    try:
        with render_span(tel, SPEC, tier="scene", stack=STACK):
            pass
        assert hang.entered.wait(30), "the batch processor never tried to export"
        # The exporter is now stuck in export() on its own thread; renders still start and finish.
        for _ in range(5):
            with server_span(tel, "render") as call, render_span(tel, SPEC, tier="scene", parent=call.context) as r:
                r.set_stack(STACK)
                r.record_phases({"denoise": 0.1})
        assert not hang.release.is_set()
        assert [s.name for s in memory.get_finished_spans()].count("flux_mlx.render") == 6
    finally:
        hang.release.set()
        tel.shutdown()
    assert "flux_mlx.render" in hang.exported


@pytest.fixture(params=["refused", "silent"])
def dead_collector(request) -> Iterator[int]:
    """A loopback port where no collector answers: nothing listening, or a listener that never replies."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if request.param == "refused":
        sock.close()
    else:
        sock.listen(64)
    yield port
    sock.close()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_unreachable_collector_neither_fails_nor_blocks(dead_collector, protocol):
    memory = InMemorySpanExporter()
    tel = setup_telemetry(
        env={
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{dead_collector}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "0.5",
            "OTEL_BSP_SCHEDULE_DELAY": "10",
        },
        span_processors=[SimpleSpanProcessor(memory)],
    )
    for i in range(3):
        with server_span(tel, "render") as call, render_span(tel, SPEC, tier="scene", parent=call.context) as r:
            r.set_stack(STACK)
            r.record_phases({"text_encode": 0.1, "denoise": 0.2, "decode": 0.1})
        tel.metrics.set_queue_depth(i)
    renders = [s for s in memory.get_finished_spans() if s.name == "flux_mlx.render"]
    assert len(renders) == 3  # every span still recorded
    done = threading.Event()

    def close() -> None:
        tel.shutdown(timeout_s=1.0)
        done.set()

    t = threading.Thread(target=close, daemon=True)
    t.start()
    assert done.wait(SHUTDOWN_BOUND_S), "shutdown did not return with the collector down"


def test_jsonl_span_file_has_one_record_per_span(tmp_path):
    path = tmp_path / "state" / "traces.jsonl"
    tel = setup_telemetry(env={"EASEL_TRACES_FILE": str(path)})
    with server_span(tel, "render") as call, render_span(tel, SPEC, tier="portrait", parent=call.context) as r:
        r.set_stack(STACK)
    tel.shutdown()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_name = {r["name"]: r for r in records}
    ren, srv = by_name["flux_mlx.render"], by_name["easel.Daemon/render"]
    assert ren["trace_id"] == srv["trace_id"] and ren["parent_span_id"] == srv["span_id"]
    assert ren["attributes"]["render.lora.matched_keys"] == [12]
    assert ren["attributes"]["render.tier"] == "portrait"
    assert ren["resource"]["service.name"] == "easel-daemon"
    assert srv["kind"] == "SERVER" and ren["status"]["code"] == "UNSET"


def test_jsonl_file_rotates_past_its_cap(tmp_path):
    path = tmp_path / "t.jsonl"
    exporter = JsonlSpanExporter(path, max_bytes=2000)
    memory = InMemorySpanExporter()
    tel = setup_telemetry(config=TelemetryConfig(service_name="t"), span_processors=[SimpleSpanProcessor(memory)])
    for _ in range(10):
        with render_span(tel, SPEC, tier="scene", stack=STACK):
            pass
    tel.shutdown()
    for span in memory.get_finished_spans():
        assert exporter.export([span]) == SpanExportResult.SUCCESS
    rotated = path.with_name("t.jsonl.1")
    assert rotated.exists()
    assert path.stat().st_size < 2000 + 2000  # one record past the cap at most
    lines = rotated.read_text().splitlines() + path.read_text().splitlines()
    assert all(json.loads(line)["name"] for line in lines)
