"""`easel traces tail` on a recorded span stream, following a live file, and as an OTLP/HTTP receiver."""

from __future__ import annotations

import gzip
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers.reports import file_report

from client.cli import main
from client.cli.traces import stop_on_signal
from client.traces import OtlpHttpReceiver, format_render, otlp_json_to_request, parse_record
from client.wire.errors import Cancelled, LoraNotFound
from daemon.render_spec import RenderSpec
from daemon.telemetry import render_span, server_span, setup_telemetry

WAIT_S = 60
SPEC = RenderSpec(prompt="the main street", width=64, height=96, steps=3, seed=5, preset="tiny")
GOOD = file_report(name="western", path="/l/western.safetensors", scale=0.8, keys_applied=120, keys_total=120)
DEAD = file_report(name="dust", path="/l/dust.safetensors", scale=0.5, keys_applied=0, keys_total=96)


def emit_renders(tel) -> None:
    """Three renders as the daemon would trace them: a zero-match one, a cancelled one, a clean one."""
    with server_span(tel, "render") as call, render_span(tel, SPEC, tier="landscape", parent=call.context) as r:
        with r.phase("stack_switch"):
            pass
        r.set_stack([GOOD, DEAD], switched=True)
        r.record_phases({"text_encode": 0.25, "denoise": 3.5, "decode": 0.5})
        with r.phase("write"):
            pass
    with (
        pytest.raises(Cancelled),
        server_span(tel, "render") as call,
        render_span(tel, SPEC, tier="portrait", parent=call.context) as r,
    ):
        r.set_stack([GOOD])
        raise Cancelled("client went away at step 2 of 3")
    with server_span(tel, "render") as call, render_span(tel, SPEC, tier="scene", parent=call.context) as r:
        r.set_stack([])
        r.record_phases({"text_encode": 0.25, "denoise": 3.5, "decode": 0.5})


@pytest.fixture
def recorded(tmp_path) -> Path:
    path = tmp_path / "traces.jsonl"
    tel = setup_telemetry(env={"EASEL_TRACES_FILE": str(path)})
    emit_renders(tel)
    tel.shutdown()
    return path


def test_tail_prints_one_line_per_render(recorded):
    result = CliRunner().invoke(main, ["traces", "tail", "--file", str(recorded), "--no-follow"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 3, lines
    first, second, third = lines
    assert re.match(r"\d\d:\d\d:\d\d  ERROR", first)
    for part in ("landscape", "tiny", "64x96", "s3", "western:120/120", "dust:0/96", "denoise 3.50s", "decode 0.50s"):
        assert part in first, part
    assert "switch " in first and "write " in first and "text 0.25s" in first
    assert "LoRA 'dust' (/l/dust.safetensors) matched 0 keys" in first
    assert "portrait" in second and "ERROR" in second and "client went away" in second
    assert "western:120/120" in second
    assert re.match(r"\d\d:\d\d:\d\d  ok ", third) and "scene" in third and "no-lora" in third
    assert "\x1b[" not in result.stdout  # not a terminal: no colour codes
    assert result.stderr == f"easel traces: reading {recorded}\n"  # not "following": it exits at the end


def test_tail_prints_a_render_refused_before_it_rendered_once(tmp_path):
    """A render answered with an error before any render (a LoRA not found, a size over the limits) has a
    server span and no render span: the tail showed nothing. It prints one line for it; a render that
    failed while rendering still prints only its render line."""
    path = tmp_path / "traces.jsonl"
    tel = setup_telemetry(env={"EASEL_TRACES_FILE": str(path)})
    emit_renders(tel)  # three renders, two of them failed: three lines
    with pytest.raises(LoraNotFound), server_span(tel, "render"):
        raise LoraNotFound("lora_paths[0]: no LoRA file at /l/gone.safetensors")
    with server_span(tel, "status"):
        pass
    tel.shutdown()
    result = CliRunner().invoke(main, ["traces", "tail", "--file", str(path), "--no-follow"])
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 4, lines
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d  ERROR  refused lora_not_found: lora_paths\[0\]: no LoRA file at /l/gone.safetensors",
        lines[3],
    )


def test_tail_colours_status_when_asked(recorded):
    result = CliRunner().invoke(main, ["traces", "tail", "--file", str(recorded), "--no-follow", "--color"])
    assert "\x1b[31m\x1b[1mERROR" in result.stdout  # red
    assert "\x1b[32mok" in result.stdout  # green


def test_tail_json_passes_every_span_through(recorded):
    result = CliRunner().invoke(main, ["traces", "tail", "--file", str(recorded), "--no-follow", "--json"])
    assert result.exit_code == 0
    out = [json.loads(line) for line in result.stdout.splitlines()]
    written = [json.loads(line) for line in recorded.read_text().splitlines()]
    assert out == written
    assert {r["name"] for r in out} >= {"flux_mlx.render", "easel.Daemon/render", "flux_mlx.denoise"}


def test_tail_skips_torn_and_foreign_lines(recorded):
    with open(recorded, "a") as f:
        f.write("not json\n[1, 2]\n{}\n")
    result = CliRunner().invoke(main, ["traces", "tail", "--file", str(recorded), "--no-follow"])
    assert result.exit_code == 0 and len(result.stdout.strip().splitlines()) == 3


def test_tail_missing_file_without_follow_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["traces", "tail", "--file", str(tmp_path / "none.jsonl"), "--no-follow"])
    assert result.exit_code != 0 and "no span file" in result.output


def test_format_render_marks_unknown_totals():
    rec = parse_record(
        json.dumps(
            {
                "name": "flux_mlx.render",
                "start_time_unix_nano": 1_000_000_000,
                "end_time_unix_nano": 3_500_000_000,
                "status": {"code": "UNSET"},
                "attributes": {"render.lora.names": ["a"], "render.lora.matched_keys": [4], "render.tier": "scene"},
            }
        )
    )
    line = format_render(rec)
    assert "a:4/?" in line and "total 2.50s" in line


# ---------------------------------------------------------------------------------------------- live follow


class Proc:
    """A running `easel traces tail` whose output lines are read on a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "easel"), "traces", "tail", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.errs: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.errs), daemon=True).start()

    @staticmethod
    def _pump(stream, q) -> None:
        for line in stream:
            q.put(line.rstrip("\n"))

    def next_line(self, q=None) -> str:
        try:
            return (q or self.lines).get(timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError(f"no output from easel traces tail (rc={self.proc.poll()})") from None

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def test_signal_handler_never_waits_on_the_lock_the_main_thread_holds():
    """The handler may run while `stop.wait()` holds the event's lock: it must return at once and the
    stop must land as soon as the lock is free (the tail once ignored SIGTERM this way under load)."""
    stop = threading.Event()
    handler = stop_on_signal(stop)
    with stop._cond:  # what the main thread holds between bytecodes of Event.wait
        caller = threading.Thread(target=handler, args=(signal.SIGTERM, None))
        caller.start()
        caller.join(5)
        assert not caller.is_alive(), "the handler blocked on the event's lock"
        assert not stop.is_set()
    assert stop.wait(5)


def test_tail_follows_a_live_file_across_rotation(tmp_path):
    path = tmp_path / "live" / "traces.jsonl"
    tail = Proc("--file", str(path))
    try:
        said = tail.next_line(tail.errs)
        assert said.strip() == f"easel traces: following {path} (not there yet: waiting for the daemon to write it)"
        tel = setup_telemetry(env={"EASEL_TRACES_FILE": str(path)})  # the file appears after the tail started
        emit_renders(tel)
        tel.shutdown()
        got = [tail.next_line() for _ in range(3)]
        assert "dust:0/96" in got[0] and "portrait" in got[1] and "scene" in got[2]
        os.replace(path, path.with_name("traces.jsonl.1"))  # what JsonlSpanExporter does at its cap
        tel = setup_telemetry(env={"EASEL_TRACES_FILE": str(path)})
        with render_span(tel, SPEC, tier="cartography", stack=[GOOD]):
            pass
        tel.shutdown()
        assert "cartography" in tail.next_line()
    finally:
        assert tail.stop() == 0  # SIGTERM is a clean stop


# ---------------------------------------------------------------------------------------------- OTLP/HTTP


def test_tail_listens_for_otlp_http_from_any_sdk():
    tail = Proc("--listen", "127.0.0.1:0", "--json")
    try:
        banner = tail.next_line(tail.errs)
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1/traces", banner)
        assert m, banner
        tel = setup_telemetry(
            env={
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{m.group(1)}",
            }
        )
        emit_renders(tel)
        tel.shutdown()  # also sends metrics, which the receiver accepts and drops
        records = {}
        while len([r for r in records.values() if r["name"] == "flux_mlx.render"]) < 3:
            rec = json.loads(tail.next_line())
            records[rec["span_id"]] = rec
        renders = sorted(
            (r for r in records.values() if r["name"] == "flux_mlx.render"), key=lambda r: r["start_time_unix_nano"]
        )
        first = renders[0]
        assert first["attributes"]["render.lora.matched_keys"] == [120, 0]
        assert first["attributes"]["render.lora.names"] == ["western", "dust"]
        assert first["attributes"]["render.lora.scales"] == [0.8, 0.5]
        assert first["status"]["code"] == "ERROR"
        assert first["resource"]["service.name"] == "easel-daemon"
        parent = records[first["parent_span_id"]]
        assert parent["name"] == "easel.Daemon/render" and parent["kind"] == "SERVER"
        # the same line format as from the file
        assert "dust:0/96" in format_render(first)
    finally:
        assert tail.stop() == 0


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_receiver_takes_json_gzip_and_survives_garbage():
    got: list = []
    receiver = OtlpHttpReceiver("127.0.0.1", 0, got.extend).start()
    try:
        host, port = receiver.address
        url = f"http://{host}:{port}/v1/traces"
        otlp_json = json.dumps(
            {
                "resourceSpans": [
                    {
                        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "other"}}]},
                        "scopeSpans": [
                            {
                                "spans": [
                                    {
                                        "traceId": "5b8efff798038103d269b633813fc60c",
                                        "spanId": "eee19b7ec3c1b174",
                                        "name": "flux_mlx.render",
                                        "startTimeUnixNano": "1000000000",
                                        "endTimeUnixNano": "2000000000",
                                        "attributes": [
                                            {
                                                "key": "render.lora.matched_keys",
                                                "value": {"arrayValue": {"values": [{"intValue": "3"}]}},
                                            }
                                        ],
                                        "status": {"code": 2, "message": "boom"},
                                    }
                                ]
                            }
                        ],
                    }
                ]
            }
        )
        request = otlp_json_to_request(otlp_json)
        code, _ = _post(url, otlp_json.encode(), {"Content-Type": "application/json"})
        assert code == 200
        code, _ = _post(
            url,
            gzip.compress(request.SerializeToString()),
            {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
        )
        assert code == 200
        assert _post(url, b"\xff\x00garbage", {"Content-Type": "application/x-protobuf"})[0] == 400
        assert _post(f"http://{host}:{port}/v1/nope", b"", {})[0] == 404
        assert _post(f"http://{host}:{port}/v1/metrics", b"", {"Content-Type": "application/x-protobuf"})[0] == 200
        assert len(got) == 2
        for rec in got:
            assert rec["trace_id"] == "5b8efff798038103d269b633813fc60c"
            assert rec["attributes"]["render.lora.matched_keys"] == [3]
            assert rec["status"] == {"code": "ERROR", "message": "boom"}
            assert rec["resource"]["service.name"] == "other"
    finally:
        receiver.close()


def test_listen_on_a_taken_port_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        result = CliRunner().invoke(main, ["traces", "tail", "--listen", f"127.0.0.1:{port}"])
    assert result.exit_code != 0 and "cannot listen" in result.output
