"""LoRA stacking on the live model: read, recognise, resolve, patch, account, cache.

Pure-numpy parts (reading, format recognition, resolution, cache, inspect) import without MLX;
`LoraPatcher` and `StackEntry` load MLX on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import daemon.engine  # noqa: F401  (ctypes-only BLAS preload: any MLX import below runs on OpenBLAS)
from daemon.lora.cache import CacheStats, LoraCache
from daemon.lora.inspect import inspect_lora, preset_layout
from daemon.lora.report import FileReport, StackEntry, StackReport

if TYPE_CHECKING:
    from daemon.lora.patcher import LoraPatcher

__all__ = [
    "CacheStats",
    "FileReport",
    "LoraCache",
    "LoraPatcher",
    "StackEntry",
    "StackReport",
    "inspect_lora",
    "preset_layout",
]


def __getattr__(name: str) -> Any:
    if name == "LoraPatcher":
        from daemon.lora import patcher

        return getattr(patcher, name)
    raise AttributeError(name)
