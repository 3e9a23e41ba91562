"""LoRA stacking on the live MLX model: patch, switch, clear atomically; cache parsed files.

What a LoRA file says (reading, formats, keymaps, resolution to terms, the per-file report) is the
pure library `client.lorafile`; this room turns resolved terms into MLX arrays on the model's layers.
`LoraPatcher` loads MLX on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import daemon.engine  # noqa: F401  (ctypes-only BLAS preload: any MLX import below runs on OpenBLAS)
from client.lorafile.inspect import inspect_lora
from client.wire.report import FileReport
from daemon.lora.cache import LoraCache
from daemon.lora.inspect import inspect_against, preset_layout
from daemon.lora.stack import StackEntry, StackReport

if TYPE_CHECKING:
    from daemon.lora.patcher import LoraPatcher

__all__ = [
    "FileReport",
    "LoraCache",
    "LoraPatcher",
    "StackEntry",
    "StackReport",
    "inspect_against",
    "inspect_lora",
    "preset_layout",
]


def __getattr__(name: str) -> Any:
    if name == "LoraPatcher":
        from daemon.lora import patcher

        return getattr(patcher, name)
    raise AttributeError(name)
