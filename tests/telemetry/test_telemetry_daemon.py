"""Issue 6's evidence end to end: a real `easel serve --preset tiny` process exporting its spans to a
JSON-lines span file and, over OTLP/HTTP, to a real rotel collector, driven by the real RenderClient
with an in-memory tracer provider on the client's side.

One daemon (4 GB) for the whole module. Renders are 64x64, one step, with real kohya LoRA files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers.lora_factories import make_lora
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from client.cli import main as easel
from client.client import RenderClient
from client.wire.errors import LoraZeroMatch

try:
    from test_telemetry_rotel import Rotel, _span_block
except pytest.skip.Exception:  # rotel is in the dev extra; without it the collector test alone is skipped
    Rotel = None

pytestmark = pytest.mark.model

W = 3072
LAYOUT = {  # the tiny transformer's shapes for the modules the test LoRAs touch
    "transformer_blocks.0.attn.to_q": (W, W),
    "transformer_blocks.0.attn.to_out.0": (W, W),
    "single_transformer_blocks.0.proj_out": (W, 5 * W),
}
NOTHING = {"transformer_blocks.7.attn.to_out.0": (W, W)}  # a block tiny does not have: matches 0 keys
SIZE = dict(width=64, height=64, steps=1)
WAIT_S = 60
PHASES = ("queue_wait", "stack_switch", "text_encode", "denoise", "decode", "write")


class TracedDaemon:
    """`easel serve` with the span file (and OTLP to rotel when there is one) switched on by OTEL_* variables."""

    def __init__(self, root: Path, otlp_port: int | None) -> None:
        self.root = root
        self.socket = root / "run" / "easel.sock"
        self.loras = root / "loras"
        self.traces = root / "traces.jsonl"
        self.log = root / "serve.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "EASEL_TRACES_FILE": str(self.traces)}
        env |= {"OTEL_TRACES_EXPORTER": "jsonl", "OTEL_METRICS_EXPORTER": "none", "OTEL_SDK_DISABLED": "false"}
        if otlp_port is not None:
            env["OTEL_TRACES_EXPORTER"] = "jsonl,otlp"
            env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"http://127.0.0.1:{otlp_port}/v1/traces"
            env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
            env["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # the OTLP batch goes out within a fraction of a second
        cmd = [sys.executable, "-c", "from client.cli import main; main()", "serve", "--preset", "tiny"]
        cmd += ["--socket", str(self.socket), "--lora-root", str(self.loras), "--output-root", str(root / "out")]
        self._fh = open(self.log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([*cmd, "--no-warmup"], stdout=self._fh, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 600
        while "ready on" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"easel serve did not start:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.2)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._fh.close()
        return self.proc.returncode

    def records(self) -> list[dict]:
        if not self.traces.exists():
            return []
        return [json.loads(line) for line in self.traces.read_text().splitlines() if line.strip()]

    def trace(self, trace_id: str, *names: str) -> dict[str, dict]:
        """The span file's spans of one trace by name, once every one of `names` is there."""
        deadline = time.monotonic() + WAIT_S
        while True:
            spans = {r["name"]: r for r in self.records() if r["trace_id"] == trace_id}
            if all(n in spans for n in names):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"span file lacks {set(names) - set(spans)} for trace {trace_id}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    if Rotel is None:
        yield None
        return
    r = Rotel(tmp_path_factory.mktemp("rotel"))
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, collector):
    root = tmp_path_factory.mktemp("traced")
    (root / "loras").mkdir()
    for name, mods in (("western", ["attn.to_out.0"]), ("dust", ["single_transformer_blocks.0.proj_out"])):
        make_lora("kohya", root / "loras" / f"{name}.safetensors", LAYOUT, rank=4, alpha=4, modules=mods)
    make_lora("kohya", root / "loras" / "nothing.safetensors", NOTHING, rank=4, seed=4, modules=["attn.to_out.0"])
    d = TracedDaemon(root, collector.http_port if collector is not None else None)
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def _traced_client(d: TracedDaemon) -> tuple[RenderClient, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return RenderClient(d.socket, tracer_provider=provider), spans


@pytest.fixture(scope="module")
def stacked(daemon):
    """One render with a 2-LoRA stack: the client's span, the response, the daemon's spans of its trace."""
    client, client_spans = _traced_client(daemon)
    loras = [str(daemon.loras / "western.safetensors"), str(daemon.loras / "dust.safetensors")]
    with client:
        result = client.send_render(
            "a saloon at dusk", tier="landscape", seed=7, lora_paths=loras, lora_scales=[0.8, 0.6],
            lora_names=["western", "dust"], **SIZE,
        )  # fmt: skip
    (cs,) = client_spans.get_finished_spans()
    trace_id = f"{cs.context.trace_id:032x}"
    spans = daemon.trace(trace_id, "easel.Daemon/render", "flux_mlx.render", *(f"flux_mlx.{p}" for p in PHASES))
    return cs, result, spans, loras


def test_render_span_carries_the_stack_the_patcher_applied(stacked):
    _, result, spans, loras = stacked
    attrs = spans["flux_mlx.render"]["attributes"]
    assert attrs["render.tier"] == "landscape" and attrs["render.model"] == "tiny"
    shape = [attrs[f"render.{k}"] for k in ("seed", "width", "height", "steps")]
    assert shape == [7, 64, 64, 1]
    assert attrs["render.guidance"] == result.guidance
    assert attrs["render.lora.stack_size"] == 2
    assert attrs["render.lora.names"] == ["western", "dust"]
    assert attrs["render.lora.files"] == loras
    assert attrs["render.lora.scales"] == [0.8, 0.6]
    applied = [f.keys_applied for f in result.stack]
    assert all(n > 0 for n in applied)
    assert attrs["render.lora.matched_keys"] == applied == result.matched_keys
    assert attrs["render.lora.total_keys"] == [f.keys_total for f in result.stack]
    assert attrs["render.lora.stack_switched"] is True
    for phase in PHASES:
        assert attrs[f"render.phase.{phase}.duration"] >= 0, phase
    assert spans["flux_mlx.render"]["status"]["code"] == "UNSET"
    assert spans["flux_mlx.render"]["resource"]["service.name"] == "easel-daemon"


def test_client_server_and_render_spans_form_one_trace(stacked):
    cs, _, spans, _ = stacked
    assert cs.kind == SpanKind.CLIENT and cs.name == "easel.Daemon/render"
    server, render = spans["easel.Daemon/render"], spans["flux_mlx.render"]
    assert server["kind"] == "SERVER" and server["parent_span_id"] == f"{cs.context.span_id:016x}"
    assert server["attributes"]["rpc.method"] == "easel.Daemon/render"
    assert server["attributes"]["network.transport"] == "unix"
    assert render["parent_span_id"] == server["span_id"]
    for phase in PHASES:
        assert spans[f"flux_mlx.{phase}"]["parent_span_id"] == render["span_id"]
    assert {s["trace_id"] for s in spans.values()} == {f"{cs.context.trace_id:032x}"}


def test_zero_match_warn_render_span_is_error_naming_the_lora(daemon):
    client, client_spans = _traced_client(daemon)
    stack = [str(daemon.loras / "western.safetensors"), str(daemon.loras / "nothing.safetensors")]
    with client:
        result = client.send_render(
            "an empty street", lora_paths=stack, lora_scales=[1.0, 1.0], zero_match="warn", seed=3, **SIZE
        )
    assert result.matched_keys[1] == 0 and result.matched_keys[0] > 0
    (cs,) = client_spans.get_finished_spans()
    spans = daemon.trace(f"{cs.context.trace_id:032x}", "easel.Daemon/render", "flux_mlx.render")
    render = spans["flux_mlx.render"]
    assert render["attributes"]["render.lora.matched_keys"] == result.matched_keys
    assert render["status"]["code"] == "ERROR"
    assert "'nothing'" in render["status"]["message"] and "matched 0 keys" in render["status"]["message"]
    assert render["attributes"]["error.type"] == "lora_zero_match"
    assert [e["attributes"]["lora.name"] for e in render["events"] if e["name"] == "lora.zero_match"] == ["nothing"]
    assert spans["easel.Daemon/render"]["status"]["code"] == "UNSET"  # the request itself was answered


def test_zero_match_refused_render_span_shows_what_each_file_matched(daemon):
    """Under the error policy nothing reaches the model, but the span still names the stack it refused and
    what each file matched, so `traces tail` shows `nothing:0/N` beside the file that did match."""
    client, client_spans = _traced_client(daemon)
    stack = [str(daemon.loras / "western.safetensors"), str(daemon.loras / "nothing.safetensors")]
    with client, pytest.raises(LoraZeroMatch):
        client.send_render("an empty street", lora_paths=stack, lora_scales=[1.0, 0.5], seed=3, **SIZE)
    (cs,) = client_spans.get_finished_spans()
    spans = daemon.trace(f"{cs.context.trace_id:032x}", "easel.Daemon/render", "flux_mlx.render")
    attrs = spans["flux_mlx.render"]["attributes"]
    assert attrs["render.lora.names"] == ["western", "nothing"]
    assert attrs["render.lora.files"] == stack and attrs["render.lora.scales"] == [1.0, 0.5]
    matched, total = attrs["render.lora.matched_keys"], attrs["render.lora.total_keys"]
    assert matched[0] == total[0] > 0 and matched[1] == 0 and total[1] > 0
    assert attrs["render.lora.stack_switched"] is False and attrs["error.type"] == "lora_zero_match"
    assert "render.phase.denoise.duration" not in attrs


def test_rotel_receives_the_daemons_render_span(collector, stacked):
    if collector is None:
        pytest.skip("rotel is not installed")
    _, result, spans, _ = stacked
    trace_hex = spans["flux_mlx.render"]["trace_id"]
    deadline = time.monotonic() + WAIT_S
    while not (block := _span_block(collector.text(), "flux_mlx.render", trace_hex)):
        assert time.monotonic() < deadline, "rotel never printed the daemon's render span"
        time.sleep(0.2)
    matched = ", ".join(f"Int({n})" for n in result.matched_keys)
    assert f"render.lora.matched_keys: Slice({matched})" in block
    assert "render.lora.names: Slice(Str(western), Str(dust))" in block
    assert "render.tier: Str(landscape)" in block
    server = _span_block(collector.text(), "easel.Daemon/render", trace_hex)
    assert "SPAN_KIND_SERVER" in server


def test_traces_tail_prints_one_line_per_render(daemon, stacked):
    _, result, _, _ = stacked
    client, client_spans = _traced_client(daemon)
    with client:  # one more render, no LoRA
        client.send_render("a plain street", seed=1, **SIZE)
    (cs,) = client_spans.get_finished_spans()
    daemon.trace(f"{cs.context.trace_id:032x}", "flux_mlx.render")  # in the file now, with every earlier one
    renders = [r for r in daemon.records() if r["name"] == "flux_mlx.render"]
    out = CliRunner().invoke(
        easel, ["traces", "tail", "--file", str(daemon.traces), "--from-start", "--no-follow", "--no-color"]
    )
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert len(lines) == len(renders)
    totals = [f.keys_total for f in result.stack]
    expected = f"western:{result.matched_keys[0]}/{totals[0]} dust:{result.matched_keys[1]}/{totals[1]}"
    assert sum(expected in line for line in lines) == 1, lines
    assert sum("no-lora" in line for line in lines) >= 1, lines
