"""The JSON-lines span file: one finished span per line, what `easel traces tail` follows.

The record shape (also produced by the tail's OTLP/HTTP receiver, so both sources print alike):

    {"name", "trace_id" (32 hex), "span_id" (16 hex), "parent_span_id" (16 hex or null), "kind",
     "start_time_unix_nano", "end_time_unix_nano", "status": {"code": "UNSET|OK|ERROR", "message"},
     "attributes": {...}, "events": [{"name", "time_unix_nano", "attributes"}], "resource": {...}, "scope"}

The file is appended to by a background exporter thread (never by the render itself) and rotated to
`<file>.1` past a size cap, so it cannot fill the disk.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

_KIND = {
    SpanKind.INTERNAL: "INTERNAL",
    SpanKind.SERVER: "SERVER",
    SpanKind.CLIENT: "CLIENT",
    SpanKind.PRODUCER: "PRODUCER",
    SpanKind.CONSUMER: "CONSUMER",
}
_STATUS = {StatusCode.UNSET: "UNSET", StatusCode.OK: "OK", StatusCode.ERROR: "ERROR"}


def _plain(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in (attrs or {}).items()}


def span_to_record(span: ReadableSpan) -> dict[str, Any]:
    """A finished SDK span as the JSON-serialisable record described in the module docstring."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "kind": _KIND.get(span.kind, str(span.kind)),
        "start_time_unix_nano": span.start_time,
        "end_time_unix_nano": span.end_time,
        "status": {"code": _STATUS[span.status.status_code], "message": span.status.description or ""},
        "attributes": _plain(span.attributes),
        "events": [
            {"name": e.name, "time_unix_nano": e.timestamp, "attributes": _plain(e.attributes)} for e in span.events
        ],
        "resource": _plain(span.resource.attributes),
        "scope": span.instrumentation_scope.name if span.instrumentation_scope else None,
    }


class JsonlSpanExporter(SpanExporter):
    """Appends each exported span as one JSON line; rotates to `<path>.1` when the file passes `max_bytes`."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 64 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        data = "".join(json.dumps(span_to_record(s), default=str, separators=(",", ":")) + "\n" for s in spans)
        try:
            with self._lock:
                self._rotate_if_needed()
                # One write per batch on an O_APPEND descriptor: a reader never sees half a line from us.
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, data.encode())
                finally:
                    os.close(fd)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _rotate_if_needed(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size >= self.max_bytes:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))

    def shutdown(self) -> None:
        self._closed = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
