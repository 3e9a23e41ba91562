"""Per-file LoRA reports for tests that exercise spans, manifests or replies without a real patcher."""

from __future__ import annotations

from client.wire.report import FileReport


def file_report(
    *,
    path: str,
    keys_applied: int,
    keys_total: int,
    scale: float = 1.0,
    name: str | None = None,
    format: str = "kohya",
    layers_patched: int | None = None,
) -> FileReport:
    """A FileReport as the patcher makes one (layers default to one per applied key)."""
    return FileReport(
        path=path,
        scale=scale,
        name=name,
        format=format,
        keys_total=keys_total,
        keys_applied=keys_applied,
        layers_patched=keys_applied if layers_patched is None else layers_patched,
    )
