"""`inspect_lora`: a file's report (format, rank, alpha, keys, leftovers) without rendering anything.

Without a model it reports what the file says; with a transformer (or a preset's layout) it also
resolves every key against the model's layers, exactly as applying it would.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from daemon.lora.keymaps import KeymapSet, load_keymaps
from daemon.lora.parse import parse_lora
from daemon.lora.reader import read_safetensors
from daemon.lora.report import FileReport
from daemon.lora.resolve import Layout, resolve

# Block counts of each preset's transformer (mflux builds Flux.1 with 19 joint + 38 single blocks).
_PRESET_BLOCKS = {"tiny": (1, 1)}
_FULL_BLOCKS = (19, 38)


@functools.lru_cache(maxsize=4)
def preset_layout(preset: str) -> dict[str, tuple[int, int]]:
    """A preset's layer layout, read from an mflux transformer built lazily (MLX allocates no weights
    until evaluated, so this costs about a second and little memory, and needs no weight files)."""
    import importlib

    importlib.import_module("daemon.engine.runtime")  # OpenBLAS must load before MLX does
    from mflux.models.common.config.model_config import ModelConfig
    from mflux.models.flux.model.flux_transformer.transformer import Transformer

    from daemon.engine.presets import get_preset
    from daemon.lora.runtime import linear_layout

    p = get_preset(preset)
    n_double, n_single = _PRESET_BLOCKS.get(p.name, _FULL_BLOCKS)
    transformer = Transformer(getattr(ModelConfig, p.mflux_config)(), n_double, n_single)
    return linear_layout(transformer)


def inspect_lora(
    path: str | os.PathLike[str],
    transformer: Any = None,
    *,
    layout: Layout | None = None,
    keymaps: KeymapSet | None = None,
) -> FileReport:
    """Report on one LoRA file; raises LoraFormatError / LoraUnsupported / LoraNotFound like applying it."""
    if transformer is not None and layout is None:
        from daemon.lora.runtime import linear_layout

        layout = linear_layout(transformer)
    parsed = parse_lora(read_safetensors(path), keymaps or load_keymaps())
    _terms, report = resolve(parsed, layout)
    report.path = str(path)
    return report
