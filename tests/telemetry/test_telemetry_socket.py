"""One trace from client to render across the real Unix socket, with the daemon's own wiring.

The real RenderClient (its CLIENT span from an in-memory tracer provider) talks to the real DaemonServer
and RenderService over the stand-in engine and patcher of tests/helpers/daemon_standin.py; the daemon reports
through a Telemetry with an in-memory exporter. The real model behind a real `easel serve` process is in
tests/test_telemetry_daemon.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from helpers.daemon_standin import InProcessDaemon, make_config
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from client.client import RenderClient
from client.telemetry.client_spans import client_span
from client.wire.errors import InvalidRequest, LoraNotFound, LoraZeroMatch
from daemon.telemetry import TelemetryConfig, setup_telemetry

pytestmark = pytest.mark.mlx  # starts a daemon: needs the daemon extra


@pytest.fixture
def traced_daemon(tmp_path):
    daemon_spans = InMemorySpanExporter()
    metrics = InMemoryMetricReader()
    tel = setup_telemetry(
        config=TelemetryConfig(service_name="easel-daemon"),
        span_processors=[SimpleSpanProcessor(daemon_spans)],
        metric_readers=[metrics],
    )
    d = InProcessDaemon(make_config(tmp_path), tel=tel)
    d.start()
    d.daemon_spans, d.metrics = daemon_spans, metrics
    yield d
    d.stop(drain_timeout_s=0)


@pytest.fixture
def client_tracing():
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider, spans


def _lora(d, name: str) -> str:
    p = d.config.lora_roots[0] / name
    p.write_bytes(b"stand-in")
    return str(p)


def _trace(daemon_spans, trace_id: int, *names: str) -> dict[str, object]:
    """The daemon's spans of one trace by name, once `names` (default: the server span) have ended.
    The daemon ends a server span just after writing its reply, so the client can be a moment ahead."""
    names = names or ("easel.Daemon/",)
    deadline = time.monotonic() + 10
    while True:
        spans = {s.name: s for s in daemon_spans.get_finished_spans() if s.context.trace_id == trace_id}
        if all(any(k.startswith(n) for k in spans) for n in names) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert spans, "no daemon span joined the client's trace"
    return spans


def test_client_server_and_render_spans_form_one_trace(traced_daemon, client_tracing):
    provider, client_spans = client_tracing
    a, b = _lora(traced_daemon, "western.safetensors"), _lora(traced_daemon, "dust.safetensors")
    with RenderClient(traced_daemon.config.socket_path, tracer_provider=provider) as c:
        result = c.send_render(
            "a saloon", tier="landscape", width=64, height=64, steps=2, seed=11,
            lora_paths=[a, b], lora_scales=[0.75, 0.5], lora_names=["western", "dust"],
        )  # fmt: skip
    (cs,) = client_spans.get_finished_spans()
    assert cs.name == "easel.Daemon/render" and cs.kind == SpanKind.CLIENT
    assert cs.attributes["server.address"] == str(traced_daemon.config.socket_path)
    spans = _trace(traced_daemon.daemon_spans, cs.context.trace_id)
    server, render = spans["easel.Daemon/render"], spans["flux_mlx.render"]
    assert server.kind == SpanKind.SERVER and server.parent.span_id == cs.context.span_id
    assert server.attributes["network.transport"] == "unix" and server.attributes["rpc.system.name"] == "easel"
    assert render.parent.span_id == server.context.span_id
    assert render.attributes["render.lora.matched_keys"] == tuple(result.matched_keys) == (10, 10)
    assert render.attributes["render.lora.total_keys"] == (10, 10)
    assert render.attributes["render.lora.names"] == ("western", "dust")
    assert render.attributes["render.lora.files"] == (a, b)
    assert render.attributes["render.lora.scales"] == (0.75, 0.5)
    assert render.attributes["render.lora.stack_switched"] is True
    assert render.attributes["render.tier"] == "landscape" and render.attributes["render.seed"] == 11
    for phase in ("queue_wait", "stack_switch", "text_encode", "denoise", "decode", "write"):
        assert f"render.phase.{phase}.duration" in render.attributes, phase
        assert spans[f"flux_mlx.{phase}"].parent.span_id == render.context.span_id
    # the server span covers the whole request: it ends after the render does
    assert server.end_time >= render.end_time and render.status.status_code == StatusCode.UNSET


def test_caller_span_and_explicit_trace_context_parent_the_client_span(traced_daemon, client_tracing):
    provider, client_spans = client_tracing
    tracer = provider.get_tracer("game-server")
    with RenderClient(traced_daemon.config.socket_path, tracer_provider=provider) as c:
        with tracer.start_as_current_span("quest-tick") as outer:
            c.ping()
        message: dict = {}
        with client_span("frame", message, tracer=tracer) as carried:
            pass  # a context carried by hand (from another thread or process), not the current span
        c.send_render("x", width=64, height=64, steps=1, trace_context=message["trace_context"])
    by_name = {s.name: s for s in client_spans.get_finished_spans()}
    ping, render = by_name["easel.Daemon/ping"], by_name["easel.Daemon/render"]
    assert ping.parent.span_id == outer.get_span_context().span_id
    assert render.parent.span_id == carried.get_span_context().span_id
    assert render.context.trace_id == carried.get_span_context().trace_id
    for cs in (ping, render):
        server = _trace(traced_daemon.daemon_spans, cs.context.trace_id)[cs.name]
        assert server.parent.span_id == cs.context.span_id


def test_error_replies_mark_the_server_span(traced_daemon, client_tracing):
    provider, client_spans = client_tracing
    with RenderClient(traced_daemon.config.socket_path, tracer_provider=provider) as c:
        with pytest.raises(LoraNotFound):
            c.send_render("x", width=64, height=64, steps=1, lora_paths=["missing.safetensors"], lora_scales=[1.0])
        with pytest.raises(InvalidRequest):
            c.send_render("x", width=64, height=64, steps=1, tier="no-such-tier")
    cs = client_spans.get_finished_spans()
    assert [s.attributes.get("error.type") for s in cs] == ["lora_not_found", "invalid_request"]
    for s in cs:
        server = _trace(traced_daemon.daemon_spans, s.context.trace_id)["easel.Daemon/render"]
        assert server.status.status_code == StatusCode.ERROR
        assert server.attributes["error.type"] == s.attributes["error.type"]


def test_zero_match_over_the_socket_marks_the_render_span(traced_daemon, client_tracing):
    provider, client_spans = client_tracing
    z = _lora(traced_daemon, "zero_style.safetensors")  # the stand-in patcher matches nothing in 'zero' files
    with RenderClient(traced_daemon.config.socket_path, tracer_provider=provider) as c:
        with pytest.raises(LoraZeroMatch):
            c.send_render("x", width=64, height=64, steps=1, lora_paths=[z], lora_scales=[1.0])
        warned = c.send_render("x", width=64, height=64, steps=1, lora_paths=[z], lora_scales=[1.0], zero_match="warn")
    assert warned.matched_keys == [0]
    refused, rendered = client_spans.get_finished_spans()
    render = _trace(traced_daemon.daemon_spans, refused.context.trace_id)["flux_mlx.render"]
    assert render.status.status_code == StatusCode.ERROR
    assert render.attributes["error.type"] == "lora_zero_match"
    assert "zero_style" in render.status.description
    spans = _trace(traced_daemon.daemon_spans, rendered.context.trace_id)
    render = spans["flux_mlx.render"]
    assert render.attributes["render.lora.matched_keys"] == (0,)
    assert render.status.status_code == StatusCode.ERROR and "'zero_style'" in render.status.description
    assert spans["easel.Daemon/render"].status.status_code != StatusCode.ERROR  # the request itself succeeded


def test_daemon_metrics_from_real_requests(traced_daemon):
    a = _lora(traced_daemon, "western.safetensors")
    with RenderClient(traced_daemon.config.socket_path) as c:
        c.send_render("a", width=64, height=64, steps=1, lora_paths=[a], lora_scales=[1.0])
        c.send_render("b", width=64, height=64, steps=1)
        with pytest.raises(LoraNotFound):
            c.send_render("x", width=64, height=64, steps=1, lora_paths=["missing.safetensors"], lora_scales=[1.0])
    deadline = time.monotonic() + 10
    while True:  # the last request's call ends (and counts its error) just after its reply was written
        points: dict[str, list] = {}
        for rm in traced_daemon.metrics.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    points[m.name] = list(m.data.data_points)
        if "easel.errors" in points or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert sum(p.value for p in points["easel.lora.stack.switches"]) == 2  # western, then the empty stack
    assert sum(p.count for p in points["easel.render.duration"]) == 2
    assert [p.value for p in points["easel.queue.depth"]] == [0]
    errors = {p.attributes["error.type"]: p.value for p in points["easel.errors"]}
    assert errors == {"lora_not_found": 1}
    if sys.platform.startswith("linux"):  # glibc's counts; the gauges stay silent where malloc has none
        heap = traced_daemon.service.heap_stats()
        assert heap is not None and heap.in_use_bytes > 0
        (in_use,) = points["easel.heap.in_use"]
        (free,) = points["easel.heap.free"]
        assert in_use.value > 1 << 20 and free.value >= 0  # this process's heap, read at the export


def test_a_dead_collector_neither_fails_renders_nor_stops_the_daemon_stopping(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tel = setup_telemetry(
        "easel-daemon",
        env={
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        },
    )
    d = InProcessDaemon(make_config(tmp_path), tel=tel).start()
    a = _lora(d, "western.safetensors")
    with RenderClient(d.config.socket_path) as c:
        results = [
            c.send_render("x", width=64, height=64, steps=1, seed=i, lora_paths=[a], lora_scales=[1.0])
            for i in range(3)
        ]
        assert c.ping().pong
    assert [r.matched_keys for r in results] == [[10]] * 3
    d.stop(drain_timeout_s=0)  # flushes into the dead collector: bounded by the export timeout, then returns
    assert not d.thread.is_alive()


def test_easel_render_command_exports_its_client_span_into_the_daemons_trace(traced_daemon, tmp_path):
    traces = tmp_path / "client-traces.jsonl"
    a = _lora(traced_daemon, "western.safetensors")
    env = {**os.environ, "EASEL_TRACES_FILE": str(traces), "OTEL_SERVICE_NAME": "quest-tool"}
    cmd = [sys.executable, "-c", "from client.cli import main; main()", "render", "a saloon", "--quiet"]
    cmd += ["--socket", str(traced_daemon.config.socket_path), "--lora", f"{a}:0.5", "--width", "64", "--height", "64"]
    r = subprocess.run([*cmd, "--steps", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    (client,) = [json.loads(line) for line in traces.read_text().splitlines()]  # flushed when the command ended
    assert client["name"] == "easel.Daemon/render" and client["kind"] == "CLIENT"
    assert client["resource"]["service.name"] == "quest-tool"
    server = _trace(traced_daemon.daemon_spans, int(client["trace_id"], 16))["easel.Daemon/render"]
    assert f"{server.parent.span_id:016x}" == client["span_id"]
