"""A real collector: rotel receives the daemon's OTLP export (HTTP and gRPC) and shows the render span.

rotel runs in the foreground on loopback ports with its debug exporter printing every received span
in detail to stdout (and a blackhole exporter, so nothing leaves the machine); the test reads that.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.reports import file_report

from daemon.render_spec import RenderSpec
from daemon.telemetry import render_span, server_span, setup_telemetry

rotel = pytest.importorskip("rotel", reason="rotel is in the dev extra (scripts/setup.sh installs it)")
ROTEL = Path(rotel.__file__).parent / "rotel-agent"
WAIT_S = 60  # upper bound for rotel to start / to print a received span; normally well under a second


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Rotel:
    def __init__(self, tmp: Path) -> None:
        self.grpc_port, self.http_port = _free_port(), _free_port()
        self.out = tmp / "rotel.out"
        cmd = [
            str(ROTEL),
            "start",
            "--otlp-grpc-endpoint",
            f"127.0.0.1:{self.grpc_port}",
            "--otlp-http-endpoint",
            f"127.0.0.1:{self.http_port}",
            "--exporter",
            "blackhole",
            "--debug-log",
            "traces",
            "--debug-log-verbosity",
            "detailed",
            "--batch-timeout",
            "50ms",
            "--pid-file",
            str(tmp / "rotel.pid"),
            "--log-file",
            str(tmp / "rotel.log"),
        ]
        self._fh = open(self.out, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env={"NO_COLOR": "1"})

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"rotel exited with {self.proc.returncode}:\n{self.text()}")
            return _accepts(self.http_port) and _accepts(self.grpc_port)

        _wait_for(ready, "rotel to listen")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._fh.close()


@pytest.fixture(scope="module")
def collector(tmp_path_factory) -> Iterator[Rotel]:
    r = Rotel(tmp_path_factory.mktemp("rotel"))
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop()


def _span_block(text: str, name: str, trace_hex: str) -> str:
    """rotel's detailed print of the span `name` in trace `trace_hex` (from its 'Span #' header to the next)."""
    for block in re.split(r"\n(?=\s*Span #\d+)", text):
        if re.search(rf"Name\s*:\s*{re.escape(name)}\s*$", block, re.M) and trace_hex in block:
            return block
    return ""


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_rotel_receives_the_render_span_with_its_lora_attributes(collector, protocol):
    port = collector.http_port if protocol == "http/protobuf" else collector.grpc_port
    tel = setup_telemetry(
        "easel-daemon",
        env={
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        },
    )
    spec = RenderSpec(prompt="a saloon at noon", width=64, height=64, steps=2, seed=99, preset="tiny")
    stack = [
        file_report(name="spaghetti_western", path="/loras/sw.safetensors", scale=0.8, keys_applied=38, keys_total=38),
        file_report(name="mccoy", path="/loras/mccoy.safetensors", scale=0.85, keys_applied=0, keys_total=24),
    ]
    with server_span(tel, "render") as call, render_span(tel, spec, tier="landscape", parent=call.context) as r:
        r.set_stack(stack, switched=True)
        r.record_phases({"text_encode": 0.2, "denoise": 1.5, "decode": 0.3})
        trace_hex = f"{r.span.get_span_context().trace_id:032x}"
    tel.shutdown()

    _wait_for(lambda: _span_block(collector.text(), "flux_mlx.render", trace_hex), "rotel to print the render span")
    block = _span_block(collector.text(), "flux_mlx.render", trace_hex)
    assert "render.tier: Str(landscape)" in block
    assert "render.seed: Int(99)" in block
    assert "render.model: Str(tiny)" in block
    assert "render.lora.stack_size: Int(2)" in block
    assert "render.lora.names: Slice(Str(spaghetti_western), Str(mccoy))" in block
    assert "render.lora.files: Slice(Str(/loras/sw.safetensors), Str(/loras/mccoy.safetensors))" in block
    assert "render.lora.scales: Slice(Double(0.8), Double(0.85))" in block
    assert "render.lora.matched_keys: Slice(Int(38), Int(0))" in block
    assert "render.phase.denoise.duration: Double(1.5)" in block
    assert "STATUS_CODE_ERROR" in block and "mccoy" in block
    server = _span_block(collector.text(), "easel.Daemon/render", trace_hex)
    assert "SPAN_KIND_SERVER" in server and "rpc.system.name: Str(easel)" in server
    assert "network.transport: Str(unix)" in server
    # the phases arrived as children in the same trace
    assert _span_block(collector.text(), "flux_mlx.denoise", trace_hex)
    assert "service.name: Str(easel-daemon)" in collector.text()
    assert "deployment.environment: Str(test)" in collector.text()
