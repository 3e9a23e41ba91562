"""One trace from client to render across the real Unix socket.

The real RenderClient sends a render carrying the W3C context of its CLIENT span; the real
DaemonServer and RenderService (over the stand-in engine of tests/daemon_standin.py) receive it; the
render's spans are opened with daemon.telemetry exactly as the service's `render_span` hook will open
them. The assertion is on the trace's shape, so it holds whether or not the server span is wired in
yet: every daemon span shares the client's trace id, and the top daemon span's parent is the client span.
"""

from __future__ import annotations

import contextlib

import pytest
from daemon_standin import InProcessDaemon, make_config
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from client.client import RenderClient
from client.telemetry import client_span
from daemon.errors import LoraZeroMatch
from daemon.telemetry import TelemetryConfig, extract_context, render_span, setup_telemetry


@pytest.fixture
def traced_daemon(tmp_path):
    daemon_spans = InMemorySpanExporter()
    tel = setup_telemetry(config=TelemetryConfig(service_name="easel-daemon"), span_processors=[
        SimpleSpanProcessor(daemon_spans)
    ])  # fmt: skip
    d = InProcessDaemon(make_config(tmp_path))
    service = d.service
    current: list = []
    original_switch = service.switch_stack

    @contextlib.contextmanager
    def traced_render(prepared):
        ctx = extract_context(prepared.trace_context)
        with render_span(tel, prepared.spec, tier=getattr(prepared, "tier", None), parent=ctx) as r:
            current.append(r)
            try:
                yield r
            finally:
                current.pop()
                r.record_phases({k: v for k, v in prepared.timings.items() if k != "stack_switch"})

    def traced_switch(prepared):
        switched = original_switch(prepared)
        current[-1].set_stack(service.active_report, switched=switched)
        return switched

    service.render_span = traced_render
    service.switch_stack = traced_switch
    d.start()
    d.tel, d.daemon_spans = tel, daemon_spans
    yield d
    d.stop(drain_timeout_s=0)
    tel.shutdown()


def _lora(d, name: str) -> str:
    p = d.config.lora_roots[0] / name
    p.write_bytes(b"stand-in")
    return str(p)


def _client_tracer():
    provider = TracerProvider()
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider.get_tracer("game-server"), spans


def _daemon_trace(daemon_spans, trace_id: int):
    spans = [s for s in daemon_spans.get_finished_spans() if s.context.trace_id == trace_id]
    assert spans, "no daemon span joined the client's trace"
    ids = {s.context.span_id for s in spans}
    tops = [s for s in spans if s.parent is None or s.parent.span_id not in ids]
    return spans, tops


def test_client_and_daemon_spans_form_one_trace(traced_daemon):
    tracer, client_spans = _client_tracer()
    a = _lora(traced_daemon, "western.safetensors")
    with RenderClient(traced_daemon.config.socket_path) as c:
        message: dict = {}
        with client_span("render", message, tracer=tracer) as span:
            result = c.send_render(
                "a saloon", width=64, height=64, steps=2, seed=11, lora_paths=[a], lora_scales=[0.75],
                trace_context=message["trace_context"],
            )  # fmt: skip
        client_ctx = span.get_span_context()
    assert result.matched_keys == [10]
    spans, tops = _daemon_trace(traced_daemon.daemon_spans, client_ctx.trace_id)
    assert len(tops) == 1 and tops[0].parent is not None
    assert tops[0].parent.span_id == client_ctx.span_id  # the daemon's span hangs under the client span
    (render,) = [s for s in spans if s.name == "flux_mlx.render"]
    assert render.attributes["render.lora.matched_keys"] == (10,)
    assert render.attributes["render.lora.files"] == (a,)
    assert render.attributes["render.lora.scales"] == (0.75,)
    assert render.attributes["render.seed"] == 11
    assert "render.phase.denoise.duration" in render.attributes
    (cs,) = client_spans.get_finished_spans()
    assert cs.context.trace_id == render.context.trace_id


def test_zero_match_over_the_socket_marks_the_render_span(traced_daemon):
    tracer, _ = _client_tracer()
    z = _lora(traced_daemon, "zero_style.safetensors")  # the stand-in patcher matches nothing in 'zero' files
    with RenderClient(traced_daemon.config.socket_path) as c:
        message: dict = {}
        with pytest.raises(LoraZeroMatch), client_span("render", message, tracer=tracer) as span:
            c.send_render(
                "x", width=64, height=64, steps=1, lora_paths=[z], lora_scales=[1.0],
                trace_context=message["trace_context"],
            )  # fmt: skip
        trace_id = span.get_span_context().trace_id
    spans, _ = _daemon_trace(traced_daemon.daemon_spans, trace_id)
    (render,) = [s for s in spans if s.name == "flux_mlx.render"]
    assert render.status.status_code == StatusCode.ERROR
    assert render.attributes["error.type"] == "lora_zero_match"
    assert "zero_style" in render.status.description
