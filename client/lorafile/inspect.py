"""`inspect_lora`: a file's report (format, rank, alpha, keys, leftovers) without rendering anything.

Without a layout it reports what the file says; with a model's layer layout it also resolves every key
against the model's layers, exactly as applying it would.
"""

from __future__ import annotations

import os

from client.lorafile.keymaps import KeymapSet, load_keymaps
from client.lorafile.parse import parse_lora
from client.lorafile.resolve import Layout, resolve
from client.lorafile.safetensors_io import read_safetensors
from client.wire.report import FileReport


def inspect_lora(
    path: str | os.PathLike[str],
    *,
    layout: Layout | None = None,
    keymaps: KeymapSet | None = None,
) -> FileReport:
    """Report on one LoRA file; raises LoraFormatError / LoraUnsupported / LoraNotFound like applying it."""
    parsed = parse_lora(read_safetensors(path), keymaps or load_keymaps())
    _terms, report = resolve(parsed, layout)
    report.path = str(path)
    return report
