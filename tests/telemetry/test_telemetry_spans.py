"""The daemon's spans and metrics, read back through the SDK's in-memory exporter and metric reader."""

from __future__ import annotations

import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from client.telemetry.client_spans import client_span, inject_trace_context
from client.wire.errors import LoraZeroMatch
from client.wire.report import FileReport
from daemon.render_spec import RenderSpec
from daemon.telemetry import (
    RENDER_DURATION_BUCKETS_S,
    TelemetryConfig,
    extract_context,
    render_span,
    server_span,
    setup_telemetry,
    zero_match_message,
)


@pytest.fixture
def tel():
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    t = setup_telemetry(
        config=TelemetryConfig(service_name="easel-test"),
        span_processors=[SimpleSpanProcessor(spans)],
        metric_readers=[reader],
    )
    t.spans = spans  # type: ignore[attr-defined]
    t.reader = reader  # type: ignore[attr-defined]
    yield t
    t.shutdown()


def _by_name(exporter: InMemorySpanExporter, name: str):
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert found, f"no span {name!r}; have {[s.name for s in exporter.get_finished_spans()]}"
    return found


SPEC = RenderSpec(prompt="a dusty town", width=512, height=320, steps=7, guidance=3.5, seed=1234, preset="tiny")


def _report(name, path, scale, applied, total):
    return FileReport(
        name=name,
        path=path,
        scale=scale,
        format="kohya",
        keys_applied=applied,
        keys_total=total,
        layers_patched=applied,
    )


STACK = [
    FileReport(
        name="western_land",
        path="/loras/western.safetensors",
        scale=0.8,
        format="kohya",
        keys_applied=120,
        keys_total=120,
        layers_patched=120,
    ),
    FileReport(
        name=None,
        path="/loras/dust_and_lead.safetensors",
        scale=0.55,
        format="kohya",
        keys_applied=7,
        keys_total=96,
        layers_patched=7,
    ),
]


def test_render_span_carries_every_spec_attribute(tel):
    with render_span(tel, SPEC, tier="landscape", stack=STACK, request_id="r-1"):
        pass
    (span,) = _by_name(tel.spans, "flux_mlx.render")
    a = span.attributes
    assert a["render.tier"] == "landscape"
    assert a["render.seed"] == 1234
    assert a["render.model"] == "tiny"
    assert a["render.width"] == 512
    assert a["render.height"] == 320
    assert a["render.steps"] == 7
    assert a["render.lora.stack_size"] == 2
    assert list(a["render.lora.names"]) == ["western_land", "dust_and_lead"]  # name defaults to the file stem
    assert list(a["render.lora.files"]) == ["/loras/western.safetensors", "/loras/dust_and_lead.safetensors"]
    assert list(a["render.lora.scales"]) == [0.8, 0.55]
    assert list(a["render.lora.matched_keys"]) == [120, 7]
    assert list(a["render.lora.total_keys"]) == [120, 96]
    assert a["easel.request.id"] == "r-1"
    assert span.status.status_code == StatusCode.UNSET


def test_any_zero_match_sets_error_naming_the_lora(tel):
    stack = [
        FileReport(
            name="good",
            path="/l/good.safetensors",
            scale=1.0,
            format="kohya",
            keys_applied=40,
            keys_total=40,
            layers_patched=40,
        ),
        FileReport(
            name="silent",
            path="/l/silent.safetensors",
            scale=0.7,
            format="kohya",
            keys_applied=0,
            keys_total=52,
            layers_patched=0,
        ),
        FileReport(
            name="fine",
            path="/l/fine.safetensors",
            scale=0.3,
            format="kohya",
            keys_applied=3,
            keys_total=3,
            layers_patched=3,
        ),
    ]
    with render_span(tel, SPEC, tier="portrait") as r:
        r.set_stack(stack)
    (span,) = _by_name(tel.spans, "flux_mlx.render")
    assert span.status.status_code == StatusCode.ERROR
    assert "silent" in span.status.description and "/l/silent.safetensors" in span.status.description
    assert "good" not in span.status.description and "fine" not in span.status.description
    assert list(span.attributes["render.lora.matched_keys"]) == [40, 0, 3]
    assert span.attributes["error.type"] == "lora_zero_match"
    assert [e.attributes["lora.name"] for e in span.events if e.name == "lora.zero_match"] == ["silent"]


def test_two_zero_matches_are_both_named():
    msg = zero_match_message(
        [
            FileReport(name="a", path="/a", scale=1, format="kohya", keys_applied=0, keys_total=0, layers_patched=0),
            FileReport(name="b", path="/b", scale=1, format="kohya", keys_applied=5, keys_total=5, layers_patched=5),
            FileReport(name="c", path="/c", scale=1, format="kohya", keys_applied=0, keys_total=0, layers_patched=0),
        ]
    )
    assert msg is not None and "'a'" in msg and "'c'" in msg and "'b'" not in msg


def test_no_zero_means_no_error(tel):
    with render_span(tel, SPEC, tier="scene") as r:
        r.set_stack(
            [
                FileReport(
                    name="one", path="/one", scale=1.0, format="kohya", keys_applied=1, keys_total=1, layers_patched=1
                )
            ]
        )
    (span,) = _by_name(tel.spans, "flux_mlx.render")
    assert span.status.status_code != StatusCode.ERROR


def test_empty_stack_is_recorded_as_such(tel):
    with render_span(tel, SPEC, tier="scene", stack=[]):
        pass
    (span,) = _by_name(tel.spans, "flux_mlx.render")
    assert span.attributes["render.lora.stack_size"] == 0
    assert list(span.attributes["render.lora.matched_keys"]) == []
    assert span.status.status_code == StatusCode.UNSET


def test_exception_is_recorded_and_propagates(tel):
    with pytest.raises(LoraZeroMatch), render_span(tel, SPEC, tier="scene"):
        raise LoraZeroMatch("LoRA 'x' matched 0 keys of the loaded model", path="/x")
    (span,) = _by_name(tel.spans, "flux_mlx.render")
    assert span.status.status_code == StatusCode.ERROR
    assert "matched 0 keys" in span.status.description
    assert span.attributes["error.type"] == "lora_zero_match"
    exc_events = [e for e in span.events if e.name == "exception"]
    assert exc_events and exc_events[0].attributes["exception.type"].endswith("LoraZeroMatch")


def test_non_easel_exception_gets_class_name_as_error_type(tel):
    with pytest.raises(MemoryError), render_span(tel, SPEC):
        raise MemoryError("out of memory")
    (span,) = _by_name(tel.spans, "flux_mlx.render")
    assert span.attributes["error.type"] == "MemoryError"


def test_phases_are_child_spans_and_durations(tel):
    enq = time.time_ns() - 250_000_000
    with render_span(tel, SPEC, tier="landscape", enqueued_ns=enq) as r:
        with r.phase("stack_switch"):
            pass
        r.set_stack(STACK, switched=True)
        r.record_phases({"text_encode": 0.5, "denoise": 2.0, "decode": 0.25})
        with r.phase("write"):
            pass
    (span,) = _by_name(tel.spans, "flux_mlx.render")
    a = span.attributes
    for name in ("queue_wait", "stack_switch", "text_encode", "denoise", "decode", "write"):
        assert f"render.phase.{name}.duration" in a, name
        (child,) = _by_name(tel.spans, f"flux_mlx.{name}")
        assert child.parent.span_id == span.context.span_id
        assert child.context.trace_id == span.context.trace_id
        assert child.end_time - child.start_time == pytest.approx(a[f"render.phase.{name}.duration"] * 1e9, abs=1e3)
    assert a["render.phase.denoise.duration"] == 2.0
    assert a["render.phase.queue_wait.duration"] >= 0.25
    assert span.start_time == enq  # the render span covers the wait the client saw
    # record_phases lays phases end to end in order
    te, dn, dc = (_by_name(tel.spans, f"flux_mlx.{n}")[0] for n in ("text_encode", "denoise", "decode"))
    assert te.end_time == dn.start_time and dn.end_time == dc.start_time
    assert a["render.lora.stack_switched"] is True


def test_server_span_follows_rpc_conventions(tel):
    with server_span(tel, "render", request_id=7, socket_path="/run/easel.sock"):
        pass
    (span,) = _by_name(tel.spans, "easel.Daemon/render")
    assert span.kind == SpanKind.SERVER
    a = span.attributes
    assert a["rpc.system.name"] == "easel"
    assert a["rpc.method"] == "easel.Daemon/render"
    assert a["network.transport"] == "unix"
    assert a["server.address"] == "/run/easel.sock"
    assert a["easel.request.id"] == "7"
    assert "error.type" not in a


def test_server_span_error_response_sets_error_type(tel):
    with server_span(tel, "render") as call:
        call.set_error(LoraZeroMatch("nothing matched"))
    (span,) = _by_name(tel.spans, "easel.Daemon/render")
    assert span.attributes["error.type"] == "lora_zero_match"
    assert span.status.status_code == StatusCode.ERROR


def test_render_span_joins_the_server_span_of_its_request(tel):
    with server_span(tel, "render") as call:
        ctx = call.context
    with render_span(tel, SPEC, parent=ctx):  # as a worker would, after the request span ended
        pass
    (srv,) = _by_name(tel.spans, "easel.Daemon/render")
    (ren,) = _by_name(tel.spans, "flux_mlx.render")
    assert ren.parent.span_id == srv.context.span_id and ren.context.trace_id == srv.context.trace_id


def test_client_context_reaches_the_server_span(tel):
    """In-process W3C round trip; tests/test_telemetry_socket.py does it over a real socket."""
    provider = TracerProvider()
    client_spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(client_spans))
    message: dict = {"op": "render", "id": 1}
    with client_span("render", message, tracer=provider.get_tracer("t")) as cspan:
        assert message["trace_context"]["traceparent"].startswith("00-")
        with server_span(tel, "render", trace_context=message["trace_context"]):
            pass
    (srv,) = _by_name(tel.spans, "easel.Daemon/render")
    assert srv.context.trace_id == cspan.get_span_context().trace_id
    assert srv.parent.span_id == cspan.get_span_context().span_id
    (c,) = client_spans.get_finished_spans()
    assert c.kind == SpanKind.CLIENT and c.attributes["rpc.method"] == "easel.Daemon/render"


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "00-abc",
        {"traceparent": 5},
        {"traceparent": "zz" * 40},
        {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},
    ],
)
def test_malformed_trace_context_starts_a_new_trace(tel, bad):
    assert trace.get_current_span(extract_context(bad)).get_span_context().is_valid is False
    with server_span(tel, "ping", trace_context=bad):
        pass
    (span,) = _by_name(tel.spans, "easel.Daemon/ping")
    assert span.parent is None


def test_inject_without_a_span_adds_nothing():
    assert "trace_context" not in inject_trace_context({"op": "ping", "id": 1})


def test_set_stack_reads_the_patchers_file_reports():
    """The span reads the one per-file report type; a name defaults to the file's stem."""
    files = [
        FileReport(
            path="/a/b/c.safetensors", scale=0.5, format="kohya", keys_applied=3, keys_total=4, layers_patched=2
        ),
        FileReport(
            path="/d.safetensors", scale=1.0, format="bfl", keys_applied=0, keys_total=9, layers_patched=0, name="dee"
        ),
    ]
    tel = setup_telemetry(config=TelemetryConfig(service_name="t", disabled=True))
    with render_span(tel, SPEC, tier="scene") as r:
        entries = r.set_stack(files)
    assert entries == files
    assert [f.display_name for f in entries] == ["c", "dee"]
    assert zero_match_message(entries) == "LoRA 'dee' (/d.safetensors) matched 0 keys"
    with pytest.raises(TypeError), render_span(tel, SPEC, tier="scene") as r:
        r.set_stack([{"scale": 1.0}])


def _metric_points(reader: InMemoryMetricReader) -> dict[str, list]:
    out: dict[str, list] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data is not None else ():  # None: nothing recorded yet
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.setdefault(m.name, []).extend(m.data.data_points)
    return out


def test_preemptions_and_a_gateways_retries_and_cancel_outcomes_are_counters_an_exporter_reads(tel):
    tel.metrics.cluster_retried()
    tel.metrics.preempted()
    tel.metrics.preempted()
    for outcome in ("stopped", "stopped", "too_late", "no_word"):
        tel.metrics.cluster_cancel(outcome)
    pts = _metric_points(tel.reader)
    assert [p.value for p in pts["easel.cluster.retries"]] == [1]
    assert [p.value for p in pts["easel.render.preemptions"]] == [2]
    by_outcome = {p.attributes["easel.cancel.outcome"]: p.value for p in pts["easel.cluster.cancels"]}
    assert by_outcome == {"stopped": 2, "too_late": 1, "no_word": 1}


def test_metrics_render_duration_errors_switches_queue_cache(tel):
    with render_span(tel, SPEC, tier="landscape") as r:
        r.set_stack(STACK, switched=True)
    with pytest.raises(LoraZeroMatch), render_span(tel, SPEC, tier="landscape"):
        raise LoraZeroMatch("x")
    tel.metrics.set_queue_depth(3)
    from client.wire.messages import LoraCacheStats

    stats = LoraCacheStats(hits=2, misses=1, evictions=0, entries=1, bytes=4096, max_bytes=2**30)  # the real type
    resident = LoraCacheStats(hits=5, misses=2, evictions=1, entries=1, bytes=8192, max_bytes=2**30)
    tel.metrics.observe_lora_cache(lambda: stats, lambda: resident)
    pts = _metric_points(tel.reader)
    hist = pts["easel.render.duration"]
    assert sum(p.count for p in hist) == 2
    assert tuple(hist[0].explicit_bounds) == RENDER_DURATION_BUCKETS_S
    assert any(p.attributes.get("error.type") == "lora_zero_match" for p in hist)
    assert pts["easel.lora.stack.switches"][0].value == 1
    assert pts["easel.queue.depth"][0].value == 3
    assert pts["easel.lora.cache.hits"][0].value == 2
    assert pts["easel.lora.cache.misses"][0].value == 1
    assert pts["easel.lora.cache.size"][0].value == 4096
    assert [pts[f"easel.lora.resident.{n}"][0].value for n in ("hits", "misses", "evictions", "size")] == [
        5,
        2,
        1,
        8192,
    ]
    errors = {p.attributes["error.type"]: p.value for p in pts["easel.errors"]}
    assert errors == {"lora_zero_match": 1}


def test_heap_gauges_report_the_callbacks_counts_and_nothing_where_the_heap_cannot_be_read(tel):
    from client.wire.messages import HeapStats

    pts = _metric_points(tel.reader)
    assert "easel.heap.in_use" not in pts  # no source yet: no point
    heap: list[HeapStats | None] = [HeapStats(in_use_bytes=3 << 20, free_bytes=5 << 20, retain_bytes=2**31 - 1)]
    tel.metrics.observe_heap(lambda: heap[0])
    pts = _metric_points(tel.reader)
    assert [p.value for p in pts["easel.heap.in_use"]] == [3 << 20]
    assert [p.value for p in pts["easel.heap.free"]] == [5 << 20]
    heap[0] = None  # off glibc: the gauges stay silent rather than report a made-up zero
    pts = _metric_points(tel.reader)
    assert not pts.get("easel.heap.in_use") and not pts.get("easel.heap.free")


def test_disabled_sdk_is_a_silent_no_op():
    t = setup_telemetry(env={"OTEL_SDK_DISABLED": "true", "EASEL_TRACES_FILE": "/nonexistent/x.jsonl"})
    assert not t.enabled
    with server_span(t, "render") as call, render_span(t, SPEC, tier="x", parent=call.context) as r:
        r.set_stack(STACK)
        r.record_phases({"denoise": 1.0})
    t.metrics.set_queue_depth(1)
    t.shutdown()
