"""Layer layouts read from mflux's own transformer, for matching a LoRA without rendering."""

from __future__ import annotations

import functools
import os
from typing import Any

from client.lorafile.inspect import inspect_lora
from client.wire.report import FileReport

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


def inspect_against(path: str | os.PathLike[str], transformer: Any) -> FileReport:
    """Resolve a LoRA file against a live transformer's own layers, exactly as applying it would."""
    from daemon.lora.runtime import linear_layout

    return inspect_lora(path, layout=linear_layout(transformer))
