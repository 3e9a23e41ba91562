"""Operators' view of renders: read span records, follow the daemon's span file, receive OTLP/HTTP, format lines.

A span record is the JSON shape daemon/telemetry/jsonl.py writes; `records_from_otlp` turns an OTLP
ExportTraceServiceRequest into the same shape, so a render prints the same whichever way it arrived.
"""

from __future__ import annotations

import base64
import collections
import gzip
import json
import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

RENDER_SPAN = "flux_mlx.render"
PHASE_LABELS = (
    ("queue_wait", "queue"),
    ("stack_switch", "switch"),
    ("text_encode", "text"),
    ("denoise", "denoise"),
    ("decode", "decode"),
    ("write", "write"),
)
MAX_OTLP_BODY = 32 * 1024 * 1024
_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}

Record = dict[str, Any]


# ------------------------------------------------------------------------------------------------ decoding


def _any_value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, which) if which else None


def _attrs(kvs) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in kvs}


def records_from_otlp(request: ExportTraceServiceRequest) -> list[Record]:
    """Every span of an OTLP export request as a span record."""
    out: list[Record] = []
    for rs in request.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    {
                        "name": s.name,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex() or None,
                        "kind": _KINDS.get(s.kind, str(s.kind)),
                        "start_time_unix_nano": s.start_time_unix_nano,
                        "end_time_unix_nano": s.end_time_unix_nano,
                        "status": {"code": _STATUS.get(s.status.code, "UNSET"), "message": s.status.message},
                        "attributes": _attrs(s.attributes),
                        "events": [
                            {"name": e.name, "time_unix_nano": e.time_unix_nano, "attributes": _attrs(e.attributes)}
                            for e in s.events
                        ],
                        "resource": resource,
                        "scope": ss.scope.name or None,
                    }
                )
    return out


def _hex_ids_to_base64(obj: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str) and value:
            obj[key] = base64.b64encode(bytes.fromhex(value)).decode()


def otlp_json_to_request(body: bytes | str) -> ExportTraceServiceRequest:
    """Decode OTLP/JSON. Unlike protobuf's JSON mapping (base64), OTLP/JSON writes trace and span ids as hex."""
    doc = json.loads(body)
    for rs in doc.get("resourceSpans") or doc.get("resource_spans") or []:
        for ss in rs.get("scopeSpans") or rs.get("scope_spans") or []:
            for span in ss.get("spans") or []:
                _hex_ids_to_base64(span, ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"))
                for link in span.get("links") or []:
                    _hex_ids_to_base64(link, ("traceId", "spanId", "trace_id", "span_id"))
    request = ExportTraceServiceRequest()
    json_format.ParseDict(doc, request, ignore_unknown_fields=True)
    return request


def parse_record(line: str) -> Record | None:
    """One line of the span file as a record; None for a blank, torn or foreign line (never fatal)."""
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("name"), str) else None


# ------------------------------------------------------------------------------------------------ formatting


def _seconds(value: float) -> str:
    return f"{value:.2f}s" if value < 100 else f"{value:.0f}s"


def stack_summary(attrs: dict[str, Any]) -> list[tuple[str, bool]]:
    """`name:applied/total` per LoRA in stack order, with whether it matched nothing."""
    names = attrs.get("render.lora.names") or []
    matched = attrs.get("render.lora.matched_keys") or []
    totals = attrs.get("render.lora.total_keys") or []
    out = []
    for i, name in enumerate(names):
        applied = matched[i] if i < len(matched) else None
        total = totals[i] if i < len(totals) else None
        text = f"{name}:{'?' if applied is None else applied}/{'?' if total is None else total}"
        out.append((text, applied == 0))
    return out


def format_render(rec: Record) -> str:
    """One line per render: time, status, tier, model, size, stack, phase durations, total, error message.

    Styled with ANSI colours; click.echo drops them when the output is not a terminal.
    """
    attrs = rec.get("attributes") or {}
    end_ns = rec.get("end_time_unix_nano") or rec.get("start_time_unix_nano") or 0
    when = datetime.fromtimestamp(end_ns / 1e9).strftime("%H:%M:%S") if end_ns else "--:--:--"
    status = (rec.get("status") or {}).get("code", "UNSET")
    failed = status == "ERROR"
    badge = click.style("ERROR", fg="red", bold=True) if failed else click.style("ok   ", fg="green")
    size = f"{attrs.get('render.width', '?')}x{attrs.get('render.height', '?')}"
    stack = stack_summary(attrs)
    stack_text = (
        " ".join(click.style(t, fg="red") if zero else t for t, zero in stack)
        if stack
        else click.style("no-lora", dim=True)
    )
    phases = []
    for key, label in PHASE_LABELS:
        value = attrs.get(f"render.phase.{key}.duration")
        if isinstance(value, (int, float)):
            phases.append(f"{label} {_seconds(float(value))}")
    start_ns = rec.get("start_time_unix_nano") or 0
    total = _seconds((end_ns - start_ns) / 1e9) if end_ns and start_ns else "?"
    parts = [
        when,
        badge,
        f"{attrs.get('render.tier', '-'):<11}",
        str(attrs.get("render.model", "?")),
        size,
        f"s{attrs.get('render.steps', '?')}",
        stack_text,
        " ".join(phases) if phases else "",
        f"total {total}",
    ]
    line = "  ".join(p for p in parts if p)
    if failed:
        message = (rec.get("status") or {}).get("message") or attrs.get("error.type") or ""
        if message:
            line += "  " + click.style(str(message), fg="red")
    return line


RENDER_CALL = "easel.Daemon/render"  # the server span of a render request


class TailLines:
    """What `easel traces tail` prints for each span: a line per render span, and one for a render request
    refused before it rendered (its server span ended in error with no render span under it: a LoRA not
    found, a size over the limits, a full queue). A render span ends before its request's server span, so
    the render spans seen (their parents, the last few thousand) say which refusals had none."""

    def __init__(self, remember: int = 4096) -> None:
        self._rendered: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._remember = remember

    def line(self, rec: Record) -> str | None:
        if rec.get("name") == RENDER_SPAN:
            parent = rec.get("parent_span_id")
            if parent:
                self._rendered[parent] = None
                while len(self._rendered) > self._remember:
                    self._rendered.popitem(last=False)
            return format_render(rec)
        failed = (rec.get("status") or {}).get("code") == "ERROR"
        if rec.get("name") == RENDER_CALL and failed and rec.get("span_id") not in self._rendered:
            return format_refused(rec)
        return None


def format_refused(rec: Record) -> str:
    """One line for a render request answered with an error before any render: time, ERROR, why."""
    attrs = rec.get("attributes") or {}
    end_ns = rec.get("end_time_unix_nano") or rec.get("start_time_unix_nano") or 0
    when = datetime.fromtimestamp(end_ns / 1e9).strftime("%H:%M:%S") if end_ns else "--:--:--"
    code = attrs.get("error.type") or "error"
    message = (rec.get("status") or {}).get("message") or ""
    said = click.style(f"refused {code}: {message}", fg="red")
    return f"{when}  {click.style('ERROR', fg='red', bold=True)}  {said}"


# ------------------------------------------------------------------------------------------------ sources


def follow_file(
    path: Path, *, from_start: bool = False, follow: bool = True, stop: threading.Event | None = None, poll_s=0.2
) -> Iterator[Record]:
    """Records appended to the span file; waits for it to appear, survives rotation and truncation.

    With follow=False, yields what the file holds now and returns. Whether to skip the file's history
    is decided at the call, not at the first read, so nothing written in between is lost.
    """
    # Skip history only in a file that existed when we started; one that appears later is all news.
    return _follow(path, not from_start and path.exists(), follow, stop or threading.Event(), poll_s)


def _follow(path: Path, skip_existing: bool, follow: bool, stop: threading.Event, poll_s: float) -> Iterator[Record]:
    handle = None
    inode = None
    pending = ""
    while not stop.is_set():
        if handle is None:
            try:
                handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 (kept open while following)
            except FileNotFoundError:
                if not follow:
                    return
                stop.wait(poll_s)
                continue
            inode = os.fstat(handle.fileno()).st_ino
            if skip_existing:
                handle.seek(0, os.SEEK_END)
                skip_existing = False
        chunk = handle.read()
        if chunk:
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                rec = parse_record(line)
                if rec is not None:
                    yield rec
            continue
        if not follow:
            break
        try:
            st = os.stat(path)
            rotated = st.st_ino != inode or st.st_size < handle.tell()
        except FileNotFoundError:
            rotated = False  # between rotation's rename and the next write: keep the old file for now
        if rotated:
            handle.close()
            handle, pending = None, ""  # the new file is read from its start
            continue
        stop.wait(poll_s)
    if handle is not None:
        handle.close()


class OtlpHttpReceiver:
    """A minimal OTLP/HTTP traces receiver (protobuf or JSON, gzip/deflate) handing records to a callback.

    Metrics and logs are accepted and dropped, so an SDK sending all signals gets no errors.
    """

    def __init__(self, host: str, port: int, on_records: Callable[[list[Record]], None]) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet: the terminal is for renders
                pass

            def _reply(self, code: int, body: bytes = b"", ctype: str = "application/x-protobuf") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_OTLP_BODY:
                    self._reply(413, b"request too large", "text/plain")
                    self.close_connection = True
                    return
                body = self.rfile.read(length)
                path = self.path.split("?", 1)[0].rstrip("/")
                is_json = (self.headers.get("Content-Type") or "").startswith("application/json")
                ctype = "application/json" if is_json else "application/x-protobuf"
                empty = b"{}" if is_json else b""
                if path in ("/v1/metrics", "/v1/logs"):
                    self._reply(200, empty, ctype)
                    return
                if path != "/v1/traces":
                    self._reply(404, b"not found", "text/plain")
                    return
                try:
                    encoding = (self.headers.get("Content-Encoding") or "").lower()
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    if is_json:
                        request = otlp_json_to_request(body)
                    else:
                        request = ExportTraceServiceRequest()
                        request.ParseFromString(body)
                except Exception as exc:  # a bad body is the sender's problem: 400, keep serving
                    self._reply(400, f"cannot decode OTLP traces: {exc}".encode(), "text/plain")
                    return
                receiver.on_records(records_from_otlp(request))
                response = ExportTraceServiceResponse()
                self._reply(200, json_format.MessageToJson(response).encode() if is_json else b"", ctype)

        self.on_records = on_records
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> OtlpHttpReceiver:
        self._thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join()


def listen(host: str, port: int, stop: threading.Event) -> tuple[tuple[str, int], Iterator[Record]]:
    """Bind an OTLP/HTTP receiver now (OSError if the address is taken); returns its address and the
    records it receives until `stop` is set."""
    inbox: queue.Queue[list[Record]] = queue.Queue()
    receiver = OtlpHttpReceiver(host, port, inbox.put).start()

    def records() -> Iterator[Record]:
        try:
            while not stop.is_set():
                try:
                    batch = inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                yield from batch
        finally:
            receiver.close()

    return receiver.address, records()
